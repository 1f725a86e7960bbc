"""`make preflight`: what will run, on what, and why, before any GPU hour is spent.

Probes the machine, validates both CSVs, reads every image header (size only, no decode), counts
visual and text tokens per row with the loaded processor's own rule, predicts the peak VRAM of
training and prediction from the model's config.json (vqa/memory.py), plans batch sizes for the
card found or named (TARGET_GPU, TARGET_GPU_MEMORY), and writes preflight.json and preflight.md
to ARTIFACTS_DIR. Exit 0 = runnable; 2 = a blocking problem, named in one line.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass

from PIL import Image
from tqdm import tqdm

from vqa.config import Config
from vqa.data import (
    MAX_ASPECT_RATIO,
    DataError,
    build_messages,
    padded_size,
    read_table,
    resolve_image,
)
from vqa.io import write_json_atomic, write_text_atomic
from vqa.memory import (
    GIB,
    Workload,
    architecture_for,
    budget_for,
    infer_estimate,
    plan_batch_sizes,
    probe_machine,
    published_architectures,
    train_estimate,
    visual_tokens_for,
)

log = logging.getLogger("vqa")


@dataclass
class RowProblem:
    file: str
    row: int  # 1-based line number in the CSV, header = 1
    id: str
    path: str
    reason: str
    action: str = ""  # what train/submit will do with the row


def _action(csv_name: str) -> str:
    return ("skipped by train" if csv_name == "train.csv"
            else "answered from the text alone by submit")


@dataclass
class RowShape:
    """What a row costs before the pixel bounds are applied: its text tokens and image size."""

    id: str
    text_tokens: int  # prompt with one <|image_pad|> placeholder, plus the answer and <|im_end|>
    width: int
    height: int


@dataclass
class Tokens:
    """How rows are measured: the loaded processor's rule, or an estimate when it is missing."""

    min_pixels: int
    max_pixels: int
    patch: int
    merge: int
    count_text: object  # row -> text tokens
    source: str

    def visual(self, shape: RowShape, max_pixels: int | None = None) -> int:
        return visual_tokens_for(shape.height, shape.width, min_pixels=self.min_pixels,
                                 max_pixels=max_pixels or self.max_pixels,
                                 patch_size=self.patch, merge_size=self.merge)

    def length(self, shape: RowShape, max_pixels: int | None = None) -> int:
        return shape.text_tokens - 1 + self.visual(shape, max_pixels)


def tokens_from_processor(processor) -> Tokens:
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", {}) or {}

    def count_text(row) -> int:
        text = processor.apply_chat_template(build_messages(row), tokenize=False,
                                             add_generation_prompt=True)
        return len(processor.tokenizer.encode(text, add_special_tokens=False)) + 2

    return Tokens(size.get("shortest_edge") or image_processor.min_pixels,
                  size.get("longest_edge") or image_processor.max_pixels,
                  image_processor.patch_size, image_processor.merge_size, count_text,
                  "the loaded processor")


def tokens_from_table(config: Config, why: str) -> Tokens:
    """The published preprocessor settings, and text tokens estimated at one per two UTF-8
    bytes (Qwen's BPE needs fewer for English and Korean alike, so the estimate errs high)."""
    pre = published_architectures()["common"]["preprocessor"]
    template = 24  # <|im_start|>user ... <|vision_start|><|image_pad|><|vision_end|> ... assistant

    def count_text(row) -> int:
        text = "\n".join(str(row[k]) for k in ("question", "a", "b", "c", "d"))
        return template + math.ceil(len(text.encode("utf-8")) / 2) + 2

    return Tokens(config.min_pixels or pre["min_pixels"], config.max_pixels or pre["max_pixels"],
                  pre["patch_size"], pre["merge_size"], count_text,
                  f"the published preprocessor settings; text tokens estimated ({why})")


def scan_rows(frame, csv_name: str, config: Config, tokens: Tokens
              ) -> tuple[list[RowShape], list[RowProblem]]:
    """Each usable row's shape (image header only, no decode) and every row-level problem."""
    shapes, problems = [], []
    for n, row in enumerate(tqdm(frame.to_dict("records"), desc=f"scan {csv_name}", unit="row",
                                 leave=False)):
        line = n + 2
        try:
            path = resolve_image(config.data_dir, row["path"])
            with Image.open(path) as image:
                width, height = image.size
        except DataError as exc:
            problems.append(RowProblem(csv_name, line, row["id"], row["path"], str(exc),
                                       _action(csv_name)))
            continue
        except FileNotFoundError:
            problems.append(RowProblem(csv_name, line, row["id"], row["path"], "image file missing",
                                       _action(csv_name)))
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problems.append(RowProblem(csv_name, line, row["id"], row["path"],
                                       f"unreadable image ({type(exc).__name__}: {exc})",
                                       _action(csv_name)))
            continue
        padded = padded_size(width, height)
        if padded != (width, height):
            problems.append(RowProblem(
                csv_name, line, row["id"], row["path"],
                f"aspect ratio {max(width, height) / min(width, height):.0f}:1 exceeds "
                f"{MAX_ASPECT_RATIO}:1 (Qwen's resize rejects it)",
                f"padded with white to {padded[0]}x{padded[1]} on load"))
            width, height = padded
        shape = RowShape(row["id"], tokens.count_text(row), width, height)
        shapes.append(shape)
        length = tokens.length(shape)
        if config.max_sequence_length and length > config.max_sequence_length:
            problems.append(RowProblem(
                csv_name, line, row["id"], row["path"],
                f"sequence of {length} tokens ({tokens.visual(shape)} visual) exceeds "
                f"MAX_SEQUENCE_LENGTH={config.max_sequence_length}"))
    return shapes, problems


def workload(train: list[RowShape], test: list[RowShape], tokens: Tokens,
             max_pixels: int | None = None) -> Workload:
    return Workload([tokens.length(r, max_pixels) for r in train],
                    [tokens.visual(r, max_pixels) for r in train],
                    [tokens.length(r, max_pixels) for r in test],
                    [tokens.visual(r, max_pixels) for r in test])


def suggest_max_pixels(config: Config, arch, train: list[RowShape], test: list[RowShape],
                       tokens: Tokens, budget) -> int | None:
    """The largest MAX_PIXELS (a multiple of 28x28 pixels, one visual token) under which
    training at micro-batch 1 and prediction at batch 1 fit the budget and every row fits
    MAX_SEQUENCE_LENGTH; None when nothing down to 64 visual tokens an image does."""
    unit = (tokens.patch * tokens.merge) ** 2
    largest = max([tokens.visual(r) for r in train + test] or [0])
    for cap in range(largest, 63, -max(1, largest // 64)):
        max_pixels = cap * unit
        work = workload(train, test, tokens, max_pixels)
        if config.max_sequence_length and max(work.train_lengths + work.test_lengths,
                                              default=0) > config.max_sequence_length:
            continue
        if budget is None:
            return max_pixels
        fits = (train_estimate(config, arch, work, 1).reserved <= budget.limit_bytes
                and infer_estimate(config, arch, work, 1).reserved <= budget.limit_bytes)
        if fits:
            return max_pixels
    return None


def _distribution(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def _measure(config: Config) -> tuple[Tokens, str | None]:
    """The processor's rule, or for a hub model that cannot be reached, the published one."""
    from vqa.model import ModelError, load_processor

    try:
        return tokens_from_processor(load_processor(config)), None
    except ModelError as exc:
        return tokens_from_table(config, "processor not loadable here"), str(exc)


def plan_for(config: Config, machine, train: list[RowShape], test: list[RowShape],
             tokens: Tokens):
    """The plan from the peak-VRAM model on this data, with a MAX_PIXELS suggestion when the
    longest rows do not fit; (plan, architecture source or None, the rows' workload)."""
    budget = budget_for(config, machine)
    arch, source = None, None
    try:
        arch, source = architecture_for(config)
    except ValueError as exc:
        log.warning("%s", exc)
    work = workload(train, test, tokens)
    plan = plan_batch_sizes(config, machine, arch, work)
    too_long = config.max_sequence_length and max(
        work.train_lengths + work.test_lengths, default=0) > config.max_sequence_length
    if arch is not None and (plan.blocking or too_long):
        plan.suggested_max_pixels = suggest_max_pixels(config, arch, train, test, tokens, budget)
        if plan.suggested_max_pixels:
            plan.reasons.append(f"MAX_PIXELS={plan.suggested_max_pixels} "
                                f"({plan.suggested_max_pixels // (tokens.patch * tokens.merge) ** 2}"
                                f" visual tokens an image at most) makes every row fit")
    return plan, source, work


def plan_run(config: Config, processor=None, *, train_csv: bool = False,
             predict_csv: str | None = None):
    """The plan `make train`/`eval`/`submit` use when the user set no batch size: on a GPU, the
    peak-VRAM model over the rows they will see (a header-only scan of train.csv and/or the CSV
    they predict), measured with `processor` (loaded here when not given); on CPU, the CPU
    batches, without loading anything."""
    import torch

    from vqa.model import load_processor

    if not torch.cuda.is_available():
        return plan_batch_sizes(config)
    processor = processor or load_processor(config)
    machine = probe_machine(config.artifacts_dir)
    tokens = tokens_from_processor(processor)

    def shapes(name: str) -> list[RowShape]:
        frame = read_table(config.data_dir / name, with_answer=name == "train.csv")
        return scan_rows(frame, name, config, tokens)[0]

    plan, _, _ = plan_for(config, machine, shapes("train.csv") if train_csv else [],
                       shapes(predict_csv) if predict_csv else [], tokens)
    for warning in plan.warnings:
        log.warning("%s", warning)
    log.info("plan: %s", "; ".join(plan.reasons))
    return plan


def run_preflight(config: Config) -> int:
    machine = probe_machine(config.artifacts_dir)
    if machine.gpus:
        for gpu in machine.gpus:
            log.info("GPU %d: %s, %.1f GiB total, %.1f GiB free, compute %s (bf16 %s)",
                     gpu.index, gpu.name, gpu.total_bytes / GIB, gpu.free_bytes / GIB,
                     gpu.compute_capability, "yes" if gpu.bf16 else "no")
    else:
        log.info("no NVIDIA GPU or driver found (%s): %s", machine.nvml_error,
                 "planning for the target card" if config.target_gpu or config.target_gpu_memory
                 else "planning a CPU run")
    log.info("RAM %.1f GiB available of %.1f; %.1f GiB free disk under %s",
             machine.ram_available_bytes / GIB, machine.ram_total_bytes / GIB,
             machine.disk_free_bytes / GIB, config.artifacts_dir)

    train = read_table(config.data_dir / "train.csv", with_answer=True)
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    tokens, processor_problem = _measure(config)
    if processor_problem:
        log.warning("%s; measuring rows with %s", processor_problem, tokens.source)
    train_shapes, train_problems = scan_rows(train, "train.csv", config, tokens)
    test_shapes, test_problems = scan_rows(test, "test.csv", config, tokens)
    problems = train_problems + test_problems
    plan, arch_source, work = plan_for(config, machine, train_shapes, test_shapes, tokens)

    blocking = list(plan.blocking)
    if plan.blocking and plan.suggested_max_pixels:
        blocking[0] += f"; set MAX_PIXELS={plan.suggested_max_pixels}"
    if len(train_shapes) * 2 < len(train):  # most images unreadable: the folder is wrong
        first = train_problems[0]
        blocking.insert(0, f"only {len(train_shapes)} of {len(train)} training images are usable "
                           f"(first problem: row {first.row}, id {first.id}: {first.reason}); "
                           f"is DATA_DIR right?")
    measured = list(zip(train_shapes + test_shapes, work.train_lengths + work.test_lengths,
                        work.train_visual + work.test_visual))
    longest = sorted(measured, key=lambda m: m[1], reverse=True)[:5]
    report = {
        "verdict": "blocked" if blocking else "runnable",
        "memory_verdict": plan.verdict,
        "blocking": blocking,
        "warnings": plan.warnings,
        "machine": machine.to_json(),
        "model_id": config.resolved_model_id,
        "architecture_source": arch_source,
        "measured_with": tokens.source,
        "data": {
            "train_rows": len(train), "test_rows": len(test),
            "train_letters": train["answer"].value_counts().sort_index().to_dict(),
            "pixels": {"min_pixels": tokens.min_pixels, "max_pixels": tokens.max_pixels},
            "train_sequence_length": _distribution(work.train_lengths),
            "test_sequence_length": _distribution(work.test_lengths),
            "visual_tokens": _distribution(work.train_visual + work.test_visual),
            "longest_rows": [{"id": r.id, "width": r.width, "height": r.height,
                              "visual_tokens": visual, "length": length}
                             for r, length, visual in longest],
        },
        "plan": asdict(plan),
        "problems": [asdict(p) for p in problems],
    }
    artifacts = config.artifacts_dir
    write_json_atomic(artifacts / "preflight.json", report)
    write_text_atomic(artifacts / "preflight.md", render_markdown(report))
    for p in problems[:5]:
        print(f"  {p.file} row {p.row} (id {p.id}, {p.path}): {p.reason}"
              + (f" -> {p.action}" if p.action else ""))
    if len(problems) > 5:
        print(f"  ... and {len(problems) - 5} more row problem(s): see {artifacts / 'preflight.md'}")
    for warning in plan.warnings:
        log.warning("%s", warning)
    log.info("plan: %s", "; ".join(plan.reasons))
    log.info("reports: %s, %s", artifacts / "preflight.json", artifacts / "preflight.md")
    if blocking:
        print(f"vqa preflight: blocked: {blocking[0]}")
        return 2
    print(f"vqa preflight: runnable ({_verdict_line(report)})")
    return 0


def _verdict_line(report: dict) -> str:
    plan = report["plan"]
    if not plan["budget"]:
        return f"{plan['verdict']}: {plan['per_device_batch']} x {plan['gradient_accumulation']}" \
               f" accumulation, prediction batch {plan['pred_batch_size']}"
    kept = [f"{knob}={plan[key]}" for knob, key in (
        ("UNCHECKPOINTED_LAYERS", "uncheckpointed_layers"),
        ("UNCHECKPOINTED_ATTENTION", "uncheckpointed_attention")) if plan.get(key)]
    return (f"{plan['verdict']} on {plan['budget']['name']}: train peak "
            f"{plan['train_peak']['reserved_gib']} GiB at PER_DEVICE_BATCH="
            f"{plan['per_device_batch']}{' with ' + ' '.join(kept) if kept else ''}, "
            f"predict peak {plan['predict_peak']['reserved_gib']} GiB at PRED_BATCH_SIZE="
            f"{plan['pred_batch_size']}, of {plan['budget']['usable_gib']} GiB usable")


def render_markdown(report: dict) -> str:
    data, plan, machine = report["data"], report["plan"], report["machine"]
    lines = [f"# Preflight: {report['verdict']}", "", f"**{_verdict_line(report)}**", ""]
    for reason in report["blocking"]:
        lines.append(f"- **Blocking:** {reason}")
    for warning in report["warnings"]:
        lines.append(f"- **Warning:** {warning}")
    lines += ["", "## Machine", ""]
    if machine["gpus"]:
        for gpu in machine["gpus"]:
            lines.append(f"- GPU {gpu['index']}: {gpu['name']}, {gpu['total_bytes'] / GIB:.1f} GiB "
                         f"({gpu['free_bytes'] / GIB:.1f} free), compute {gpu['compute_capability']}"
                         f", bf16 {'yes' if gpu['bf16'] else 'no'}, other processes "
                         f"{gpu['other_processes_bytes'] / GIB:.1f} GiB")
        lines.append(f"- Driver {machine['driver_version']}, CUDA {machine['cuda_driver_version']}")
    else:
        lines.append(f"- No NVIDIA GPU or driver ({machine['nvml_error']}).")
    lines += [f"- RAM: {machine['ram_available_bytes'] / GIB:.1f} GiB available of "
              f"{machine['ram_total_bytes'] / GIB:.1f}",
              f"- Free disk under the artifacts: {machine['disk_free_bytes'] / GIB:.1f} GiB",
              "", "## Data", "",
              f"- Model: `{report['model_id']}`; architecture from "
              f"{report['architecture_source'] or 'nowhere (not planned)'}",
              f"- Rows measured with {report['measured_with']}; pixels per image "
              f"{data['pixels']['min_pixels']:,} to {data['pixels']['max_pixels']:,}",
              f"- train.csv: {data['train_rows']} rows, answer letters {data['train_letters']}",
              f"- test.csv: {data['test_rows']} rows",
              "", "| tokens | min | median | p95 | max |", "|---|---|---|---|---|"]
    for name, d in (("train sequence", data["train_sequence_length"]),
                    ("test sequence", data["test_sequence_length"]),
                    ("visual per image", data["visual_tokens"])):
        if d:
            lines.append(f"| {name} | {d['min']} | {d['median']} | {d['p95']} | {d['max']} |")
    if data["longest_rows"]:
        lines += ["", "Longest rows: " + ", ".join(
            f"{r['id']} ({r['width']}x{r['height']}, {r['visual_tokens']} visual, "
            f"{r['length']} total)" for r in data["longest_rows"])]
    lines += ["", "## Plan", ""]
    if plan["budget"]:
        b = plan["budget"]
        lines += [f"Planned for {b['name']}: {b['usable_gib']} GiB usable after the CUDA context, "
                  f"filled to at most {b['planned_gib']} GiB ({b['margin']:.0%} margin for the "
                  f"model's error; docs/BENCHMARKS.md). Predicted peak reserved, heaviest batch "
                  f"the data can form:", "",
                  "| work | batch | predicted allocated GiB | predicted reserved GiB | fits |",
                  "|---|---|---|---|---|"]
        for c in plan["candidates"]:
            fits = "yes" if c["reserved_gib"] <= b["planned_gib"] else "no"
            lines.append(f"| {c['work']} | {c['batch']} | {c['allocated_gib']} | "
                         f"{c['reserved_gib']} | {fits} |")
        for work, peak in (("training", "train_peak"), ("prediction", "predict_peak")):
            if plan[peak]:  # a prediction's terms are those of its larger phase
                lines += ["", f"Where the {work} peak goes: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in plan[peak]["terms_gib"].items() if v) + " (GiB)."]
        lines.append("")
    lines += [f"- {r}" for r in plan["reasons"]]
    lines += ["", "Set these to change it:", "", "```", plan_settings(plan), "```", "",
              f"## Row problems ({len(report['problems'])})", ""]
    if report["problems"]:
        lines += ["| file | row | id | path | problem | what happens |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['file']} | {p['row']} | {p['id']} | {p['path']} | {p['reason']} | "
                  f"{p['action']} |" for p in report["problems"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def plan_settings(plan: dict) -> str:
    line = f"PER_DEVICE_BATCH={plan['per_device_batch']} PRED_BATCH_SIZE={plan['pred_batch_size']}"
    if plan.get("budget"):  # planned from memory: the layers kept are part of the plan
        line += (f" UNCHECKPOINTED_LAYERS={plan.get('uncheckpointed_layers') or 0}"
                 f" UNCHECKPOINTED_ATTENTION={plan.get('uncheckpointed_attention') or 0}")
    if plan.get("suggested_max_pixels"):
        line += f" MAX_PIXELS={plan['suggested_max_pixels']}"
    return line
