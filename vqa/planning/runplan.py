"""The run plan: made once from the run's inputs, saved to ARTIFACTS_DIR/plan.json, read by every
stage.

`make preflight` scans the data and writes the plan. `make train`, `make eval` and `make submit`
read it when its inputs' fingerprint matches theirs (they log that they did); when it does not,
or there is none, they say which inputs changed and make it again with the same function from
the same inputs, and save it. The inputs are what the plan depends on: the CSVs and the sizes of
the images they name, the model's config.json and preprocessor_config.json, the card planned for
(its total memory, never what is free), and the settings that change memory. So the numbers a
stage prints are preflight's numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from vqa.config import Config
from vqa.data import DataError, read_table
from vqa.families.base import UnsupportedModel
from vqa.io import file_fingerprint, write_json_atomic
from vqa.planning import report
from vqa.planning.hardware import (Budget, Machine, budget_for, card_identity, probe_machine,
                                   visible_gpus)
from vqa.planning.planner import Plan, make_plan
from vqa.planning.rows import (RowProblem, RowShape, Tokens, Workload, scan_rows,
                               tokens_from_processor, tokens_from_table)
from vqa.planning.shapes import Architecture, architecture_for, cached_config
from vqa.planning.timing import card_for

log = logging.getLogger("vqa")

PLAN_FILE = "plan.json"
# The settings that change a plan; the others (learning rate, epochs, ...) do not.
PLAN_SETTINGS = ("MODEL_ID", "QUANT", "LORA_R", "LORA_TARGETS", "EFFECTIVE_BATCH_SIZE",
                 "PER_DEVICE_BATCH", "PRED_BATCH_SIZE", "UNCHECKPOINTED_LAYERS",
                 "UNCHECKPOINTED_ATTENTION", "MIN_PIXELS", "MAX_PIXELS", "MAX_SEQUENCE_LENGTH",
                 "INFER_MODE", "MAX_NEW_TOKENS", "NPROC", "NNODES", "TARGET_GPU",
                 "TARGET_GPU_MEMORY", "TIME_BUDGET")
# ... and those a time budget depends on too, when one is set
BUDGET_SETTINGS = ("EPOCHS", "TTA", "VAL_SAMPLE", "EARLY_STOPPING_PATIENCE")


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def _images(config: Config, tables: dict) -> str:
    """A digest of every image path the CSVs name with its file size (-1 when missing): a
    replaced image changes the rows' visual tokens even when the CSVs do not change."""
    from vqa.data import resolve_image

    sizes = []
    for frame in tables.values():
        for rel in frame["path"]:
            try:
                sizes.append((rel, resolve_image(config.data_dir, rel).stat().st_size))
            except (OSError, DataError):
                sizes.append((rel, -1))
    return _digest(sorted(sizes))


def _model_files(model_id: str) -> dict:
    """The config files that fix the model's shapes and its visual-token rule."""
    local = Path(model_id)
    if not (local / "config.json").is_file():
        cached = cached_config(model_id)
        local = cached.parent if cached is not None else None
    return {name: file_fingerprint(local / name) if local is not None else None
            for name in ("config.json", "preprocessor_config.json")}


def _tables(config: Config) -> dict:
    """train.csv, and test.csv when it exists (train alone needs no test.csv)."""
    tables = {"train.csv": read_table(config.data_dir / "train.csv", with_answer=True)}
    if (config.data_dir / "test.csv").is_file():
        tables["test.csv"] = read_table(config.data_dir / "test.csv", with_answer=False)
    return tables


def plan_inputs(config: Config, machine: Machine, tables: dict) -> dict:
    """What the plan depends on, each part named so a change can be told by name."""
    settings = config.to_json()
    knobs = PLAN_SETTINGS + (BUDGET_SETTINGS if config.time_budget else ())
    return {
        "settings": {k: settings[k] for k in knobs},
        **{name: file_fingerprint(config.data_dir / name) for name in ("train.csv", "test.csv")},
        "images": _images(config, tables),
        "model": _model_files(config.resolved_model_id),
        "card": card_identity(config.target_gpu, config.target_gpu_memory, machine,
                              config.nproc),
    }


def changed(saved: dict, now: dict) -> list[str]:
    """The inputs that differ, by name (a setting by its knob)."""
    names = []
    for key, value in now.items():
        if key == "settings":
            old = saved.get(key) or {}
            names += [k for k, v in value.items() if old.get(k) != v]
        elif saved.get(key) != value:
            names.append(key)
    return names


@dataclass
class RunPlan:
    """A plan with everything it was made from: preflight reports all of it, plan.json keeps
    the plan, its inputs and where the architecture and token counts came from."""

    plan: Plan
    inputs: dict
    machine: Machine
    tokens: Tokens
    architecture_source: str | None
    work: Workload
    tables: dict
    train_shapes: list[RowShape] = field(default_factory=list)
    test_shapes: list[RowShape] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    processor_problem: str | None = None
    architecture: Architecture | None = None  # None when none could be found
    processor: object = None  # the processor the rows were measured with, when it loaded
    budget: Budget | None = None  # the memory planned for (None: a CPU run)
    card: tuple[str, dict] | None = None  # the card timed for (timing.card_for), when known

    def document(self, made_by: str) -> dict:
        return {"made_by": made_by, "made_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "inputs": self.inputs, "plan": self.plan.to_json(),
                "architecture_source": self.architecture_source,
                "measured_with": self.tokens.source}


def _measure(config: Config, processor=None) -> tuple[Tokens, str | None, object]:
    """The processor's rule, or for a hub model that cannot be reached, the published one; with
    the processor (None when it could not be loaded)."""
    from vqa.model import ModelError, load_processor

    try:
        processor = processor if processor is not None else load_processor(config)
    except ModelError as exc:
        return (tokens_from_table(config.resolved_model_id, config.min_pixels,
                                  config.max_pixels, "processor not loadable here"), str(exc),
                None)
    return tokens_from_processor(processor), None, processor


def _budget_plan(config: Config, machine: Machine, arch: Architecture | None,
                 train_shapes: list[RowShape], test_shapes: list[RowShape], tokens: Tokens,
                 budget: Budget | None, card: tuple[str, dict] | None) -> tuple[Plan, Workload]:
    from vqa.config import ConfigError
    from vqa.planning import budget as time_budget

    if card is None or arch is None:
        raise ConfigError(f"TIME_BUDGET={config.time_budget} needs "
                          + ("a card to predict for: set TARGET_GPU (a name in "
                             "vqa/planning/gpus.json)" if card is None else
                             "the model's architecture (see the warning above)"))
    return time_budget.choose(config, arch, train_shapes, test_shapes, tokens, budget, card,
                              gpus_found=len(visible_gpus(machine)))


def _predicted(config: Config, arch: Architecture | None, work: Workload, plan: Plan,
               card: tuple[str, dict] | None) -> dict | None:
    """The stages' predicted seconds on `card` (timing.py), at the epochs the plan runs; None
    without a card the table knows or an architecture."""
    import dataclasses

    from vqa.planning.timing import predicted_times

    if card is None or arch is None:
        return None
    if plan.epochs:
        config = dataclasses.replace(config, epochs=plan.epochs)
    return predicted_times(config, arch, work, plan, card)


def planned(config: Config, plan: Plan, processor):
    """The config and processor a stage runs with after stage_plan: the MAX_PIXELS and EPOCHS
    TIME_BUDGET chose (the processor loaded again at that bound), else the stage's own."""
    import dataclasses

    from vqa.model import load_processor

    changes = {k: v for k, v in (("max_pixels", plan.max_pixels), ("epochs", plan.epochs))
               if v is not None and v != getattr(config, k)}
    if not changes:
        return config, processor
    log.info("plan: TIME_BUDGET=%s runs %s", config.time_budget,
             " ".join(f"{k.upper()}={v}" for k, v in changes.items()))
    # MAX_PIXELS and TIME_BUDGET may not both be set: the chosen bound replaces the budget
    config = dataclasses.replace(config, time_budget="", **changes)
    return config, (load_processor(config) if "max_pixels" in changes else processor)


def make_run_plan(config: Config, machine: Machine | None = None, processor=None,
                  tables: dict | None = None) -> RunPlan:
    """Scans train.csv and test.csv (image headers, token counts) and plans: the one function
    that makes a plan, for preflight and for every stage."""
    machine = machine or probe_machine(config.artifacts_dir)
    tables = tables or _tables(config)
    tokens, processor_problem, processor = _measure(config, processor)
    scanned = {name: scan_rows(frame, name, config.data_dir, tokens,
                               config.max_sequence_length) for name, frame in tables.items()}
    train_shapes, test_shapes = scanned["train.csv"][0], scanned.get("test.csv", ([], []))[0]
    arch, source = None, None
    try:
        arch, source = architecture_for(config.resolved_model_id)
    except UnsupportedModel:
        raise  # a family vqa does not serve: one line, not a plan without memory
    except ValueError as exc:
        log.warning("%s", exc)
    budget = budget_for(config.target_gpu, config.target_gpu_memory, machine, config.nproc)
    card = card_for(config, machine)
    if config.time_budget:
        plan, work = _budget_plan(config, machine, arch, train_shapes, test_shapes, tokens,
                                  budget, card)
    else:
        plan, work = make_plan(config, budget, arch, train_shapes, test_shapes, tokens,
                               gpus_found=len(visible_gpus(machine)))
    plan.predicted = _predicted(config, arch, work, plan, card)
    return RunPlan(plan, plan_inputs(config, machine, tables), machine, tokens, source, work,
                   tables, train_shapes, test_shapes,
                   [p for _, problems in scanned.values() for p in problems], processor_problem,
                   arch, processor, budget, card)


def save_plan(config: Config, run: RunPlan, made_by: str) -> Path:
    path = config.artifacts_dir / PLAN_FILE
    write_json_atomic(path, run.document(made_by))
    return path


def _saved(path: Path) -> dict | None:
    """plan.json as saved, or None when there is none or it cannot be read as a plan (cut
    short, edited by hand, written by another version of vqa)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        Plan.from_json(saved["plan"])
        return saved if isinstance(saved["inputs"], dict) and "made_by" in saved else None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is not a plan this version of vqa reads: planning again", path)
        return None


def stage_plan(config: Config, stage: str, processor=None) -> Plan:
    """The plan `stage` (train, eval, submit) runs with: plan.json when its inputs match this
    run's, else made again (and saved). Logs where it came from and the part the stage uses."""
    path = config.artifacts_dir / PLAN_FILE
    machine = probe_machine(config.artifacts_dir)
    saved = _saved(path)
    tables = _tables(config)
    now = plan_inputs(config, machine, tables)
    differ = changed(saved["inputs"], now) if saved else None
    if saved and not differ:
        plan = Plan.from_json(saved["plan"])
        log.info("plan: read from %s (made by %s at %s): its inputs match this run's", path,
                 saved["made_by"], saved["made_at"])
    else:
        log.info("plan: %s; planning again", f"inputs changed since {path} was made: "
                 f"{', '.join(differ)}" if differ else f"no {path} yet")
        run = make_run_plan(config, machine, processor, tables)
        save_plan(config, run, made_by=stage)
        plan = run.plan
        log.info("plan: saved to %s", path)
    for line in report.warnings(plan.to_json()):
        if any(line.startswith(f"{knob}=") for knob in report.STAGE_KNOBS[stage]):
            log.warning("%s", line)
    for line in report.stage_lines(plan.to_json(), stage):
        log.info("plan: %s", line)
    return plan
