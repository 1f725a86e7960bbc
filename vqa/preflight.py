"""`make preflight`: what will run, on what, and why, before any GPU hour is spent.

Probes the machine, validates both CSVs, reads every image header (size only, no decode), counts
visual and text tokens per row with the loaded processor's own rule, plans batch sizes, and writes
preflight.json and preflight.md to ARTIFACTS_DIR. Exit 0 = runnable; 2 = a blocking problem.
"""

from __future__ import annotations

import logging
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
from vqa.memory import GIB, plan_batch_sizes, probe_machine, visual_tokens_for

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


def scan_rows(frame, csv_name: str, config: Config, processor) -> tuple[list[int], list[RowProblem]]:
    """Sequence length per row (prompt + image tokens) and every row-level problem."""
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", {}) or {}
    min_pixels = size.get("shortest_edge") or image_processor.min_pixels
    max_pixels = size.get("longest_edge") or image_processor.max_pixels
    patch = image_processor.patch_size
    merge = image_processor.merge_size
    lengths, problems = [], []
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
        tokens = visual_tokens_for(height, width, min_pixels=min_pixels, max_pixels=max_pixels,
                                   patch_size=patch, merge_size=merge)
        text = processor.apply_chat_template(build_messages(row), tokenize=False,
                                             add_generation_prompt=True)
        text_tokens = len(processor.tokenizer.encode(text, add_special_tokens=False))
        # The template holds one <|image_pad|>; the processor expands it to `tokens`; +2 answer.
        length = text_tokens - 1 + tokens + 2
        lengths.append(length)
        if config.max_sequence_length and length > config.max_sequence_length:
            problems.append(RowProblem(
                csv_name, line, row["id"], row["path"],
                f"sequence of {length} tokens ({tokens} visual) exceeds "
                f"MAX_SEQUENCE_LENGTH={config.max_sequence_length}"))
    return lengths, problems


def _distribution(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def run_preflight(config: Config) -> int:
    from vqa.model import load_processor

    machine = probe_machine(config.artifacts_dir)
    if machine.gpus:
        for gpu in machine.gpus:
            log.info("GPU %d: %s, %.1f GiB total, %.1f GiB free, compute %s (bf16 %s)",
                     gpu.index, gpu.name, gpu.total_bytes / GIB, gpu.free_bytes / GIB,
                     gpu.compute_capability, "yes" if gpu.bf16 else "no")
    else:
        log.info("no NVIDIA GPU or driver found (%s): planning a CPU run", machine.nvml_error)
    log.info("RAM %.1f GiB available of %.1f; %.1f GiB free disk under %s",
             machine.ram_available_bytes / GIB, machine.ram_total_bytes / GIB,
             machine.disk_free_bytes / GIB, config.artifacts_dir)

    train = read_table(config.data_dir / "train.csv", with_answer=True)
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    processor = load_processor(config)
    train_lengths, train_problems = scan_rows(train, "train.csv", config, processor)
    test_lengths, test_problems = scan_rows(test, "test.csv", config, processor)
    problems = train_problems + test_problems
    plan = plan_batch_sizes(config, machine)

    blocking = []
    if len(train_lengths) * 2 < len(train):  # most images unreadable: the folder is wrong
        first = train_problems[0]
        blocking.append(f"only {len(train_lengths)} of {len(train)} training images are usable "
                        f"(first problem: row {first.row}, id {first.id}: {first.reason}); "
                        f"is DATA_DIR right?")
    report = {
        "verdict": "blocked" if blocking else "runnable",
        "blocking": blocking,
        "machine": machine.to_json(),
        "model_id": config.resolved_model_id,
        "data": {
            "train_rows": len(train), "test_rows": len(test),
            "train_letters": train["answer"].value_counts().sort_index().to_dict(),
            "train_sequence_length": _distribution(train_lengths),
            "test_sequence_length": _distribution(test_lengths),
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
    log.info("plan: %s", "; ".join(plan.reasons))
    log.info("reports: %s, %s", artifacts / "preflight.json", artifacts / "preflight.md")
    if blocking:
        print(f"vqa preflight: blocked: {blocking[0]}")
        return 2
    print("vqa preflight: runnable")
    return 0


def render_markdown(report: dict) -> str:
    data, plan, machine = report["data"], report["plan"], report["machine"]
    lines = [f"# Preflight: {report['verdict']}", ""]
    for reason in report["blocking"]:
        lines.append(f"- **Blocking:** {reason}")
    lines += ["", "## Machine", ""]
    if machine["gpus"]:
        for gpu in machine["gpus"]:
            lines.append(f"- GPU {gpu['index']}: {gpu['name']}, {gpu['total_bytes'] / GIB:.1f} GiB "
                         f"({gpu['free_bytes'] / GIB:.1f} free), compute {gpu['compute_capability']}")
    else:
        lines.append(f"- No NVIDIA GPU or driver ({machine['nvml_error']}): a CPU run.")
    lines += [f"- RAM: {machine['ram_available_bytes'] / GIB:.1f} GiB available of "
              f"{machine['ram_total_bytes'] / GIB:.1f}",
              f"- Free disk under the artifacts: {machine['disk_free_bytes'] / GIB:.1f} GiB",
              "", "## Data", "",
              f"- Model: `{report['model_id']}`",
              f"- train.csv: {data['train_rows']} rows, answer letters {data['train_letters']}",
              f"- test.csv: {data['test_rows']} rows",
              "", "| sequence length (tokens) | min | median | p95 | max |", "|---|---|---|---|---|"]
    for name in ("train", "test"):
        d = data[f"{name}_sequence_length"]
        if d:
            lines.append(f"| {name} | {d['min']} | {d['median']} | {d['p95']} | {d['max']} |")
    lines += ["", "## Plan", ""]
    lines += [f"- {r}" for r in plan["reasons"]]
    lines += ["", "Set these to change it:", "", "```",
              f"PER_DEVICE_BATCH={plan['per_device_batch']} PRED_BATCH_SIZE={plan['pred_batch_size']}",
              "```", "", f"## Row problems ({len(report['problems'])})", ""]
    if report["problems"]:
        lines += ["| file | row | id | path | problem | what happens |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['file']} | {p['row']} | {p['id']} | {p['path']} | {p['reason']} | "
                  f"{p['action']} |" for p in report["problems"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
