"""The training recipe: QLoRA (or LoRA on CPU) with the HF Trainer.

Reads top to bottom like the reference setup:
- 4-bit NF4 + double quantisation + bf16 compute on CUDA with QUANT=4bit; full precision on CPU.
- LoRA r/alpha/dropout from the config on q,k,v,o,gate,up,down; gradient checkpointing, but for
  the last UNCHECKPOINTED_LAYERS decoder layers and UNCHECKPOINTED_ATTENTION attention blocks
  below them (the planner's use of memory left over).
- Stratified 90/10 split by answer (fixed seed); every training row every epoch.
- Total batch = PER_DEVICE_BATCH x gradient accumulation x world size = EFFECTIVE_BATCH_SIZE.
- AdamW, max_grad_norm 0.3, weight decay 0.01, warmup ratio 0.1.
- Each epoch: accuracy on a fixed stratified validation sample (<= VAL_SAMPLE rows); early stopping
  with patience EARLY_STOPPING_PATIENCE; the best checkpoint is loaded at the end.
- Labels only on the answer letter and <|im_end|>; logits only where the labels are
  (vqa/speed.py: the same loss without full-sequence, full-vocabulary logits).
Writes lora_adapter/ (peft format), train_metrics.json and train_curve.png to ARTIFACTS_DIR.
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
from vqa.config import Config
from vqa.data import (
    LETTERS,
    DataError,
    VQACollator,
    image_problems,
    letter_token_ids,
    read_table,
    stratified_sample,
    stratified_split,
)
from vqa.io import write_json_atomic
from vqa.model import attach_lora, device_and_dtype, load_model, load_processor
from vqa.speed import label_window, labelled_loss

log = logging.getLogger("vqa")


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def split_rows(config: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, fixed validation sample, skipped rows) from DATA_DIR/train.csv.

    A row whose image cannot be used is skipped and listed with its CSV line and reason; when
    more than half are unusable the data folder itself is wrong, and that stops the run.
    """
    path = config.data_dir / "train.csv"
    frame = read_table(path, with_answer=True)
    problems = image_problems(frame, config.data_dir, "check train images")
    skipped = [{"row": n + 2, "id": row["id"], "path": row["path"], "reason": problems[row["id"]]}
               for n, row in enumerate(frame.to_dict("records")) if row["id"] in problems]
    if len(skipped) * 2 > len(frame):
        first = skipped[0]
        raise DataError(f"{path}: {len(skipped)} of {len(frame)} images unusable (row "
                        f"{first['row']}, id {first['id']!r}: {first['reason']}); is DATA_DIR "
                        f"right?")
    if skipped:
        first = skipped[0]
        log.warning("skipping %d of %d training rows whose image is unusable (listed in "
                    "train_metrics.json); first: row %d, id %s: %s", len(skipped), len(frame),
                    first["row"], first["id"], first["reason"])
        frame = frame[~frame["id"].isin(problems)].reset_index(drop=True)
    train, val = stratified_split(frame, config.val_fraction, config.seed)
    val = stratified_sample(val, config.val_sample, config.seed)
    return train.to_dict("records"), val.to_dict("records"), skipped


def gradient_accumulation(config: Config, per_device_batch: int, world_size: int = 1) -> int:
    """EFFECTIVE_BATCH_SIZE / (PER_DEVICE_BATCH x world size), at least 1."""
    return max(1, math.ceil(config.effective_batch_size / (per_device_batch * world_size)))


def letter_metrics(letter_ids: list[int]):
    """Trainer hooks that reduce each eval batch to the four letter logits, then score them."""
    letter_index = {token: i for i, token in enumerate(letter_ids)}

    def preprocess_logits_for_metrics(logits, labels):
        # Left-padded rows end with <letter><|im_end|>: the logits at -3 predict the letter.
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits[:, -3, letter_ids]

    def compute_metrics(prediction):
        predicted = np.asarray(prediction.predictions).argmax(-1)
        # Batches are concatenated with -100 padding on the right: the letter is the first label.
        labels = np.asarray(prediction.label_ids)
        first = (labels != -100).argmax(axis=1)
        truth = np.array([letter_index[int(t)] for t in labels[np.arange(len(labels)), first]])
        metrics = {"accuracy": float((predicted == truth).mean())}
        for i, letter in enumerate(LETTERS):
            mask = truth == i
            if mask.any():
                metrics[f"accuracy_{letter}"] = float((predicted[mask] == i).mean())
        return metrics

    return preprocess_logits_for_metrics, compute_metrics


class TrainingOutOfMemory(RuntimeError):
    """One row alone does not fit in a training step: the message names it and the remedy."""


def backoff_trainer_class():
    """The HF Trainer with a training step that survives CUDA out-of-memory.

    On OutOfMemoryError the micro-batch is split in two and its pieces accumulate into the same
    optimizer step, so the optimizer sees the same rows and the same effective batch. Because a
    backward that failed halfway may have added part of its gradients, the accumulation window's
    earlier micro-batches (kept as CPU copies until the optimizer steps) are replayed after zeroing
    the gradients. Later micro-batches at least as long as the one that failed are split up front.
    A single row that does not fit raises TrainingOutOfMemory; checkpoints already saved stay.
    """
    from transformers import Trainer

    from vqa.oom import FaultInjector, even_sizes, free_memory, split_batch

    class BackoffTrainer(Trainer):
        def __init__(self, *args, remedy: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.remedy = remedy
            self.faults = FaultInjector()
            self._piece_ids: list = []
            self._piece_weight = 1.0  # a piece's share of its micro-batch's mean loss
            self.split_from_length: int | None = None  # micro-batches this long or longer ...
            self.piece_rows: int | None = None  # ... run in pieces of at most this many rows
            self.oom_events: list[dict] = []
            self._window: list[tuple[dict, object]] = []  # micro-batches since the optimizer step
            self._window_step = -1

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = {k: v for k, v in inputs.items() if k != "row_ids"}
            # Logits only where the labels are; labelled_loss (compute_loss_func) takes them.
            inputs["logits_to_keep"] = label_window(inputs["labels"])
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if self._piece_weight == 1.0:
                return result
            if isinstance(result, tuple):
                return (result[0] * self._piece_weight, *result[1:])
            return result * self._piece_weight

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step != self._window_step:
                self._window, self._window_step = [], self.state.global_step
            failure = None
            try:
                loss = self._run_pieces(model, inputs, num_items_in_batch)
            except torch.cuda.OutOfMemoryError as error:
                # Recover outside the except block and without the traceback: its frames hold
                # the failed forward's activations, which free_memory() could not release.
                failure = error.with_traceback(None)
            if failure is not None:
                loss = self._recover(model, inputs, num_items_in_batch, failure)
            self._window.append(({k: v.cpu() if torch.is_tensor(v) else v
                                  for k, v in inputs.items()}, num_items_in_batch))
            return loss

        def _sizes(self, inputs) -> list[int]:
            rows, length = inputs["input_ids"].shape
            if self.piece_rows and length >= self.split_from_length and rows > self.piece_rows:
                return even_sizes(rows, self.piece_rows)
            return [rows]

        def _run_pieces(self, model, inputs, num_items_in_batch, replay: bool = False):
            """Runs a micro-batch as pieces whose gradients add up to the micro-batch's own.

            Under DDP only the last piece of the micro-batch that ends an accumulation window
            synchronises gradients (once, as without pieces); replays never do.
            """
            import contextlib

            sizes = self._sizes(inputs)
            # Trainer divides the summed loss by num_items_in_batch when the model or our
            # compute_loss_func takes it; otherwise each piece's mean is weighted by its share
            # of the labels.
            summed = num_items_in_batch is not None and (
                self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            labelled = (inputs["labels"][:, 1:] != -100).sum(1)
            total, start = 0.0, 0
            try:
                for n, piece in enumerate(split_batch(inputs, sizes)):
                    rows = piece["input_ids"].shape[0]
                    quiet = hasattr(model, "no_sync") and (replay or n < len(sizes) - 1)
                    if len(sizes) > 1 and not summed:
                        share = labelled[start:start + rows].sum() / labelled.sum()
                        self._piece_weight = float(share)
                    self._piece_ids = piece.get("row_ids", [])
                    self.faults.before_forward(rows)
                    with model.no_sync() if quiet else contextlib.nullcontext():
                        total = total + super().training_step(model, piece, num_items_in_batch)
                    start += rows
            finally:
                self._piece_weight = 1.0
            return total

        def _recover(self, model, inputs, num_items_in_batch, error):
            rows, length = inputs["input_ids"].shape
            while True:
                failed = max(self._sizes(inputs)) if self.piece_rows else rows
                free_memory()
                if failed == 1:
                    ids = ", ".join(map(str, self._piece_ids)) or "?"
                    raise TrainingOutOfMemory(
                        f"training row id {ids} does not fit in GPU memory even alone (batch "
                        f"of {rows} rows, {length} tokens): {self.remedy}; the last checkpoint "
                        f"in {self.args.output_dir} is kept and `make train` resumes from it"
                    ) from error
                self.piece_rows = max(1, failed // 2)
                self.split_from_length = min(length, self.split_from_length or length)
                event = {"optimizer_step": self.state.global_step, "rows": rows,
                         "sequence_length": length, "now_rows_per_piece": self.piece_rows,
                         "error": str(error).splitlines()[0][:200]}
                self.oom_events.append(event)
                log.warning("out of GPU memory in a training step (%d rows, %d tokens): "
                            "splitting into pieces of %d rows, same effective batch",
                            rows, length, self.piece_rows)
                # A backward that failed halfway may have added part of its gradients.
                model.zero_grad(set_to_none=True)
                try:
                    for earlier, items in self._window:
                        self._run_pieces(model, self._prepare_inputs(earlier), items, replay=True)
                    return self._run_pieces(model, inputs, num_items_in_batch)
                except torch.cuda.OutOfMemoryError as again:
                    error = again.with_traceback(None)  # (see training_step)

    return BackoffTrainer


def step_timer():
    """A Trainer callback that times every optimizer step (steady-state throughput)."""
    import time as clock

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._last = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                self._last = clock.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = clock.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

        def on_evaluate(self, args, state, control, **kwargs):
            self._last = None  # evaluation and checkpoints are not training steps

        def on_save(self, args, state, control, **kwargs):
            self._last = None

    return StepTimer()


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqa.io import save_figure_atomic

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_accuracy"], h.get("eval_loss")) for h in history
             if "eval_accuracy" in h]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if evals:
        ax_loss.plot([e[0] for e in evals], [e[2] for e in evals], "o-", label="val loss")
        ax_acc.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:green")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="Validation accuracy",
               ylim=(0, 1))
    ax_acc.axhline(0.25, color="gray", linestyle=":", label="chance")
    ax_acc.legend()
    save_figure_atomic(fig, path)
    plt.close(fig)


# Settings that do not change what training produces; any other change means a new run.
_NOT_TRAINING = {"PRED_BATCH_SIZE", "MAX_NEW_TOKENS", "INFER_MODE", "DATA_TRAIN_ROWS",
                 "DATA_TEST_ROWS", "BASE_PRETRAIN_STEPS", "NUM_THREADS", "DATALOADER_WORKERS",
                 "RETRAIN", "ARTIFACTS_DIR", "DATA_DIR",
                 "UNCHECKPOINTED_LAYERS", "UNCHECKPOINTED_ATTENTION"}  # same gradients, kept or not


def train_signature(config: Config, per_device_batch: int) -> dict:
    """What a training run depends on: settings, train.csv's bytes and the base model."""
    from vqa.io import file_fingerprint

    settings = {k: v for k, v in config.to_json().items() if k not in _NOT_TRAINING}
    return {"settings": {**settings, "PER_DEVICE_BATCH": per_device_batch},
            "train_csv": file_fingerprint(config.data_dir / "train.csv"),
            "base_weights": file_fingerprint(Path(config.resolved_model_id) / "model.safetensors")}


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


def train(config: Config, per_device_batch: int, uncheckpointed_layers: int = 0,
          uncheckpointed_attention: int = 0) -> dict:
    """Fine-tunes LoRA on DATA_DIR/train.csv; returns the metrics written to train_metrics.json.

    A finished run with the same signature is not trained again (RETRAIN=1 forces it); a run
    killed midway resumes from its last checkpoint (one per epoch).
    """
    from transformers import EarlyStoppingCallback, TrainingArguments

    artifacts = config.artifacts_dir
    signature = train_signature(config, per_device_batch)
    metrics_path = artifacts / "train_metrics.json"
    if (not config.retrain and metrics_path.is_file()
            and (artifacts / "lora_adapter" / "adapter_config.json").is_file()):
        previous = json.loads(metrics_path.read_text())
        if previous.get("signature") == signature:
            log.info("already trained with these settings (%s); RETRAIN=1 trains again",
                     metrics_path)
            return previous
    here = distributed.init()
    # Rank 0 sets stale checkpoints aside first; the other ranks then only read.
    if here.is_main:
        resume = _checkpoint_to_resume(artifacts / "checkpoints", signature)
    distributed.barrier()
    if not here.is_main:
        resume = _checkpoint_to_resume(artifacts / "checkpoints", signature)
    if resume:
        log.info("resuming from %s", resume)
    train_rows, val_rows, skipped = split_rows(config)
    processor = load_processor(config)
    model = attach_lora(load_model(config, for_training=True), config,
                        uncheckpointed_layers=uncheckpointed_layers,
                        uncheckpointed_attention=uncheckpointed_attention)
    trainable, total = model.get_nb_trainable_parameters()
    accumulation = gradient_accumulation(config, per_device_batch, here.size)
    device, dtype = device_and_dtype()
    log.info("train rows %d, validation sample %d; micro-batch %d x accumulation %d x %d "
             "rank(s) = %d; trainable %d of %d parameters (%.2f%%) on %s",
             len(train_rows), len(val_rows), per_device_batch, accumulation, here.size,
             per_device_batch * accumulation * here.size, trainable, total,
             100 * trainable / total, device)
    if uncheckpointed_layers or uncheckpointed_attention:
        log.info("the last %d decoder layers keep their activations (not checkpointed), the %d "
                 "below them their attention's", uncheckpointed_layers, uncheckpointed_attention)

    preprocess, compute_metrics = letter_metrics(letter_token_ids(processor.tokenizer))
    steps_per_epoch = math.ceil(len(train_rows) / (per_device_batch * accumulation * here.size))
    args = TrainingArguments(
        output_dir=str(artifacts / "checkpoints"),
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=math.ceil(config.warmup_ratio * steps_per_epoch * config.epochs),
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        logging_steps=max(1, steps_per_epoch // 10),
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
    if here.size == 1 and args.n_gpu > 1:
        # One process drives one GPU. Left alone, Trainer would multiply the micro-batch by
        # the GPUs it sees (DataParallel) and silently double EFFECTIVE_BATCH_SIZE; NPROC=2 is
        # the way to use two.
        args._n_gpu = 1
    trainer = backoff_trainer_class()(
        model=model,
        args=args,
        train_dataset=RowDataset(train_rows),
        eval_dataset=RowDataset(val_rows),
        data_collator=VQACollator(processor, config.data_dir, train=True),
        compute_loss_func=labelled_loss,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience),
                   timer := step_timer()],
        remedy=(f"lower MAX_PIXELS (now {config.max_pixels or 'the processor default'}; each "
                f"halving halves the image tokens) or use a card with more memory"),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    best = trainer.evaluate()  # the best checkpoint, reloaded by load_best_model_at_end

    history = trainer.state.log_history
    steady = timer.seconds[1:] or timer.seconds
    step_seconds = float(np.median(steady)) if steady else None
    metrics = {
        "signature": signature,
        "resumed_from": resume,
        "train_rows": len(train_rows),
        "skipped_train_rows": skipped,
        "val_sample_rows": len(val_rows),
        "world_size": here.size,
        "per_device_batch": per_device_batch,
        "gradient_accumulation": accumulation,
        "effective_batch_size": per_device_batch * accumulation * here.size,
        "uncheckpointed_layers": uncheckpointed_layers,
        "uncheckpointed_attention": uncheckpointed_attention,
        "optimizer_steps": trainer.state.global_step,
        "epochs_run": trainer.state.epoch,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_val_accuracy": best.get("eval_accuracy"),
        "best_val_metrics": best,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        # Steady state: the median optimizer step, the first (warm-up) left out.
        "median_step_seconds": step_seconds,
        "steady_samples_per_second": (per_device_batch * accumulation * here.size / step_seconds
                                      if step_seconds else None),
        "peak_reserved_gib_rank0": (torch.cuda.max_memory_reserved() / 2**30
                                    if torch.cuda.is_available() else None),
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
    plot_curves(history, artifacts / "train_curve.png")
    return metrics
