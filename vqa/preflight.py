"""`make preflight`: what will run, on what, and why, before any GPU hour is spent.

Probes the machine, validates both CSVs, reads every image header (size only, no decode), counts
visual and text tokens per row with the loaded processor's own rule, predicts the peak VRAM of
training and prediction from the model's config.json, plans batch sizes for the card found or
named (TARGET_GPU, TARGET_GPU_MEMORY) (vqa/planning/), and writes plan.json (what the later
stages run with), preflight.json and preflight.md to ARTIFACTS_DIR. Exit 0 = runnable; 2 = a
blocking problem, named in one line.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from vqa.config import Config
from vqa.data import read_table
from vqa.io import write_json_atomic, write_text_atomic
from vqa.planning import report as words
from vqa.planning.hardware import GIB, probe_machine
from vqa.planning.rows import distribution
from vqa.planning.runplan import RunPlan, make_run_plan, save_plan

log = logging.getLogger("vqa")


def _log_machine(config: Config, machine) -> None:
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


def preflight_report(config: Config, run: RunPlan) -> dict:
    """preflight.json: the verdict, the machine, the data scan, the plan and the row problems."""
    plan = run.plan.to_json()
    train, test = run.tables["train.csv"], run.tables["test.csv"]
    blocking = words.blocking(plan)
    if blocking and plan["suggested_max_pixels"]:
        blocking[0] += f"; set MAX_PIXELS={plan['suggested_max_pixels']}"
    if len(run.train_shapes) * 2 < len(train):  # most images unreadable: the folder is wrong
        first = next(p for p in run.problems if p.file == "train.csv")
        blocking.insert(0, f"only {len(run.train_shapes)} of {len(train)} training images are "
                           f"usable (first problem: row {first.row}, id {first.id}: "
                           f"{first.reason}); is DATA_DIR right?")
    tokens = run.tokens
    lengths = {name: [tokens.length(r) for r in shapes] for name, shapes in (
        ("train", run.train_shapes), ("test", run.test_shapes))}
    visual = [tokens.visual(r) for r in run.train_shapes + run.test_shapes]
    measured = list(zip(run.train_shapes + run.test_shapes, lengths["train"] + lengths["test"],
                        visual))
    longest = sorted(measured, key=lambda m: m[1], reverse=True)[:5]
    return {
        "verdict": "blocked" if blocking else "runnable",
        "memory_verdict": plan["verdict"],
        "blocking": blocking,
        "warnings": words.warnings(plan),
        "machine": run.machine.to_json(),
        "model_id": config.resolved_model_id,
        "architecture_source": run.architecture_source,
        "measured_with": run.tokens.source,
        "data": {
            "train_rows": len(train), "test_rows": len(test),
            "train_letters": train["answer"].value_counts().sort_index().to_dict(),
            "pixels": {"min_pixels": run.tokens.min_pixels, "max_pixels": run.tokens.max_pixels},
            "train_sequence_length": distribution(lengths["train"]),
            "test_sequence_length": distribution(lengths["test"]),
            "visual_tokens": distribution(visual),
            "longest_rows": [{"id": r.id, "width": r.width, "height": r.height,
                              "visual_tokens": visual, "length": length}
                             for r, length, visual in longest],
        },
        "plan": plan,
        "time": predicted_time(config, run),
        "resolutions": resolutions(config, run),
        "reasons": words.reasons(plan),
        "inputs": run.inputs,
        "problems": [asdict(p) for p in run.problems],
    }


def time_report(times: dict) -> list[str]:
    from vqa.planning.timing import time_lines

    return [times["skipped"]] if "skipped" in times else time_lines(times)


def predicted_time(config: Config, run: RunPlan) -> dict:
    """The stages' predicted wall time on the card planned for (vqa/planning/timing.py), and
    what preparing a row costs this machine's CPU; why not, when it cannot be predicted."""
    from vqa.planning import timing

    if run.card is None:
        return {"skipped": "no card to predict for: set TARGET_GPU (vqa/planning/gpus.json)"}
    if run.plan.predicted is None:  # made with the plan wherever a card and architecture are
        return {"skipped": "no architecture to predict from (see the warning above)"}
    times = dict(run.plan.predicted)  # made with the plan, at the epochs it runs
    times["train_rows"] = len(run.work.train_lengths)
    times["workers"] = config.loader_workers(cuda=True)
    # with the processor the rows were measured with: loaded once, by the plan
    times["cpu_seconds_per_row"] = (timing.preparation_seconds(
        config, run.processor, run.tables["train.csv"].to_dict("records"))
        if run.processor is not None else None)
    if run.processor is None:
        times["cpu_skipped"] = run.processor_problem
    return times


def resolutions(config: Config, run: RunPlan) -> dict | None:
    """Without TIME_BUDGET, the trade it would choose from: each candidate MAX_PIXELS planned
    and timed on the card predicted for (vqa/planning/budget.py); None without a card the
    table knows or an architecture."""
    from vqa.planning.budget import trade
    from vqa.planning.hardware import visible_gpus

    if config.time_budget or run.card is None or run.architecture is None:
        return None
    tried = trade(config, run.architecture, run.train_shapes, run.test_shapes, run.tokens,
                  run.budget, run.card, gpus_found=len(visible_gpus(run.machine)))
    return {"card": run.card[0], "current": run.tokens.max_pixels,
            "rows": [t[2] for t in tried]}


def run_preflight(config: Config) -> int:
    machine = probe_machine(config.artifacts_dir)
    _log_machine(config, machine)
    # preflight checks both, whatever a stage needs
    tables = {name: read_table(config.data_dir / name, with_answer=name == "train.csv")
              for name in ("train.csv", "test.csv")}
    run = make_run_plan(config, machine, tables=tables)
    if run.processor_problem:
        log.warning("%s; measuring rows with %s", run.processor_problem, run.tokens.source)
    report = preflight_report(config, run)
    artifacts = config.artifacts_dir
    plan_path = save_plan(config, run, made_by="preflight")
    write_json_atomic(artifacts / "preflight.json", report)
    write_text_atomic(artifacts / "preflight.md", words.preflight_markdown(report))
    problems = report["problems"]
    for p in problems[:5]:
        print(f"  {p['file']} row {p['row']} (id {p['id']}, {p['path']}): {p['reason']}"
              + (f" -> {p['action']}" if p["action"] else ""))
    if len(problems) > 5:
        print(f"  ... and {len(problems) - 5} more row problem(s): see "
              f"{artifacts / 'preflight.md'}")
    for warning in report["warnings"]:
        log.warning("%s", warning)
    log.info("plan: %s", "; ".join(report["reasons"]))
    for stage in ("train", "submit"):
        for line in words.stage_lines(report["plan"], stage):
            print(f"  {stage}: {line}")
    for line in time_report(report["time"]):
        print(f"  time: {line}")
    for line in words.budget_table(report["plan"]) or words.resolution_lines(report):
        print(f"  {line}")
    log.info("reports: %s, %s, %s", plan_path, artifacts / "preflight.json",
             artifacts / "preflight.md")
    if report["blocking"]:
        print(f"vqa preflight: blocked: {report['blocking'][0]}")
        return 2
    print(f"vqa preflight: runnable ({words.verdict_line(report['plan'])})")
    return 0
