"""The training recipe: QLoRA (or LoRA on CPU) with the HF Trainer.

Reads top to bottom like the reference setup:
- 4-bit NF4 + double quantisation + bf16 compute on CUDA with QUANT=4bit; full precision on CPU.
- LoRA r/alpha/dropout from the config on q,k,v,o,gate,up,down; gradient checkpointing, but for
  the last UNCHECKPOINTED_LAYERS decoder layers and UNCHECKPOINTED_ATTENTION attention blocks
  below them (the plan's use of memory left over).
- Stratified 90/10 split by answer (fixed seed); every training row every epoch, its options
  reordered each epoch with SHUFFLE_OPTIONS=1 (the label follows its option).
- Total batch = PER_DEVICE_BATCH x gradient accumulation x world size = EFFECTIVE_BATCH_SIZE,
  all three from the run plan (vqa/planning/runplan.py).
- AdamW, max_grad_norm 0.3, weight decay 0.01, warmup ratio 0.1.
- Each epoch: accuracy on a fixed stratified validation sample (<= VAL_SAMPLE rows); early stopping
  with patience EARLY_STOPPING_PATIENCE; the best checkpoint is loaded at the end.
- Labels only on the answer letter and <|im_end|>; logits only where the labels are
  (vqa/trainer.py: the step, with its out-of-memory back-off).
Writes lora_adapter/ (peft format), train_metrics.json and train_curve.png (loss, validation
accuracy, memory) to ARTIFACTS_DIR, and TensorBoard events to ARTIFACTS_DIR/runs/.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vqa import distributed
from vqa.clock import job_clock
from vqa.config import Config, ConfigError
from vqa.data import (DataError, VQACollator, image_problems, letter_token_ids, read_table,
                      stratified_sample, stratified_split)
from vqa.io import file_fingerprint, write_json_atomic
from vqa.model import attach_lora, device_and_dtype, load_model, load_processor, model_fingerprint
from vqa.options import shuffled_options
from vqa.planning.planner import Plan
from vqa.planning.runplan import planned, stage_plan
from vqa.speed import labelled_loss
from vqa.trainer import (backoff_trainer_class, letter_metrics, plot_curves, step_seconds,
                         step_timer, tensorboard_callback)

log = logging.getLogger("vqa")


class RowDataset(torch.utils.data.Dataset):
    """The rows, each with its options reordered per epoch when `shuffle_seed` is set
    (SHUFFLE_OPTIONS=1: `vqa.options.shuffled_options`); the Trainer's epoch reaches it through
    `set_epoch` (EpochToDataset) before each epoch's iterator, and its workers, start."""

    def __init__(self, rows: list[dict], shuffle_seed: int | None = None):
        self.rows = rows
        self.shuffle_seed = shuffle_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        if self.shuffle_seed is None:
            return row
        return shuffled_options(row, self.shuffle_seed, self.epoch)


def epoch_to_dataset(dataset: RowDataset):
    """A callback that hands each epoch's number (0-based, from the Trainer's state, so a
    resumed run gets the right one) to the training rows at the epoch's start."""
    from transformers import TrainerCallback

    class EpochToDataset(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.set_epoch(math.floor(state.epoch + 1e-6) if state.epoch else 0)

    return EpochToDataset()


def _too_long(config: Config, frame, processor) -> dict[str, str]:
    """id -> why, for rows longer than MAX_SEQUENCE_LENGTH (the planner's token rule)."""
    from vqa.planning.rows import scan_rows, tokens_from_processor

    tokens = tokens_from_processor(processor or load_processor(config))
    _, problems = scan_rows(frame, "train.csv", config.data_dir, tokens,
                            config.max_sequence_length)
    return {str(p.id): p.reason for p in problems if p.kind == "too long"}


def split_rows(config: Config, processor=None, *, whole_fold: bool = False
               ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, fixed validation sample, skipped rows) from DATA_DIR/train.csv.

    The validation rows are VAL_FRACTION of the rows, stratified by answer; for fold k of
    FOLDS (FOLD=k) they are the rows of fold k (vqa/folds.py), all of them with `whole_fold`
    (its out-of-fold rows), else the fixed sample of them that early stopping watches.
    A row whose image cannot be used, or whose sequence exceeds MAX_SEQUENCE_LENGTH, is skipped
    and listed with its CSV line and reason; when more than half the images are unusable the
    data folder itself is wrong, and that stops the run.
    """
    path = config.data_dir / "train.csv"
    frame = read_table(path, with_answer=True)
    problems = image_problems(frame, config.data_dir, "check train images")
    if len(problems) * 2 > len(frame):
        first = next(n for n, i in enumerate(frame["id"]) if i in problems)
        raise DataError(f"{path}: {len(problems)} of {len(frame)} images unusable (row "
                        f"{first + 2}, id {frame.at[first, 'id']!r}: "
                        f"{problems[frame.at[first, 'id']]}); is DATA_DIR right?")
    if config.max_sequence_length:
        problems = {**_too_long(config, frame, processor), **problems}
    skipped = [{"row": n + 2, "id": row["id"], "path": row["path"], "reason": problems[row["id"]]}
               for n, row in enumerate(frame.to_dict("records")) if row["id"] in problems]
    if skipped:
        first = skipped[0]
        log.warning("skipping %d of %d training rows (listed in train_metrics.json); first: row "
                    "%d, id %s: %s", len(skipped), len(frame), first["row"], first["id"],
                    first["reason"])
        frame = frame[~frame["id"].isin(problems)].reset_index(drop=True)
    if config.folds and config.fold is not None:
        from vqa.folds import fold_assignment

        held = frame["id"].map(fold_assignment(config)) == config.fold
        train, val = frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
        if whole_fold:
            return train.to_dict("records"), val.to_dict("records"), skipped
    else:
        train, val = stratified_split(frame, config.val_fraction, config.seed, path)
    val = stratified_sample(val, config.val_sample, config.seed)
    return train.to_dict("records"), val.to_dict("records"), skipped


# Settings that do not change what training produces; any other change means a new run.
_NOT_TRAINING = {"PRED_BATCH_SIZE", "MAX_NEW_TOKENS", "INFER_MODE", "DATA_TRAIN_ROWS",
                 "DATA_TEST_ROWS", "BASE_PRETRAIN_STEPS", "NUM_THREADS", "DATALOADER_WORKERS",
                 "RETRAIN", "ARTIFACTS_DIR", "DATA_DIR", "TARGET_GPU", "TARGET_GPU_MEMORY",
                 # the same gradients, whatever the card: the micro-batch only splits the
                 # effective batch, and kept layers only skip recomputation
                 "PER_DEVICE_BATCH", "UNCHECKPOINTED_LAYERS", "UNCHECKPOINTED_ATTENTION",
                 "FUSED_KERNELS",  # the same functions, in fewer kernels
                 # how eval and submit ask, and what make ensemble blends
                 "TTA", "CALIBRATE", "CALIBRATE_SHARE", "RUNS",
                 # where this host sits among several: the same run on every node
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RENDEZVOUS_TIMEOUT"}


def train_signature(config: Config) -> dict:
    """What a training run depends on: settings, train.csv's bytes and the base weights. Not the
    card: a run killed on one card resumes on another."""
    settings = {k: v for k, v in config.to_json().items() if k not in _NOT_TRAINING}
    return {"settings": settings,
            "train_csv": file_fingerprint(config.data_dir / "train.csv"),
            "base_weights": model_fingerprint(config.resolved_model_id)}


def _checkpoint_to_resume(checkpoints: Path, signature: dict) -> str | None:
    """The newest checkpoint of the same run, if any; checkpoints of another run are set aside."""
    stamp = checkpoints / "train_signature.json"
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        return str(found[-1]) if found else None
    if checkpoints.exists():
        stale = checkpoints.with_name(f"checkpoints.stale-{int(time.time())}")
        checkpoints.rename(stale)
        log.info("checkpoints in %s belong to another run: moved to %s", checkpoints, stale)
    checkpoints.mkdir(parents=True)
    write_json_atomic(stamp, signature)
    return None


def training_arguments(config: Config, micro: int, accumulation: int, steps_per_epoch: int,
                       output_dir: Path, max_steps: int | None = None):
    """The recipe's TrainingArguments at this micro-batch and accumulation. `max_steps` (the
    benchmarks): that many optimizer steps, logged each, with no evaluation or checkpoints."""
    from transformers import TrainingArguments

    device, dtype = device_and_dtype()
    full = max_steps is None
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        max_steps=max_steps or -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=math.ceil(config.warmup_ratio * (max_steps or steps_per_epoch
                                                      * config.epochs)),
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        eval_strategy="epoch" if full else "no",
        save_strategy="epoch" if full else "no",
        save_total_limit=2,
        load_best_model_at_end=full,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        logging_steps=max(1, steps_per_epoch // 10) if full else 1,
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=config.loader_workers(device == "cuda"),
        report_to=[],
        ddp_find_unused_parameters=False,  # every LoRA module sees every row (one image each)
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=False,
    )
    if distributed.world().size == 1 and args.n_gpu > 1:
        # One process drives one GPU. Left alone, Trainer would multiply the micro-batch by
        # the GPUs it sees (DataParallel) and silently double EFFECTIVE_BATCH_SIZE; NPROC=2 is
        # the way to use two.
        args._n_gpu = 1
    return args


def build_trainer(config: Config, plan: Plan, model, processor, train_rows: list[dict],
                  val_rows: list[dict], output_dir: Path, *, max_steps: int | None = None):
    """The Trainer `make train` runs: the plan's micro-batch and accumulation, the recipe's
    optimizer and schedule, the back-off training step (vqa/trainer.py), a step timer.
    `max_steps`: see `training_arguments` (make bench and make bench-memory time this)."""
    from transformers import EarlyStoppingCallback

    micro, accumulation = plan.per_device_batch, plan.gradient_accumulation
    steps_per_epoch = math.ceil(len(train_rows) / (micro * accumulation
                                                   * distributed.world().size))
    preprocess, compute_metrics = letter_metrics(letter_token_ids(processor.tokenizer))
    train_dataset = RowDataset(train_rows, config.seed if config.shuffle_options else None)
    callbacks = [step_timer(), epoch_to_dataset(train_dataset)]
    clock = None
    if max_steps is None:
        callbacks.append(EarlyStoppingCallback(
            early_stopping_patience=config.early_stopping_patience))
        if distributed.world().is_main:  # `tensorboard --logdir ARTIFACTS_DIR/runs`
            callbacks.append(tensorboard_callback(
                config.artifacts_dir / "runs" / time.strftime("train-%Y%m%d-%H%M%S")))
            clock = job_clock(plan.predicted)
            callbacks.append(clock)
    trainer = backoff_trainer_class()(
        model=model,
        args=training_arguments(config, micro, accumulation, steps_per_epoch, output_dir,
                                max_steps),
        train_dataset=train_dataset,
        eval_dataset=RowDataset(val_rows) if max_steps is None else None,
        data_collator=VQACollator(processor, config.data_dir, train=True),
        compute_loss_func=labelled_loss,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=callbacks,
        remedy=(f"lower MAX_PIXELS (now {config.max_pixels or 'the processor default'}; each "
                f"halving halves the image tokens) or use a card with more memory"),
    )
    if clock is not None:  # the bar it writes on is the Trainer's own
        from transformers.trainer_callback import ProgressCallback

        clock.progress = next((c for c in trainer.callback_handler.callbacks
                               if isinstance(c, ProgressCallback)), None)
    return trainer


def train(config: Config) -> dict:
    """Fine-tunes LoRA on DATA_DIR/train.csv with the run plan (read or made: `stage_plan`);
    returns the metrics written to train_metrics.json.

    A finished run with the same signature is not trained again (RETRAIN=1 forces it); a run
    killed midway resumes from its last checkpoint (one per epoch), on this card or another.
    """
    artifacts = config.artifacts_dir
    signature = train_signature(config)
    metrics_path = artifacts / "train_metrics.json"
    if (not config.retrain and metrics_path.is_file()
            and (artifacts / "lora_adapter" / "adapter_config.json").is_file()):
        previous = json.loads(metrics_path.read_text())
        if previous.get("signature") == signature:
            log.info("already trained with these settings (%s); RETRAIN=1 trains again",
                     metrics_path)
            return previous
    here = distributed.init()
    processor = load_processor(config)
    # Rank 0 makes the plan when it must; the others then read what rank 0 saved.
    plan = stage_plan(config, "train", processor) if here.is_main else None
    distributed.barrier()
    plan = plan or stage_plan(config, "train", processor)
    asked = config  # the signature is of the settings asked for; TIME_BUDGET's choice follows
    config, processor = planned(config, plan, processor)
    if plan.ranks != here.size:
        raise ConfigError(f"the plan is for {plan.ranks} rank(s) (NPROC={plan.nproc} x "
                          f"NNODES={plan.nnodes}) but {here.size} run: start training with "
                          f"the NPROC and NNODES of the plan")
    distributed.check_shared(artifacts)
    train_rows, val_rows, skipped = split_rows(config, processor)
    model = attach_lora(load_model(config, for_training=True), config,
                        uncheckpointed_layers=plan.uncheckpointed_layers,
                        uncheckpointed_attention=plan.uncheckpointed_attention)
    if signature["base_weights"].get("commit", "") is None:
        signature = train_signature(asked)  # the hub model is in the cache now: its commit
    # Rank 0 sets stale checkpoints aside first; the other ranks then only read.
    resume = _checkpoint_to_resume(artifacts / "checkpoints", signature) if here.is_main else None
    distributed.barrier()
    if not here.is_main:
        resume = _checkpoint_to_resume(artifacts / "checkpoints", signature)
    if resume:
        log.info("resuming from %s", resume)
    trainable, total = model.get_nb_trainable_parameters()
    micro, accumulation = plan.per_device_batch, plan.gradient_accumulation
    device, _ = device_and_dtype()
    log.info("train rows %d, validation sample %d; trainable %d of %d parameters (%.2f%%) on %s",
             len(train_rows), len(val_rows), trainable, total, 100 * trainable / total, device)
    trainer = build_trainer(config, plan, model, processor, train_rows, val_rows,
                            artifacts / "checkpoints")
    result = trainer.train(resume_from_checkpoint=resume)
    best = trainer.evaluate()  # the best checkpoint, reloaded by load_best_model_at_end

    history = trainer.state.log_history
    seconds = step_seconds(trainer)
    steady = seconds[1:] or seconds
    median_step = float(np.median(steady)) if steady else None
    metrics = {
        "signature": signature,
        "resumed_from": resume,
        "train_rows": len(train_rows),
        "skipped_train_rows": skipped,
        "val_sample_rows": len(val_rows),
        "world_size": here.size,
        "per_device_batch": micro,
        "gradient_accumulation": accumulation,
        "effective_batch_size": micro * accumulation * here.size,
        "uncheckpointed_layers": plan.uncheckpointed_layers,
        "uncheckpointed_attention": plan.uncheckpointed_attention,
        "max_pixels": config.max_pixels,  # None: the processor's own (TIME_BUDGET: its choice)
        "epochs": config.epochs,
        "optimizer_steps": trainer.state.global_step,
        "epochs_run": trainer.state.epoch,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_val_accuracy": best.get("eval_accuracy"),
        "best_val_metrics": best,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        # Steady state: the median optimizer step, the first (warm-up) left out.
        "median_step_seconds": median_step,
        "steady_samples_per_second": (micro * accumulation * here.size / median_step
                                      if median_step else None),
        "peak_reserved_gib_rank0": (torch.cuda.max_memory_reserved() / 2**30
                                    if torch.cuda.is_available() else None),
        "predicted_peak_reserved_gib": (plan.train_peak or {}).get("reserved_gib"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": device,
        "out_of_memory_splits": trainer.oom_events,
        "quantized_4bit": any(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "log_history": history,
    }
    if not here.is_main:  # rank 0 saves the adapter and the reports, once
        return metrics
    adapter_dir = artifacts / "lora_adapter"
    partial = artifacts / "lora_adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    partial.rename(adapter_dir)

    write_json_atomic(metrics_path, metrics)
    plot_curves(history, artifacts / "train_curve.png", (plan.train_peak or {}).get("reserved_gib"))
    return metrics
