#!/usr/bin/env python3
"""make bench-memory: the peak-VRAM model (vqa/planning/peaks.py) against measured peaks, on a grid.

GPU only. Builds random-init real-size Qwen2.5-VL-3B and -7B (vqa/realsize.py; BENCH_MODELS
picks), loads each through the product's 4-bit `from_pretrained` path, and on synthetic rows at
448x448, 1024x768, 1400x1400 and 1400x1400 under MAX_PIXELS=1003520 measures, for two batch sizes
each:
  - train:    two optimizer steps of the Trainer `make train` builds (vqa.train.build_trainer:
              its training step with LoRA r32 on q,k,v,o,gate,up,down, gradient checkpointing,
              AdamW, bf16 autocast, the loss at the labelled positions, its DataLoader workers)
              at that micro-batch, each row from the same initial adapter;
  - score / generate: vqa's predict_rows on one batch, the model loaded as `make submit`
              loads it (vqa.model.load_for_inference) with an untrained adapter.
Each row prints predicted vs measured peak allocated and reserved (torch.cuda.max_memory_*), and
the error of the reserved prediction; the target is within 10% on every row. Prediction rows also
report the peak up to the end of the vision tower and the peak after it (the language model's),
the two phases the memory model sizes separately.

BENCH_MODELS=3B,7B, BENCH_IMAGES=448x448,..., BENCH_WORK=train,score,generate and
BENCH_BATCHES="score=8,24 generate=2,6 train=2,4" pick part of the grid; BENCH_ROWS (2048) sets
the rows per image size (the planner's prediction batch can hold them all). Settings are
vqa/config.py's BenchConfig (environment or KEY=value, as for every stage).
BENCH_UNCHECKPOINTED=0,7,14,0+28 also times the training step at the grid's largest training
batch with the last k decoder layers not checkpointed (k+j: and the j below them checkpointing
only their MLP), with the planner's prediction (memory spent on less recomputation).

The grid runs uncapped, so every row is measured. CAP=24GiB adds, per image size, the
planner's own choices for a card of that size, each measured under that cap emulated with
torch.cuda.set_per_process_memory_fraction: they must not run out of memory, and the report shows
how much of the cap they use and what the memory buys: the planned training step (with its
UNCHECKPOINTED_LAYERS and UNCHECKPOINTED_ATTENTION) is timed against the same micro-batch with
every layer checkpointed (18 more steps; BENCH_STEP_TIMES=0 skips that). A scoring batch
above MAX_PRED_BATCH (e.g. BENCH_BATCHES="score=1388") is also timed on the same rows in
batches of MAX_PRED_BATCH, the ceiling the planner keeps because of it.

--dry-run --model-dir DIR runs the same grid on CPU with a local model (the embedded tiny one):
every code path but the CUDA measurement, for the test suite.
On a GPU, each model's training and prediction run in fresh processes of their own (as
`make train` and `make submit` do), so no phase inherits another's cached allocator segments.
Writes bench_memory.json and bench_memory.md to ARTIFACTS_DIR/bench-memory/.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = [("448x448", (448, 448), None), ("1024x768", (1024, 768), None),
          ("1400x1400", (1400, 1400), None), ("1400x1400 capped", (1400, 1400), 1003520)]
BATCHES = {"train": (2, 4), "score": (8, 24), "generate": (2, 6)}


def images(settings) -> list:
    """The grid's image settings; BENCH_IMAGES=448x448,... picks some by name."""
    wanted = settings.listed("bench_images", ",".join(name for name, _, _ in IMAGES))
    return [i for i in IMAGES if i[0] in wanted]


def works(settings) -> list[str]:
    """BENCH_WORK=train,score,generate (the default: all three) picks the kinds of work."""
    wanted = settings.listed("bench_work", "train,score,generate")
    return [w for w in ("train", "generate", "score") if w in wanted]


def batches(settings, work: str) -> tuple[int, ...]:
    """The grid's batch sizes for `work`; BENCH_BATCHES="score=8,24,48 ..." overrides some."""
    for item in settings.bench_batches.split():
        name, _, sizes = item.partition("=")
        if name == work:
            return tuple(int(b) for b in sizes.split(","))
    return BATCHES[work]


class PhasePeaks:
    """Splits a prediction's peak at the end of the vision tower: a forward hook on it reads the
    peak so far (the vision phase's) and resets the counters, so the peak read after the call
    is the language model's."""

    def __init__(self, model, cuda: bool):
        from vqa.speed import inner_model

        self.vision = None
        if cuda:
            inner_model(model).model.visual.register_forward_hook(self._after_vision)

    def _after_vision(self, *_):
        import torch

        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        if self.vision is None or allocated > self.vision[0]:
            self.vision = (allocated, reserved)
        torch.cuda.reset_peak_memory_stats()


def measure(fn, cuda: bool, cap_bytes: int | None = None, phases: PhasePeaks | None = None
            ) -> dict:
    """Runs fn and returns its peak allocated/reserved in GiB (None on CPU), or OOM; with
    `cap_bytes`, under a card of that size (set_per_process_memory_fraction), else uncapped.
    With `phases`, also the vision tower's peak and the language model's."""
    import gc

    import torch

    from vqa.planning.hardware import GIB
    from vqa.trainer import TrainingOutOfMemory

    gc.collect()  # an earlier row's trainer (its optimizer states) must not count here
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes or total) / total))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if phases is not None:
        phases.vision = None
    started = time.perf_counter()
    try:
        result = fn()
    except (torch.cuda.OutOfMemoryError, TrainingOutOfMemory):
        if cuda:
            torch.cuda.empty_cache()
        return {"oom": True, "seconds": round(time.perf_counter() - started, 2)}
    out = {"oom": False, "seconds": round(time.perf_counter() - started, 2)}
    # predict_rows and the training step split a batch that runs out of memory and go on:
    # that is an out-of-memory too
    splits = getattr(result, "oom_splits", None) or getattr(result, "oom_events", None)
    if splits:
        out.update(oom=True, oom_splits=splits)
    if cuda:
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        if phases is not None and phases.vision is not None:
            out["vision_allocated_gib"] = round(phases.vision[0] / GIB, 2)
            out["vision_reserved_gib"] = round(phases.vision[1] / GIB, 2)
            out["language_allocated_gib"] = round(allocated / GIB, 2)
            out["language_reserved_gib"] = round(reserved / GIB, 2)
            allocated, reserved = max(allocated, phases.vision[0]), max(reserved, phases.vision[1])
        out["allocated_gib"] = round(allocated / GIB, 2)
        out["reserved_gib"] = round(reserved / GIB, 2)
    return out


class ProductSteps:
    """`make train`'s own training (vqa.train.build_trainer) at a micro-batch of the grid: a
    Trainer over those rows for a few optimizer steps of that many rows each, from the same
    initial adapter every time."""

    def __init__(self, model, config, processor, scratch: Path):
        self.model, self.config, self.processor, self.scratch = model, config, processor, scratch
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()
                        if p.requires_grad}

    def trainer(self, rows: list[dict], kept: tuple[int, int], steps: int):
        import torch

        from vqa.model import keep_layer_activations
        from vqa.planning.planner import Plan
        from vqa.train import build_trainer

        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.initial:
                    param.copy_(self.initial[name])
        self.model.zero_grad(set_to_none=True)
        keep_layer_activations(self.model, *kept)
        plan = Plan(per_device_batch=len(rows), gradient_accumulation=1, pred_batch_size=1,
                    uncheckpointed_layers=kept[0], uncheckpointed_attention=kept[1])
        return build_trainer(self.config, plan, self.model, self.processor, rows, [],
                             self.scratch / "trainer", max_steps=steps)

    def run(self, rows: list[dict], kept: tuple[int, int] = (0, 0), steps: int = 2):
        """A function that trains `steps` steps and returns the trainer (its StepTimer and
        its out-of-memory splits)."""
        def go():
            trainer = self.trainer(rows, kept, steps)
            trainer.train()
            return trainer
        return go


def step_seconds(steps: ProductSteps, rows, kept: tuple[int, int]) -> dict:
    """Seconds per optimizer step with `kept` = (the last decoder layers not checkpointed, the
    attention blocks kept below them), against every layer checkpointed: three rounds of three
    steps each, alternating, each round's median after its first step; the medians."""
    from vqa.model import keep_layer_activations
    from vqa.trainer import step_seconds as seconds_of

    def timed(k: tuple[int, int]) -> float:
        seconds = seconds_of(steps.run(rows, k, steps=3)())
        return statistics.median(seconds[1:])

    rounds = [(timed((0, 0)), timed(kept)) for _ in range(3)]
    keep_layer_activations(steps.model, 0)
    return {"seconds_per_step": round(statistics.median(r[1] for r in rounds), 3),
            "seconds_per_step_baseline": round(statistics.median(r[0] for r in rounds), 3),
            "baseline": "every decoder layer checkpointed"}


def predicted(config, arch, tokens, shapes, work: str, batch: int,
              kept: tuple[int, int] = (0, 0)) -> dict:
    """The planner's own estimate for these rows, as preflight computes it."""
    from vqa.planning.planner import infer_estimate, train_estimate
    from vqa.planning.rows import Workload

    lengths = [tokens.length(s) for s in shapes[:batch]]
    visual = [tokens.visual(s) for s in shapes[:batch]]
    rows = Workload(lengths, visual, lengths, visual)
    estimate = (train_estimate(config, arch, rows, batch, *kept) if work == "train" else
                infer_estimate(dataclasses.replace(config, infer_mode=work), arch, rows, batch))
    return {"length": max(lengths), "visual_tokens": max(visual), **estimate.gib()}


def bench_model(settings, model_dir: Path, scratch: Path, cap_bytes: int | None, cuda: bool,
                phases: tuple[str, ...] = ("train", "predict")) -> list[dict]:
    from vqa.config import load_config
    from vqa.data import read_table
    from vqa.model import load_processor
    from vqa.planning.hardware import GIB, budget_for
    from vqa.planning.planner import plan_batches
    from vqa.planning.rows import scan_rows, tokens_from_processor, workload
    from vqa.planning.shapes import architecture_for
    from vqa.realsize import write_synthetic_data

    # enough rows for the planner's largest prediction batch (all of them) and the grid's
    most = max(settings.bench_rows,
               *(max(batches(settings, w)) for w in ("train", "score", "generate")))
    base = [f"MODEL_ID={model_dir}", "QUANT=4bit", f"ARTIFACTS_DIR={scratch / 'artifacts'}"]
    if cap_bytes:
        base.append(f"TARGET_GPU_MEMORY={cap_bytes / GIB:.2f}GiB")
    # Written once: the prediction phase's process reuses what the training phase's wrote.
    datasets = {name: scratch / name.replace(" ", "-") for name, _, _ in images(settings)}
    for name, size, _ in images(settings):
        if not (datasets[name] / "train.csv").is_file():
            write_synthetic_data(datasets[name], most, 0, size, images=64)

    def setting(cap, data_dir=None):
        return load_config(base + ([f"MAX_PIXELS={cap}"] if cap else [])
                           + ([f"DATA_DIR={data_dir}"] if data_dir else []), environ={})

    arch, _ = architecture_for(setting(None).resolved_model_id)
    # What each image setting costs, and the planner's choices for the cap.
    cases = []
    for name, _, cap in images(settings):
        config = setting(cap, datasets[name])
        processor = load_processor(config)
        tokens = tokens_from_processor(processor)
        frame = read_table(datasets[name] / "train.csv", with_answer=True)
        shapes = scan_rows(frame, "train.csv", datasets[name], tokens)[0]
        rows = frame.to_dict("records")
        plan = None
        if cap_bytes:
            budget = budget_for(config.target_gpu, config.target_gpu_memory, None)
            plan = plan_batches(config, budget, arch, workload(shapes, shapes, tokens))
        cases.append((name, config, processor, tokens, shapes, rows, plan))

    results = []

    def record(model_name, name, work, batch, config, tokens, shapes, measured, planned=False,
               kept=(0, 0), speed=None):
        row = {"model": model_name, "images": name, "work": work, "batch": batch,
               "planned": planned, "uncheckpointed_layers": kept[0],
               "uncheckpointed_attention": kept[1],
               "predicted": predicted(config, arch, tokens, shapes, work, batch, kept),
               "measured": measured, **({"speed": speed} if speed else {})}
        if measured.get("reserved_gib"):
            row["reserved_error"] = round(
                row["predicted"]["reserved_gib"] / measured["reserved_gib"] - 1, 3)
        if cap_bytes and planned and measured.get("reserved_gib"):
            row["share_of_cap"] = round(measured["reserved_gib"] * GIB / cap_bytes, 3)
        results.append(row)
        print(json.dumps(row), flush=True)

    model_name = arch.name
    adapter = scratch / "adapter"
    if "train" in phases:
        train_phase(settings, model_name, cases, setting, record, cuda, cap_bytes, adapter,
                    scratch, lambda c, t, s, b, k: predicted(c, arch, t, s, "train", b, k))
    if "predict" in phases:
        predict_phase(settings, model_name, cases, datasets, setting, record, cuda, cap_bytes,
                      adapter)
    return results


def train_phase(settings, model_name, cases, setting, record, cuda, cap_bytes, adapter,
                scratch, predict_train) -> None:
    import torch

    from vqa.model import attach_lora, load_model

    # The product's 4-bit model with the reference LoRA; its initial adapter saved for the
    # prediction phase and put back before every row.
    model = attach_lora(load_model(setting(None), for_training=True), setting(None))
    model.save_pretrained(adapter)
    for name, config, processor, tokens, shapes, rows, plan in cases:
        steps = ProductSteps(model, config, processor, scratch)
        sizes = [(b, False) for b in batches(settings, "train")]
        if plan is not None:
            sizes.append((plan.per_device_batch, True))
        for batch, planned in sizes:
            kept = ((plan.uncheckpointed_layers, plan.uncheckpointed_attention) if planned
                    else (0, 0))
            measured = measure(steps.run(rows[:batch], kept), cuda,
                               cap_bytes if planned else None)
            speed = (step_seconds(steps, rows[:batch], kept)
                     if settings.bench_step_times and any(kept) and not measured["oom"]
                     else None)
            record(model_name, name, "train", batch, config, tokens, shapes, measured, planned,
                   kept, speed)
        if settings.bench_uncheckpointed:
            most = max(batches(settings, "train"))
            checkpointing_trade(settings, steps, rows[:most], cuda, name,
                                lambda k: predict_train(config, tokens, shapes, most, k))
    del model
    if cuda:
        torch.cuda.empty_cache()


def checkpointing_trade(settings, steps: ProductSteps, rows, cuda: bool, images: str,
                        predict) -> None:
    """BENCH_UNCHECKPOINTED=0,7,14,0+28: the training step with its last k decoder layers not
    checkpointed (k+j: and the j below them checkpointing only their MLP), peak memory, the
    planner's prediction and seconds per step (the median after the first of three): what
    spare memory would buy if spent on less recomputation. Prints one JSON line per entry."""
    from vqa.model import keep_layer_activations
    from vqa.trainer import step_seconds as seconds_of

    for entry in settings.bench_uncheckpointed.split(","):
        k, _, j = entry.partition("+")
        kept = (int(k), int(j or 0))
        trained = {}

        def run():
            trained["trainer"] = steps.run(rows, kept, steps=3)()
            return trained["trainer"]

        measured = measure(run, cuda)
        seconds = seconds_of(trained["trainer"]) if "trainer" in trained else [0.0]
        measured.pop("seconds")
        print(json.dumps({"uncheckpointed_layers": kept[0], "uncheckpointed_attention": kept[1],
                          "images": images, "rows": len(rows),
                          "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 3),
                          **measured, "predicted": predict(kept)}), flush=True)
    keep_layer_activations(steps.model, 0)


def predict_phase(settings, model_name, cases, datasets, setting, record, cuda, cap_bytes,
                  adapter) -> None:
    import torch

    from vqa.model import attach_lora, load_for_inference, load_model, prepare_for_inference
    from vqa.oom import free_memory
    from vqa.planning.planner import MAX_PRED_BATCH
    from vqa.predict import predict_rows

    if not (adapter / "adapter_config.json").is_file():  # an untrained one, as training leaves
        attach_lora(load_model(setting(None), for_training=True), setting(None)) \
            .save_pretrained(adapter)
        free_memory()  # the peft model's reference cycles would otherwise keep it on the GPU
    processor = cases[0][2]
    # As make submit prepares it for generate (whole lm_head), then for scoring (letters only).
    model, _ = load_for_inference(setting(None), adapter, processor, mode="generate")
    phases = PhasePeaks(model, cuda)
    for mode in [w for w in works(settings) if w != "train"]:
        if mode == "score":
            prepare_for_inference(model, processor, mode)
        for name, config, processor, tokens, shapes, rows, plan in cases:
            sizes = [(b, False) for b in batches(settings, mode)]
            if plan is not None and mode == "score":
                sizes.append((plan.pred_batch_size, True))
            for batch, planned in sizes:
                def run(size, rows=rows[:batch]):  # noqa: B023 - called at once
                    return lambda: predict_rows(
                        model, processor, rows, datasets[name], batch_size=size, mode=mode,
                        max_new_tokens=config.max_new_tokens)

                measured = measure(run(batch), cuda, cap_bytes if planned else None, phases)
                speed = None
                if mode == "score" and batch > MAX_PRED_BATCH and not measured["oom"]:
                    # the same rows in batches of the planner's ceiling, for the time
                    ceiling = measure(run(MAX_PRED_BATCH), cuda)
                    speed = {"seconds_per_row": round(measured["seconds"] / batch, 4),
                             "seconds_per_row_baseline": round(ceiling["seconds"] / batch, 4),
                             "baseline": f"batches of {MAX_PRED_BATCH}"}
                record(model_name, name, mode, batch, config, tokens, shapes, measured, planned,
                       speed=speed)
    model = None  # the closures above read `model`
    if cuda:
        torch.cuda.empty_cache()


def wanted_phases(settings) -> tuple[str, ...]:
    """The processes BENCH_WORK needs: training, prediction (score, generate) or both."""
    return tuple(p for p, work in (("train", {"train"}), ("predict", {"score", "generate"}))
                 if work & set(works(settings)))


def phases_in_fresh_processes(settings, name: str, work: Path) -> list[dict]:
    """Training, then prediction, each in a process of its own, as `make train` and
    `make submit` run: memory an earlier phase (or model) left in the caching allocator would
    otherwise set a floor under every later peak."""
    import subprocess

    rows = []
    for phase in wanted_phases(settings):
        command = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
        env = {**os.environ, "BENCH_MODELS": name}
        command = [a for a in command if not a.startswith("BENCH_MODELS=")]
        subprocess.run(command, env=env, check=True)
        rows += json.loads((work / f"rows-{phase}.json").read_text())
    return rows


def markdown(results: list[dict], header: str) -> str:
    from vqa.planning.report import kept_words

    lines = [header, "", "| model | images | work | batch | predicted alloc / reserved GiB | "
             "measured alloc / reserved GiB | vision / language phase alloc GiB | "
             "reserved error | share of the cap | time: this / baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, m = r["predicted"], r["measured"]
        got = ("OOM" if m["oom"] else
               f"{m.get('allocated_gib', '-')} / {m.get('reserved_gib', '-')}")
        phases = (f"{m['vision_allocated_gib']} / {m['language_allocated_gib']}"
                  if "vision_allocated_gib" in m else "-")
        error = f"{r['reserved_error']:+.1%}" if "reserved_error" in r else "-"
        share = f"{r['share_of_cap']:.0%}" if "share_of_cap" in r else "-"
        work = r["work"] + (" (planner's)" if r["planned"] else "")
        kept = kept_words(r.get("uncheckpointed_layers", 0), r.get("uncheckpointed_attention", 0))
        batch = str(r["batch"]) + (f", {kept}" if kept else "")
        speed = "-"
        if r.get("speed"):
            unit = "step" if "seconds_per_step" in r["speed"] else "row"
            speed = (f"{r['speed'][f'seconds_per_{unit}']} / "
                     f"{r['speed'][f'seconds_per_{unit}_baseline']} s per {unit} "
                     f"({r['speed']['baseline']})")
        lines.append(f"| {r['model'].split('/')[-1]} | {r['images']} | {work} | {batch} | "
                     f"{p['allocated_gib']} / {p['reserved_gib']} | {got} | {phases} | {error} | "
                     f"{share} | {speed} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    from vqa.realsize import bench_model_id, bench_run, build_random_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["train", "predict"], help=argparse.SUPPRESS)
    run = bench_run("bench-memory", parser.description, "/tmp/vqa-bench-memory",
                    "CPU, no measurement", parser)
    if run is None:
        return 0
    args, settings, cuda, out, scratch, cap_bytes = (run.args, run.settings, run.cuda, run.out,
                                                     run.scratch, run.cap_bytes)
    results = []
    for name in ([args.model_dir] if args.model_dir else settings.listed("bench_models", "")):
        if args.model_dir:
            model_dir = Path(args.model_dir)
        elif args.phase:  # a child: the parent built it
            model_dir = scratch / f"model-{name.replace('/', '--')}"
        else:
            model_dir = build_random_model(bench_model_id(name),
                                           scratch / f"model-{name.replace('/', '--')}")
        work = scratch / Path(str(model_dir)).name
        if args.phase:  # a child: one phase, its rows to a file for the parent
            rows = bench_model(settings, model_dir, work, cap_bytes, cuda, phases=(args.phase,))
            (work / f"rows-{args.phase}.json").write_text(json.dumps(rows))
            return 0
        if cuda:
            results += phases_in_fresh_processes(settings, name, work)
        else:
            results += bench_model(settings, model_dir, work, cap_bytes, cuda,
                                   wanted_phases(settings))
        (out / "bench_memory.json").write_text(json.dumps(results, indent=2))  # kept if cut short
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run, nothing measured)"
    header = (f"# bench-memory: {device}, {time.strftime('%Y-%m-%d')}, cap "
              f"{settings.bench_cap or 'none'}")
    (out / "bench_memory.md").write_text(markdown(results, header))
    print(markdown(results, header))
    errors = [abs(r["reserved_error"]) for r in results if "reserved_error" in r]
    planned_oom = [r for r in results if r["planned"] and r["measured"]["oom"]]
    if errors:
        print(f"largest reserved error {max(errors):.1%} over {len(errors)} rows; "
              f"within 10%: {sum(e <= 0.10 for e in errors)}")
    if planned_oom:
        print(f"the planner's batch ran out of memory in {len(planned_oom)} case(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
