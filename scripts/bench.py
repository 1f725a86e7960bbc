#!/usr/bin/env python3
"""make bench: vqa's train step and prediction against the reference setup, in one process.

GPU only (a CPU machine gets one line and exit 0). For each model of BENCH_MODELS (default 7B,3B)
it builds a random-init real-size Qwen2.5-VL (vqa/realsize.py), loads it through the product's
4-bit `from_pretrained` path, and runs on the same synthetic rows (random-noise images, a
Korean-length question, four options) at each image size of BENCH_IMAGES:

  train    the reference setup: the HF Trainer with peft's prepare_model_for_kbit_training
           defaults (fp32 casts, reentrant checkpointing), LoRA r32 on q,k,v,o,gate,up,down, the
           vision tower's stock attention, the model's own loss over full-vocabulary logits,
           micro-batch 2, batches prepared in the main process; then vqa's own: the Trainer
           `make train` builds (vqa.train.build_trainer: its training step, its plan's
           micro-batch and kept layers, its DataLoader workers). Both run BENCH_TRAIN_STEPS
           optimizer steps of EFFECTIVE_BATCH_SIZE rows with the same arguments otherwise (AdamW
           2e-4, weight decay 0.01, max_grad_norm 0.3, warmup 0.1, the same seed, so the same
           rows in the same order), each from the same initial adapter; speed is the median
           optimizer step after the first.
  levers   (first image size only) the reference's micro-step with one lever added at a time.
  predict  the reference: generate 16 new tokens at batch 6. Then (first image size) the CPU
           side alone, and one lever at a time. Then vqa's own: the model as `make submit`
           loads it (vqa.model.load_for_inference, an untrained adapter) and its prediction
           function (vqa.predict.predict_rows) at the plan's PRED_BATCH_SIZE; at the largest
           batch within the reference's measured peak (from the largest down, the first whose
           measured peak stays at or below it; a batch the peak model puts above it even
           within the plan's margin is skipped, with a line saying so); and
           INFER_MODE=generate. BENCH_LEVERS=0 leaves out the one-lever-at-a-time rows (of
           prediction and training), once a family's levers are measured.
  rotate   the same model and batch on the same rows with TTA=rotate (each row asked under
           its 4 option shifts, as make submit TTA=rotate asks them) against TTA=none: time per
           test row, and the ratio.
  train    also vqa at the largest micro-batch within the reference's peak (the same descent).
  time     (not in the default list) the time model (vqa/planning/timing.py) against the
           measurement: make train's Trainer at its plan, make submit's scoring at its plan,
           on each image setting (BENCH_IMAGES=448x448,1024x768,mixed); predicted and measured
           seconds per optimizer step and per row (time-train or time-score: one of them).

Prints samples/s or s/item, peak reserved, ours/reference, and the distance to the arithmetic
floor (FLOPs over the bf16 matrix rate measured at start). `make bench CAP=24GiB`
(BENCH_CAP=24GiB) emulates a 24 GiB card (torch.cuda.set_per_process_memory_fraction) for every
phase, and the planner plans for it. BENCH_PROFILE=1 adds torch-profiler tables of one step of
each of vqa's phases. Settings are vqa/config.py's BenchConfig (environment or KEY=value).
`--dry-run --model-dir DIR` runs every phase on CPU with a local (tiny) model, for the tests.
Writes bench.json, bench.md and loss_curves.png to ARTIFACTS_DIR/bench/.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = {"448x448": (448, 448), "1024x768": (1024, 768),
          # phone photos, screenshots and smaller: a competition's mix (BENCH_WORK=time)
          "mixed": [(4032, 3024), (1920, 1080), (1024, 768), (640, 480)]}
REFERENCE_TRAIN_BATCH = 2
REFERENCE_GENERATE_BATCH = 6
SAME_MEMORY_BATCHES = (48, 32, 24, 16, 8, 4)  # tried largest first for the same-memory row


class Bench:
    """Settings, device and the results of one run."""

    def __init__(self, cuda: bool, dry_run: bool, cap_bytes: int | None, out: Path,
                 scratch: Path, settings):
        self.cuda, self.dry_run, self.cap_bytes, self.out = cuda, dry_run, cap_bytes, out
        self.scratch, self.settings = scratch, settings
        self.device = "cuda" if cuda else "cpu"
        self.results: list[dict] = []
        self.curves: dict[str, list[float]] = {}
        self.train_steps = settings.bench_train_steps or (2 if dry_run else 5)
        # Enough rows that a scoring run is steady state (the preparing workers start, the
        # first batch is made while the GPU waits), as on a test set of thousands.
        self.predict_rows = settings.bench_predict_rows or (8 if dry_run else 768)
        self.profile = settings.bench_profile == 1
        self.matmul_tflops = measure_matmul_tflops() if cuda else None

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self):
        import gc

        gc.collect()  # an earlier row's trainer (its optimizer states) must not count here
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocator(self, expandable: bool) -> None:
        """The caching allocator's expandable segments on (vqa's setting) or off (PyTorch's
        default, the reference's), for the memory allocated from now on."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings(f"expandable_segments:{expandable}")

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_reserved() / 2**30, 2)

    def record(self, **row) -> dict:
        self.results.append(row)
        print(json.dumps(row), flush=True)
        return row


def measure_matmul_tflops() -> float:
    """bf16 matrix rate of this card: the ceiling the arithmetic floor is computed against."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12, 1)


def forward_flops(arch, length: int, visual_tokens: int, logit_positions: int) -> float:
    """Matrix FLOPs of one row's forward, as the time model counts them (vqa.planning.timing:
    the language model, lm_head at `logit_positions`, the vision tower with the family's own
    attention: windows or whole images)."""
    from vqa.families import family_for
    from vqa.planning.timing import forward_flops as counted

    return counted(arch, length, visual_tokens, logit_positions,
                   windowed=family_for(arch.family).windowed_vision)


# ---------------------------------------------------------------------------------------------
# Models


def load_base(config, for_training: bool, stock: bool):
    """The 4-bit base as vqa loads it; `stock`: as the reference runs it, with transformers'
    per-window vision attention and its own RMSNorm, rope and MLP kernels."""
    import dataclasses

    from vqa.model import load_model

    model = load_model(dataclasses.replace(config, fused_kernels=0) if stock else config,
                       for_training=for_training)
    if stock:
        model.set_attn_implementation({"vision_config": "sdpa"})
    return model


def reference_lora(config):
    """The reference's adapter: LoRA r32 on q,k,v,o,gate,up,down, peft's defaults."""
    from peft import LoraConfig

    return LoraConfig(r=32, lora_alpha=64, lora_dropout=0.08,
                      target_modules=config.lora_targets.split(","), bias="none",
                      task_type="CAUSAL_LM")


def reference_model(config):
    """The reference setup: peft's defaults around the same 4-bit base and LoRA."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from vqa.model import uses_4bit

    model = load_base(config, for_training=True, stock=True)
    if uses_4bit(config):
        model = prepare_model_for_kbit_training(model)  # fp32 casts, reentrant checkpointing
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(config.seed)
    return get_peft_model(model, reference_lora(config))


def ours_model(config, fp32_casts: bool | None = None):
    from vqa.model import attach_lora, load_model

    return attach_lora(load_model(config, for_training=True), config, fp32_casts=fp32_casts)


def free(bench: Bench):
    """Returns what the last phase left to the card (after its models were deleted)."""
    import gc

    import torch

    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Training


def model_loss(model, batch):
    return model(**batch).loss


class Adapter:
    """The trainable weights as they were when first seen, put back before each timed row, so
    every row trains from the same initial adapter."""

    def __init__(self, model):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()
                        if p.requires_grad}

    def restore(self, model) -> None:
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.initial:
                    param.copy_(self.initial[name])
        model.zero_grad(set_to_none=True)


def trained(bench: Bench, trainer, effective: int) -> dict:
    """`trainer.train()` for its max_steps: the loss of each optimizer step, the median step
    after the first, the peak reserved."""
    from vqa.trainer import step_seconds

    bench.reset_peak()
    trainer.train()
    bench.sync()
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    seconds = step_seconds(trainer)
    steady = statistics.median(seconds[1:] or seconds)
    return {"losses": losses, "step_s": round(steady, 3),
            "samples_per_s": round(effective / steady, 3), "peak_reserved_gib": bench.peak_gib()}


def reference_trainer(bench: Bench, case, model):
    """The reference's training: the HF Trainer with the recipe's arguments, the model's own
    loss, micro-batch 2, every batch prepared in the main process."""
    from transformers import Trainer

    from vqa.planning.planner import gradient_accumulation
    from vqa.realsize import MODEL_INPUTS
    from vqa.train import RowDataset, training_arguments
    from vqa.trainer import step_timer

    effective = case.config.effective_batch_size
    accumulation = gradient_accumulation(effective, REFERENCE_TRAIN_BATCH, 1)
    args = training_arguments(case.config, REFERENCE_TRAIN_BATCH, accumulation,
                              len(case.train) // effective, bench.scratch / "trainer",
                              max_steps=bench.train_steps)
    args.dataloader_num_workers = 0  # the Trainer's default

    def collate(rows):
        return {k: v for k, v in case.train_collate(rows).items() if k in MODEL_INPUTS}

    return Trainer(model=model, args=args, train_dataset=RowDataset(case.train),
                   data_collator=collate, callbacks=[step_timer()])


def product_trainer(bench: Bench, case, model, plan):
    """`make train`'s own Trainer (vqa.train.build_trainer) with `plan`, for bench.train_steps."""
    from vqa.model import keep_layer_activations
    from vqa.train import build_trainer

    keep_layer_activations(model, plan.uncheckpointed_layers, plan.uncheckpointed_attention)
    return build_trainer(case.config, plan, model, case.processor, case.train, [],
                         bench.scratch / "trainer", max_steps=bench.train_steps)


def micro_steps(bench: Bench, model, loss_fn, collate, rows: list[dict], micro: int,
                repeats: int = 3) -> dict:
    """Median time of a forward+backward of one micro-batch (no optimizer step): for levers."""
    import torch

    from vqa.realsize import MODEL_INPUTS

    model.train()
    batch = {k: v.to(bench.device) for k, v in collate(rows[:micro]).items() if k in MODEL_INPUTS}
    bench.reset_peak()
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast(bench.device, dtype=torch.bfloat16, enabled=bench.cuda):
            loss = loss_fn(model, batch)
        loss.backward()
        bench.sync()
        seconds.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    steady = statistics.median(seconds[1:])
    return {"step_s": round(steady, 3), "samples_per_s": round(micro / steady, 3),
            "peak_reserved_gib": bench.peak_gib()}


def profile(bench: Bench, name: str, fn) -> None:
    """One call of `fn` under torch.profiler; the top operators by device time to a file."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        bench.sync()
    sort = "cuda_time_total" if bench.cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    (bench.out / f"profile_{name}.txt").write_text(table)
    print(f"profile {name}:\n{table[:6000]}", flush=True)


def attempt(bench: Bench, fn) -> dict:
    """fn's result, or an out-of-memory mark (the cap is part of what is measured)."""
    import torch

    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        free(bench)
        return {"oom": True, "peak_reserved_gib": bench.peak_gib()}


class Case:
    """One image size: its data, rows, the product's config and the plan make train and make
    submit would run with (vqa.planning.runplan.make_run_plan)."""

    def __init__(self, name, config, arch, data, train, test, plan, processor):
        from vqa.data import VQACollator

        self.name, self.config, self.arch, self.data = name, config, arch, data
        self.train, self.test, self.plan, self.processor = train, test, plan, processor
        self.train_collate = VQACollator(processor, data, train=True)
        self.predict_collate = VQACollator(processor, data, train=False)
        sample = self.predict_collate(test[:1])
        self.length = sample["input_ids"].shape[1]
        self.visual = int(sample["image_grid_thw"].prod()) // 4


def train_row(bench: Bench, case: Case, setup: str, micro: int, result: dict, **extra) -> dict:
    floor = 3 * forward_flops(case.arch, case.length + 2, case.visual, 3)  # fwd, recompute, bwd
    distance = None
    if bench.matmul_tflops and result.get("samples_per_s"):
        distance = round(1 / result["samples_per_s"] / (floor / (bench.matmul_tflops * 1e12)), 1)
    return bench.record(model=case.arch.name, images=case.name, work="train", setup=setup,
                        micro_batch=micro, sequence_length=case.length + 2,
                        visual_tokens=case.visual, x_floor=distance, **result, **extra)


def surely_over(case: Case, work: str, batch: int, predicted: float, limit_gib: float) -> bool:
    """Whether a batch's predicted peak reserved (bytes) is so far above `limit_gib` that the
    peak model's calibrated error (the plan's margin) cannot bring it under: the same-memory
    descent skips it, and says so, instead of spending a measured run on it."""
    from vqa.planning.hardware import GIB
    from vqa.planning.planner import margin_for

    low = predicted * (1 - margin_for(case.arch)) / GIB
    if low <= limit_gib:
        return False
    print(f"{work} {case.name} batch {batch}: skipped, predicted {predicted / GIB:.2f} GiB "
          f"reserved, at least {low:.2f} within the peak model's margin, above the "
          f"reference's {limit_gib} GiB", flush=True)
    return True


def _speedup(row: dict | None, reference: dict, key: str = "samples_per_s") -> None:
    if row and row.get(key) and reference.get(key):
        ratio = (row[key] / reference[key] if key == "samples_per_s"
                 else reference[key] / row[key])
        row["speedup"] = round(ratio, 2)


def train_levers(bench: Bench, case: Case, model) -> None:
    """One lever at a time on the reference's model (peft's) and micro-batch, each added to the
    model before it; then the planner's micro-batch, and vqa's allocator setting."""
    import torch

    from vqa.speed import answer_loss, use_grouped_vision_attention

    base = model.base_model.model

    def lever(setup, loss_fn, micro=REFERENCE_TRAIN_BATCH):
        train_row(bench, case, setup, micro, attempt(bench, lambda: micro_steps(
            bench, model, loss_fn, case.train_collate, case.train, micro)))

    lever("reference (micro-step)", model_loss)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lever("+ non-reentrant checkpointing", model_loss)
    use_grouped_vision_attention(base)
    lever("+ grouped vision attention", model_loss)
    lever("+ loss at the labelled positions", answer_loss)
    if bench.cuda:
        for p in base.parameters():  # back to the loaded bf16: no fp32 casts
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        lever("+ bf16 embeddings, lm_head, norms (no fp32 casts)", answer_loss)
    if fused_kernels(bench, case, base):
        lever("+ fused RMSNorm, rope, SiLU-mul (Liger)", answer_loss)
    lever(f"+ micro-batch {case.plan.per_device_batch} (planner)", answer_loss,
          case.plan.per_device_batch)
    bench.allocator(expandable=True)  # vqa's setting (vqa/__init__.py)
    lever("+ expandable allocator segments", answer_loss, case.plan.per_device_batch)


def bench_train(bench: Bench, cases: list[Case]) -> None:
    import dataclasses

    from vqa.model import keep_layer_activations
    from vqa.planning.planner import gradient_accumulation, train_estimate
    from vqa.speed import answer_loss

    first = cases[0]
    effective = first.config.effective_batch_size
    references = {}
    bench.allocator(expandable=False)  # the reference runs with PyTorch's default allocator
    model = reference_model(first.config)
    start = Adapter(model)
    for case in cases:
        start.restore(model)
        references[case.name] = train_row(bench, case, "reference", REFERENCE_TRAIN_BATCH, attempt(
            bench, lambda: trained(bench, reference_trainer(bench, case, model), effective)))
        bench.curves[f"{case.arch.name.split('/')[-1]} {case.name} reference"] = \
            references[case.name].get("losses", [])
    if bench.settings.bench_levers:
        train_levers(bench, first, model)
    del model, start
    free(bench)
    bench.allocator(expandable=True)  # vqa's setting (vqa/__init__.py), the levers' last

    model = ours_model(first.config)
    start = Adapter(model)
    for case in cases:
        plan = case.plan
        start.restore(model)
        ours = train_row(bench, case, "vqa (make train)", plan.per_device_batch, attempt(
            bench, lambda: trained(bench, product_trainer(bench, case, model, plan),
                                   effective)),
            uncheckpointed_layers=plan.uncheckpointed_layers,
            uncheckpointed_attention=plan.uncheckpointed_attention)
        reference = references[case.name]
        _speedup(ours, reference)
        bench.curves[f"{case.arch.name.split('/')[-1]} {case.name} vqa"] = ours.get("losses", [])
        # The fastest micro-batch within the reference's peak: from the largest down (the
        # plan's own first, when the plan keeps layers), the first whose measured peak stays at
        # or below it, every layer checkpointed, from the same initial adapter as every other
        # row.
        limit = reference.get("peak_reserved_gib")
        if limit and (ours.get("peak_reserved_gib") or limit + 1) <= limit:
            limit = None  # vqa's own run is within it already
        kept = plan.uncheckpointed_layers or plan.uncheckpointed_attention
        for candidate in [b for b in (64, 32, 16, 8, 4, 2, 1) if b < plan.per_device_batch
                          or (b == plan.per_device_batch and kept)] if limit else []:
            if surely_over(case, "train", candidate, train_estimate(
                    case.config, case.arch, case.work, candidate).reserved, limit):
                continue
            smaller = dataclasses.replace(
                plan, per_device_batch=candidate, uncheckpointed_layers=0,
                uncheckpointed_attention=0,
                gradient_accumulation=gradient_accumulation(effective, candidate, 1))
            start.restore(model)
            same = train_row(bench, case, "vqa, largest micro-batch within the reference's "
                             "peak memory", candidate, attempt(bench, lambda: trained(
                                 bench, product_trainer(bench, case, model, smaller),
                                 effective)))  # noqa: B023 - called at once
            if same.get("peak_reserved_gib") and same["peak_reserved_gib"] <= limit:
                _speedup(same, reference)
                break
        print(f"train {case.arch.name} {case.name}: vqa {ours.get('samples_per_s')} vs "
              f"reference {reference.get('samples_per_s')} samples/s", flush=True)
    keep_layer_activations(model, 0)
    if bench.profile:
        profile(bench, "train", lambda: micro_steps(
            bench, model, answer_loss, first.train_collate, first.train,
            first.plan.per_device_batch, repeats=1))
    del model
    free(bench)
    if bench.settings.bench_other_casts == 1 and bench.cuda:
        # The other choice of vqa.model.FP32_CASTS, same rows: its speed and loss curve.
        from vqa.model import FP32_CASTS

        model = ours_model(first.config, fp32_casts=not FP32_CASTS)
        other = train_row(bench, first, f"vqa with FP32_CASTS={not FP32_CASTS}",
                          first.plan.per_device_batch, attempt(bench, lambda: trained(
                              bench, product_trainer(bench, first, model, first.plan),
                              effective)))
        bench.curves[f"{first.arch.name.split('/')[-1]} {first.name} vqa, FP32_CASTS="
                     f"{not FP32_CASTS}"] = other.get("losses", [])
        del model
        free(bench)
    bench.write()


# ---------------------------------------------------------------------------------------------
# Prediction


def reference_generate(bench: Bench, model, collate, rows: list[dict]) -> None:
    import torch

    with torch.inference_mode():
        for i in range(0, len(rows), REFERENCE_GENERATE_BATCH):
            batch = {k: v.to(bench.device) for k, v in collate(
                rows[i:i + REFERENCE_GENERATE_BATCH]).items() if torch.is_tensor(v)}
            model.generate(**batch, max_new_tokens=16, do_sample=False)


def timed_predict(bench: Bench, fn, rows: int) -> dict:
    """One warm-up call on a batch, then the whole run timed."""
    def run():
        fn(warm=True)
        bench.reset_peak()
        started = time.perf_counter()
        fn(warm=False)
        bench.sync()
        seconds = time.perf_counter() - started
        return {"s_per_item": round(seconds / rows, 4), "rows": rows,
                "peak_reserved_gib": bench.peak_gib()}
    return attempt(bench, run)


def timed_preparation(case: Case, batch: int) -> dict:
    """What the CPU side of prediction costs alone: images decoded and processed in batches."""
    started = time.perf_counter()
    for i in range(0, len(case.test), batch):
        case.predict_collate(case.test[i:i + batch])
    seconds = time.perf_counter() - started
    return {"s_per_item": round(seconds / len(case.test), 4), "rows": len(case.test),
            "peak_reserved_gib": None}


def predict_row(bench: Bench, case: Case, setup: str, batch: int, result: dict) -> dict:
    floor = forward_flops(case.arch, case.length, case.visual, 1)
    distance = None
    if bench.matmul_tflops and result.get("s_per_item"):
        distance = round(result["s_per_item"] / (floor / (bench.matmul_tflops * 1e12)), 1)
    return bench.record(model=case.arch.name, images=case.name, work="predict", setup=setup,
                        batch=batch, sequence_length=case.length, visual_tokens=case.visual,
                        x_floor=distance, **result)


def predict_levers(bench: Bench, first: Case, base, model, lever_row) -> None:
    """The prediction levers one at a time, first image size, at the planner's batch, each
    added to the model before it (`model` is the reference's peft model around `base`)."""
    from vqa import predict
    from vqa.data import letter_token_ids
    from vqa.model import adapter_in_compute_dtype
    from vqa.speed import (chunk_vision_tower, fuse_inference_linears, fuse_inference_mlps,
                           letters_only_head, use_grouped_vision_attention)

    batch = first.plan.pred_batch_size
    predict_row(bench, first, "preparation alone (images + processor, one process)", batch,
                timed_preparation(first, batch))
    predict.ROPE_ON_CPU = False
    lever_row(first, "score, stock vision attention, prepared in-process", batch)
    use_grouped_vision_attention(base)
    lever_row(first, "+ grouped vision attention", batch)
    adapter_in_compute_dtype(model)  # as vqa.model.load_for_inference does
    lever_row(first, "+ LoRA weights in bf16", batch)
    fuse_inference_mlps(model)
    fuse_inference_linears(model)
    chunk_vision_tower(model)
    lever_row(first, "+ LoRA merged on the fly, MLPs in chunks of tokens", batch)
    predict.ROPE_ON_CPU = True
    lever_row(first, "+ rope positions with the batch on the CPU", batch)
    letters_only_head(model, letter_token_ids(first.processor.tokenizer))
    free(bench)
    lever_row(first, "+ output layer cut to the four letters", batch)
    if fused_kernels(bench, first, base):
        lever_row(first, "+ fused RMSNorm, rope, SiLU-mul (Liger)", batch)
    predict.ROPE_ON_CPU = True  # the product's setting, whatever the levers left


def fused_kernels(bench: Bench, case: Case, base) -> bool:
    """vqa/kernels.py on `base` (a lever row): whether they apply here (a GPU, the family)."""
    from vqa.families import family_for
    from vqa.kernels import use_fused_kernels

    return bench.cuda and bool(use_fused_kernels(base, family_for(case.arch.family)))


def bench_predict(bench: Bench, cases: list[Case]) -> None:
    from peft import get_peft_model

    from vqa.model import load_for_inference, prepare_for_inference
    from vqa.planning.planner import infer_estimate
    from vqa.predict import predict_rows

    # An untrained adapter on the base, as `make submit` loads a trained one (unmerged).
    bench.allocator(expandable=False)  # the reference runs with PyTorch's default allocator
    first = cases[0]
    base = load_base(first.config, for_training=False, stock=True)
    reference = get_peft_model(base, reference_lora(first.config))
    reference.eval()  # peft's default: the adapter in fp32
    adapter = bench.scratch / "untrained-adapter"
    reference.save_pretrained(adapter)  # what vqa's rows load, as make submit loads its own
    model = reference

    def generate(case, subset):
        return lambda warm: reference_generate(
            bench, model, case.predict_collate,
            subset[:REFERENCE_GENERATE_BATCH] if warm else subset)

    def ours(case, mode, batch, subset, workers=None):
        workers = case.config.loader_workers(bench.cuda) if workers is None else workers
        return lambda warm: predict_rows(model, case.processor, subset[:batch] if warm else subset,
                                         case.data, batch_size=batch, mode=mode, workers=workers)

    def lever_row(case, setup, batch):  # half the rows: for the differences between levers
        rows = case.test[:max(batch, len(case.test) // 2)]
        return predict_row(bench, case, setup, batch, timed_predict(
            bench, ours(case, "score", batch, rows, workers=0), len(rows)))

    few = max(REFERENCE_GENERATE_BATCH, min(96, bench.predict_rows // 2))
    references = {}
    for case in cases:
        rows = case.test[:few]
        references[case.name] = predict_row(
            bench, case, "reference: generate, stock vision attention", REFERENCE_GENERATE_BATCH,
            timed_predict(bench, generate(case, rows), len(rows)))
    bench.allocator(expandable=True)  # vqa's setting (vqa/__init__.py)
    if bench.settings.bench_levers:
        predict_levers(bench, first, base, model, lever_row)
    model = reference = base = None  # the closures above read `model`: rebound below
    free(bench)

    # vqa's own rows: the model as make submit loads it, for generate (the whole lm_head), then
    # prepared for scoring as make submit prepares it; predict_rows at the plan's batch.
    model, _ = load_for_inference(first.config, adapter, first.processor, mode="generate")
    generated = {case.name: predict_row(
        bench, case, "vqa: INFER_MODE=generate", REFERENCE_GENERATE_BATCH,
        timed_predict(bench, ours(case, "generate", REFERENCE_GENERATE_BATCH, case.test[:few]),
                      few)) for case in cases}
    prepare_for_inference(model, first.processor, "score")
    for case in cases:
        reference, batch = references[case.name], case.plan.pred_batch_size
        workers = case.config.loader_workers(bench.cuda)
        mine = predict_row(bench, case, "vqa: score (make submit)", batch, {
            **timed_predict(bench, ours(case, "score", batch, case.test), len(case.test)),
            "preparing_workers": workers})
        # The fastest batch within the reference's peak: larger batches are faster, so the
        # first, from the largest down, whose measured peak stays at or below it.
        same_memory = None
        limit = reference.get("peak_reserved_gib")
        if limit and (mine.get("peak_reserved_gib") or limit + 1) <= limit:
            limit = None  # vqa's own run is within it already
        for candidate in [b for b in SAME_MEMORY_BATCHES if b < batch] if limit else []:
            if surely_over(case, "score", candidate, infer_estimate(
                    case.config, case.arch, case.work, candidate).reserved, limit):
                continue
            row = predict_row(bench, case, "vqa: score, largest batch within the reference's "
                              "peak memory", candidate, timed_predict(
                                  bench, ours(case, "score", candidate, case.test),
                                  len(case.test)))
            if row.get("peak_reserved_gib") and row["peak_reserved_gib"] <= limit:
                same_memory = row
                break
        for result in (mine, same_memory, generated[case.name]):
            _speedup(result, reference, "s_per_item")
        print(f"predict {case.arch.name} {case.name}: vqa {mine.get('s_per_item')} vs reference "
              f"{reference.get('s_per_item')} s/item; within the reference's memory "
              f"{same_memory and same_memory.get('speedup')}x", flush=True)
    if bench.profile:
        profile(bench, "score", lambda: predict_rows(
            model, first.processor, first.test[:first.plan.pred_batch_size], first.data,
            batch_size=first.plan.pred_batch_size, mode="score"))
    model = None
    free(bench)
    bench.write()


def untrained_adapter(bench: Bench, config) -> Path:
    """An untrained reference LoRA saved for the model of `config` (made once; one per model:
    an adapter fits only the model it was made on), for loading as make submit loads its own."""
    from peft import get_peft_model

    adapter = bench.scratch / f"untrained-adapter-{Path(config.resolved_model_id).name}"
    if not (adapter / "adapter_config.json").is_file():
        base = load_base(config, for_training=False, stock=False)
        get_peft_model(base, reference_lora(config)).save_pretrained(adapter)
        base = None
        free(bench)
    return adapter


def bench_rotate(bench: Bench, cases: list[Case]) -> None:
    """TTA=rotate against plain scoring, in the same run on the same rows at the plan's batch,
    with the model as make submit loads it (an untrained adapter)."""
    from vqa.model import load_for_inference
    from vqa.options import SHIFTS, expanded, rotated_ids
    from vqa.predict import predict_rows

    first = cases[0]
    adapter = untrained_adapter(bench, first.config)
    bench.allocator(expandable=True)
    model, _ = load_for_inference(first.config, adapter, first.processor, mode="score")
    for case in cases:
        batch, rows = case.plan.pred_batch_size, case.test
        workers = case.config.loader_workers(bench.cuda)

        def ours(asked):
            return lambda warm: predict_rows(model, case.processor,
                                             asked[:batch] if warm else asked, case.data,
                                             batch_size=batch, mode="score", workers=workers)

        plain = predict_row(bench, case, "vqa: score, TTA=none", batch,
                            timed_predict(bench, ours(rows), len(rows)))
        asked = expanded(rows, rotated_ids(rows, "rotate"))
        rotated = predict_row(bench, case, "vqa: score, TTA=rotate (time per test row)", batch,
                              timed_predict(bench, ours(asked), len(rows)))
        if rotated.get("x_floor"):
            rotated["x_floor"] = round(rotated["x_floor"] / SHIFTS, 1)  # per row asked
        if plain.get("s_per_item") and rotated.get("s_per_item"):
            rotated["x_plain_time"] = round(rotated["s_per_item"] / plain["s_per_item"], 2)
        print(f"rotate {case.arch.name} {case.name}: TTA=rotate {rotated.get('s_per_item')} vs "
              f"TTA=none {plain.get('s_per_item')} s per test row "
              f"({rotated.get('x_plain_time')}x) at batch {batch}", flush=True)
    model = None
    free(bench)
    bench.write()


def bench_time(bench: Bench, cases: list[Case], parts: tuple[str, ...] = ("train", "score")
               ) -> None:
    """Predicted (vqa/planning/timing.py, on this card's published rates) against measured:
    a training step of make train's Trainer and a scoring row of make submit's, at the plan."""
    import torch

    from vqa.families import family_for
    from vqa.model import load_for_inference
    from vqa.planning import timing
    from vqa.planning.hardware import gpu_table
    from vqa.predict import predict_rows

    known = timing.card_named(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(
        0).total_memory) if bench.cuda else None
    card_name, card = known or (timing.H200, gpu_table()[timing.H200])
    first = cases[0]
    windowed = family_for(first.arch.family).windowed_vision

    def row(case, work, batch, cost, kind, per, measured, cpu_s=0.0, **extra):
        """`cost` over `per` (an optimizer step's micro-batches, a run's rows), recorded in
        parts so that scripts/fit_time.py can fit the time model's factors on them."""
        predicted = (timing.seconds(cost, card, kind) + cpu_s) / per
        error = (round(100 * (measured / predicted - 1), 1) if predicted and measured else None)
        parts = {"flops": cost.flops / per, "elements": cost.elements / per,
                 "weight_bytes": cost.weight_bytes / per, "decode_steps": cost.decode_steps / per,
                 "cpu_s": round(cpu_s / per, 5)}
        return bench.record(model=case.arch.name, images=case.name, work=work, setup=f"time "
                            f"model: {work}", batch=batch, kind=kind,
                            predicted_s=round(predicted, 4), measured_s=measured,
                            error_percent=error, card=card_name, cost=parts, **extra)

    loaded = time.perf_counter()
    model = ours_model(first.config) if "train" in parts else None
    load_s = round(time.perf_counter() - loaded, 1)
    for case in cases if "train" in parts else []:
        plan, work = case.plan, case.work
        effective = case.config.effective_batch_size
        result = attempt(bench, lambda: trained(bench, product_trainer(bench, case, model, plan),
                                                effective))
        steps = max(1, -(-len(work.train_lengths) // effective))
        cost = timing.train_epoch_cost(
            case.arch, work.train_lengths, work.train_visual, plan.per_device_batch,
            kept_layers=plan.uncheckpointed_layers, kept_attention=plan.uncheckpointed_attention,
            seed=case.config.seed, windowed=windowed)
        # an optimizer step is effective / micro micro-batches
        row(case, "train step", plan.per_device_batch, cost, "train", steps, result.get("step_s"),
            peak_reserved_gib=result.get("peak_reserved_gib"), load_s=load_s)
    model = None
    free(bench)
    if "score" not in parts:
        bench.write()
        return
    loaded = time.perf_counter()
    model, _ = load_for_inference(first.config, untrained_adapter(bench, first.config),
                                  first.processor, mode="score")
    load_s = round(time.perf_counter() - loaded, 1)
    for case in cases:
        batch, rows = case.plan.pred_batch_size, case.test
        workers = case.config.loader_workers(bench.cuda)
        result = timed_predict(bench, lambda warm, rows=rows, batch=batch, case=case: predict_rows(
            model, case.processor, rows[:batch] if warm else rows, case.data, batch_size=batch,
            mode="score", workers=workers), len(rows))
        # the GPU waits while one worker prepares the first batch; the others keep pace
        prepared = timed_preparation(case, batch)["s_per_item"]
        # the test rows alone: the planned prediction rows also hold make eval's
        cost = timing.predict_cost(case.arch, case.work.predict_lengths[:len(rows)],
                                   case.work.predict_visual[:len(rows)], batch,
                                   windowed=windowed)
        row(case, "score row", batch, cost, "score", len(rows), result.get("s_per_item"),
            cpu_s=prepared * min(batch, len(rows)), prepare_row_s=prepared,
            peak_reserved_gib=result.get("peak_reserved_gib"), load_s=load_s)
    model = None
    free(bench)
    bench.write()


# ---------------------------------------------------------------------------------------------


def bench_model(bench: Bench, model_dir: Path, scratch: Path) -> None:
    from vqa.config import load_config
    from vqa.data import read_table
    from vqa.model import load_processor
    from vqa.planning.hardware import GIB
    from vqa.planning.runplan import make_run_plan
    from vqa.planning.shapes import architecture_for
    from vqa.realsize import write_synthetic_data

    cases = []
    default_images = "448x448" if bench.dry_run else ",".join(IMAGES)
    for size_name in bench.settings.listed("bench_images", default_images):
        data = scratch / f"data-{size_name}"
        if not (data / "train.csv").is_file():
            # 64 distinct images, shared by the rows in turn: each row is still decoded and
            # processed; writing 848 PNGs of noise at 1024x768 took ~95 s of the card's time
            write_synthetic_data(data, 16 * bench.train_steps, bench.predict_rows,
                                 IMAGES[size_name], images=64)
        settings = [f"MODEL_ID={model_dir}", f"DATA_DIR={data}", "QUANT=4bit",
                    f"ARTIFACTS_DIR={scratch / 'artifacts'}"]
        if bench.dry_run:  # CPU: every code path, small steps
            settings.append("EFFECTIVE_BATCH_SIZE=4")
        if bench.cap_bytes:
            settings.append(f"TARGET_GPU_MEMORY={bench.cap_bytes / GIB:.2f}GiB")
        config = load_config(settings, environ={})
        arch, _ = architecture_for(config.resolved_model_id)
        processor = load_processor(config)
        made = make_run_plan(config, processor=processor)
        plan = made.plan
        print(f"{arch.name} {size_name}: planner's PER_DEVICE_BATCH={plan.per_device_batch} "
              f"UNCHECKPOINTED_LAYERS={plan.uncheckpointed_layers} UNCHECKPOINTED_ATTENTION="
              f"{plan.uncheckpointed_attention} PRED_BATCH_SIZE={plan.pred_batch_size} "
              f"({plan.verdict})", flush=True)
        cases.append(Case(size_name, config, arch, data,
                          read_table(data / "train.csv", with_answer=True).to_dict("records"),
                          read_table(data / "test.csv", with_answer=False).to_dict("records"),
                          plan, processor))
        cases[-1].work = made.work  # every row's length and visual tokens, as planned
    works = bench.settings.listed("bench_work", "predict,rotate,train")
    if "predict" in works:
        bench_predict(bench, cases)
    if "rotate" in works:
        bench_rotate(bench, cases)
    parts = tuple(p for p in ("train", "score") if "time" in works or f"time-{p}" in works)
    if parts:
        bench_time(bench, cases, parts)
    if "train" in works:
        bench_train(bench, cases)


def markdown(bench: Bench, header: str) -> str:
    lines = [header, "", "| model | images | work | setup | batch | speed | peak reserved GiB | "
             "x floor | vqa / reference |", "|---|---|---|---|---|---|---|---|---|"]
    timed = [r for r in bench.results if "predicted_s" in r]
    for r in bench.results:
        if "predicted_s" in r:
            continue
        if r["work"] == "train":
            speed = f"{r.get('samples_per_s')} samples/s ({r.get('step_s')} s/step)"
            batch = r["micro_batch"]
        else:
            speed = f"{r.get('s_per_item')} s/item"
            batch = r["batch"]
        if r.get("oom"):
            speed = "out of memory"
        ratio = f"{r['speedup']}x" if r.get("speedup") else ""
        lines.append(f"| {r['model'].split('/')[-1]} | {r['images']} | {r['work']} | "
                     f"{r['setup']} | {batch} | {speed} | {r['peak_reserved_gib'] or '-'} | "
                     f"{r['x_floor'] or '-'} | {ratio} |")
    if timed:
        lines += ["", "| model | images | work | batch | predicted s | measured s | error % | "
                  "peak reserved GiB |", "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r['model'].split('/')[-1]} | {r['images']} | {r['work']} | "
                         f"{r['batch']} | {r['predicted_s']} | {r['measured_s']} | "
                         f"{r['error_percent']} | {r.get('peak_reserved_gib') or '-'} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqa.io import save_figure_atomic

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, "o-" if "vqa" in label else "s--",
                label=label)
    ax.set(xlabel="optimizer step (same rows for both)", ylabel="training loss",
           title="Loss: reference vs vqa")
    ax.legend(fontsize=7)
    save_figure_atomic(fig, path)
    plt.close(fig)


def main() -> int:
    import torch

    from vqa.realsize import bench_model_id, bench_run, build_random_model

    run = bench_run("bench", __doc__.splitlines()[0], "/tmp/vqa-bench",
                    "CPU, tiny model, no timing claims")
    if run is None:
        return 0
    args, cuda, out, scratch, cap_bytes = (run.args, run.cuda, run.out, run.scratch,
                                           run.cap_bytes)
    if cap_bytes and cuda:
        torch.cuda.set_per_process_memory_fraction(
            cap_bytes / torch.cuda.get_device_properties(0).total_memory)
    bench = Bench(cuda, args.dry_run, cap_bytes, out, scratch, run.settings)
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run: no speed claims)"
    header = (f"# make bench: {device}, {time.strftime('%Y-%m-%d')}, cap "
              f"{run.settings.bench_cap or 'none'}, bf16 matmul {bench.matmul_tflops or '-'} "
              f"TFLOP/s")

    def write():
        (out / "bench.json").write_text(json.dumps(
            {"header": header, "results": bench.results, "curves": bench.curves}, indent=2))
        (out / "bench.md").write_text(markdown(bench, header))
        if bench.curves:
            plot_curves(bench.curves, out / "loss_curves.png")

    bench.write = write
    names = run.settings.listed("bench_models", "7B,3B")
    for name in ([args.model_dir] if args.model_dir else names):
        started = time.perf_counter()
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            model_dir = build_random_model(bench_model_id(name),
                                           scratch / f"model-{name.replace('/', '--')}")
        print(f"model {model_dir}: built in {time.perf_counter() - started:.0f} s", flush=True)
        bench_model(bench, model_dir, scratch / Path(str(model_dir)).name)
    write()
    print(markdown(bench, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
