"""The planner: the batch sizes and checkpointing of a run, each with what decided it.

On a GPU (found, or named by TARGET_GPU / TARGET_GPU_MEMORY) it picks the largest training
micro-batch that divides the effective batch per rank and the largest prediction batch whose
predicted peaks (peaks.py) fit the budget with a margin, then spends what the micro-batch leaves
on decoder layers that keep their activations instead of recomputing them
(UNCHECKPOINTED_LAYERS) and what those leave on layers that recompute only their MLP
(UNCHECKPOINTED_ATTENTION). A setting the user made is kept as it is, with its predicted peak. On
a CPU run memory is no constraint for the embedded model: CPU batches.

Every choice is a `Decision` (the value, who made it, what stopped it growing); report.py turns
them into the sentences preflight.md and the stages print.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from vqa.config import Config
from vqa.families import family_for
from vqa.planning.hardware import GIB, Budget
from vqa.planning.peaks import Estimate, infer_peak, train_peak, vision_chunk
from vqa.planning.rows import RowShape, Tokens, Workload, workload
from vqa.planning.shapes import Architecture

PLAN_MARGIN = 0.10  # the plan keeps the predicted peak this far below the usable memory
# ... and this far for a family whose own peaks the model was not yet checked on
# (vqa/families/: `calibrated`): its vision tower and language model are other shapes.
UNCALIBRATED_MARGIN = 0.20
# Beyond this, scoring is no faster a row (batch 32 to 64: flat), and larger is slower: 3B,
# 448x448, batch 1,388 (all that fits a 24 GiB card) took 0.0252 s a row against 0.0229 in
# batches of 64 (docs/BENCHMARKS.md).
MAX_PRED_BATCH = 64
REFERENCE_MICRO_BATCH = 2  # without an architecture to plan from
FALLBACK_PRED_BATCH = 8
CPU_MAX_MICRO_BATCH = 16
CPU_PRED_BATCH = 32


@dataclass
class Decision:
    """One planned setting: its value, who chose it (`user`, `memory`, `cpu`, `fallback`), and,
    for the planner's memory choices, its predicted peak and what stopped it growing (`stop`:
    `memory` = the next candidate, `next_value`, is predicted at `next_reserved_gib`, above the
    planned limit; `whole` = it is all there is, `of`; `ceiling` = MAX_PRED_BATCH; `nothing
    fits`)."""

    knob: str
    value: int
    source: str
    stop: str = ""
    reserved_gib: float | None = None
    next_value: int | None = None
    next_reserved_gib: float | None = None
    of: int | None = None


@dataclass
class Plan:
    per_device_batch: int
    gradient_accumulation: int
    pred_batch_size: int
    uncheckpointed_layers: int = 0  # the last decoder layers trained without checkpointing
    uncheckpointed_attention: int = 0  # the layers below those that checkpoint only their MLP
    nproc: int = 1  # ranks on each host
    nnodes: int = 1  # hosts
    effective_batch_size: int = 16
    infer_mode: str = "score"
    verdict: str = "fits"  # fits | will run out of memory | not planned ... | CPU run
    budget: dict | None = None  # name, usable_gib, planned_gib, margin
    train_peak: dict | None = None
    predict_peak: dict | None = None
    candidates: list[dict] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    # the user's settings predicted above the usable memory: knob, value, reserved_gib
    over_memory: list[dict] = field(default_factory=list)
    # work that does not fit even at batch 1: work, reserved_gib, planned_gib
    blocking: list[dict] = field(default_factory=list)
    suggested_max_pixels: int | None = None
    suggested_visual_tokens: int | None = None
    gpus_found: int = 0
    # TIME_BUDGET's choice (budget.py): the resolution and, when even the smallest is too slow,
    # the epochs the stages run with; the table of every candidate
    max_pixels: int | None = None
    epochs: int | None = None
    time_budget: dict | None = None
    # each stage's predicted seconds on the card planned for (timing.predicted_times), for the
    # progress bars' predicted end of the job; None where there is no card or architecture
    predicted: dict | None = None

    @property
    def ranks(self) -> int:
        return self.nproc * self.nnodes

    def decision(self, knob: str) -> dict:
        return next(d for d in self.decisions if d["knob"] == knob)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls(**data)


def gradient_accumulation(effective_batch: int, micro_batch: int, ranks: int) -> int:
    """EFFECTIVE_BATCH_SIZE / (micro-batch x ranks), at least 1: the one place it is computed."""
    return max(1, math.ceil(effective_batch / (micro_batch * ranks)))


def train_estimate(config: Config, arch: Architecture, work: Workload, batch: int,
                   uncheckpointed: int = 0, attention: int = 0) -> Estimate:
    """The training peak at micro-batch `batch` (the last `uncheckpointed` decoder layers keeping
    their activations, the `attention` below them their attention's) on the heaviest batch of
    the workload, under the run's settings."""
    from vqa.model import FP32_CASTS
    from vqa.speed import LABEL_WINDOW

    tokens, patches = Workload.worst_batch(work.train_lengths, work.train_visual, batch)
    rows = min(batch, max(1, len(work.train_lengths)))
    return train_peak(arch, tokens=tokens, patches=patches, quant=config.quant,
                      lora_r=config.lora_r, lora_targets=config.lora_targets,
                      logit_rows=rows * LABEL_WINDOW, fp32_casts=FP32_CASTS,
                      length=tokens // rows, uncheckpointed=uncheckpointed,
                      attention_kept=attention)


def infer_estimate(config: Config, arch: Architecture, work: Workload, batch: int) -> Estimate:
    """The prediction peak (INFER_MODE) at batch `batch` on the workload's longest rows."""
    tokens, patches = Workload.worst_batch(work.predict_lengths, work.predict_visual, batch)
    largest = [4 * v for v in sorted(work.predict_visual, reverse=True)[:batch]]
    return infer_peak(arch, batch=min(batch, max(1, len(work.predict_lengths))), tokens=tokens,
                      vision_patches=vision_chunk(largest), batch_patches=patches,
                      mode=config.infer_mode, max_new_tokens=config.max_new_tokens,
                      quant=config.quant, lora_r=config.lora_r, lora_targets=config.lora_targets)


def _gib(estimate: Estimate) -> float:
    return round(estimate.reserved / GIB, 2)


def _largest_fitting(estimates: dict[int, Estimate], limit: float) -> int | None:
    fitting = [b for b, e in estimates.items() if e.reserved <= limit]
    return max(fitting) if fitting else None


def _grown(knob: str, value: int, user: int | None, estimates: dict[int, Estimate],
           limit: float, whole: int, whole_stop: str) -> Decision:
    """The user's value, else the largest candidate that fits `limit`, with what stops it: the
    next candidate's peak, or `whole_stop` when it is the largest there is (`whole`)."""
    if user:
        return Decision(knob, user, "user")
    if value is None:
        return Decision(knob, 1, "memory", "nothing fits", _gib(estimates[1]))
    above = [b for b in estimates if b > value]
    if above:
        following = min(above)
        return Decision(knob, value, "memory", "memory", _gib(estimates[value]), following,
                        _gib(estimates[following]))
    return Decision(knob, value, "memory", whole_stop, _gib(estimates[value]), of=whole)


def _most_that_fit(peak, most: int, limit: float) -> tuple[int, float, float | None]:
    """The largest n in 0..most whose predicted reserved `peak(n)` (bytes, growing with n) fits
    `limit` (0 when none does), its peak, and the next count's (None when n = most)."""
    fits, at = 0, peak(0)
    while fits < most:
        following = peak(fits + 1)
        if following > limit:
            return fits, at, following
        fits, at = fits + 1, following
    return fits, at, None


def _kept(knob: str, user: int | None, peak, most: int, limit: float,
          keeps: bool = True) -> Decision:
    """UNCHECKPOINTED_LAYERS or UNCHECKPOINTED_ATTENTION: the user's, else as many as the
    memory left holds, up to `most`; none where the family's layers may not be kept (`keeps`)."""
    if user is not None:
        return Decision(knob, user, "user", reserved_gib=round(peak(user) / GIB, 2), of=most)
    if not keeps:
        return Decision(knob, 0, "family", "family", round(peak(0) / GIB, 2), of=most)
    count, at, following = _most_that_fit(peak, most, limit)
    if following is None:
        return Decision(knob, count, "memory", "whole", round(at / GIB, 2), of=most)
    return Decision(knob, count, "memory", "memory", round(at / GIB, 2), count + 1,
                    round(following / GIB, 2), of=most)


def margin_for(arch: Architecture) -> float:
    """The share of the usable memory the plan keeps free for the peak model's error."""
    family = family_for(arch.family)
    return (PLAN_MARGIN if family.calibrated else UNCALIBRATED_MARGIN) + family.extra_margin


def _gpu_plan(config: Config, arch: Architecture, work: Workload, budget: Budget,
              plan: Plan) -> None:
    margin = margin_for(arch)
    limit = budget.usable_bytes * (1 - margin)
    per_rank = max(1, config.effective_batch_size // config.world_size)
    train = {b: train_estimate(config, arch, work, b)
             for b in range(1, per_rank + 1) if per_rank % b == 0}
    # The prediction batch's own limits: MAX_PRED_BATCH, or every row when there are fewer.
    rows = max(1, len(work.predict_lengths))
    ceiling = min(MAX_PRED_BATCH, rows)
    infer = {b: infer_estimate(config, arch, work, b) for b in range(1, ceiling + 1)}
    family = family_for(arch.family)
    plan.budget = {"name": budget.name, "usable_gib": round(budget.usable_bytes / GIB, 2),
                   "planned_gib": round(limit / GIB, 2), "margin": margin,
                   "family": family.name, "calibrated": family.calibrated,
                   "margin_reason": family.margin_reason, "keeps_reason": family.keeps_reason}
    plan.candidates = (
        [{"work": "train", "batch": b, **e.gib()} for b, e in train.items()]
        + [{"work": config.infer_mode, "batch": b, **infer[b].gib()}
           for b in (1, 2, 4, 8, 16, 24, 32, 48, 64) if b in infer])
    best_train = _largest_fitting(train, limit)
    best_pred = _largest_fitting(infer, limit)
    micro = _grown("PER_DEVICE_BATCH", best_train, config.per_device_batch, train, limit,
                   per_rank, "whole")
    pred = _grown("PRED_BATCH_SIZE", best_pred, config.pred_batch_size, infer, limit, rows,
                  "whole" if ceiling == rows else "ceiling")
    batch = micro.value
    keeps = family.keeps_activations
    layers = _kept("UNCHECKPOINTED_LAYERS", config.uncheckpointed_layers,
                   lambda k: train_estimate(config, arch, work, batch, k).reserved, arch.layers,
                   limit if best_train else 0, keeps)
    kept = min(layers.value, arch.layers)
    attention = _kept("UNCHECKPOINTED_ATTENTION", config.uncheckpointed_attention,
                      lambda j: train_estimate(config, arch, work, batch, kept, j).reserved,
                      arch.layers - kept, limit if best_train else 0, keeps)
    plan.decisions = [asdict(d) for d in (micro, layers, attention, pred)]
    # A user's batch may lie outside the candidates (not a divisor, or beyond the ceiling).
    train_at = train_estimate(config, arch, work, batch, layers.value, attention.value)
    pred_at = infer.get(pred.value) or infer_estimate(config, arch, work, pred.value)
    plan.per_device_batch, plan.pred_batch_size = batch, pred.value
    plan.uncheckpointed_layers, plan.uncheckpointed_attention = layers.value, attention.value
    plan.train_peak, plan.predict_peak = train_at.gib(), pred_at.gib()
    if layers.value or attention.value:
        plan.candidates.append({"work": "train", "batch": batch, "layers_kept": layers.value,
                                "attention_kept": attention.value, **train_at.gib()})
    for decision, estimate in ((micro, train_at), (layers, train_at), (attention, train_at),
                               (pred, pred_at)):
        if decision.source == "user" and decision.value and \
                estimate.reserved > budget.usable_bytes:
            plan.over_memory.append({"knob": decision.knob, "value": decision.value,
                                     "reserved_gib": _gib(estimate)})
    if best_train is None:
        plan.blocking.append({"work": "training at micro-batch 1", "reserved_gib": _gib(train[1]),
                              "planned_gib": plan.budget["planned_gib"]})
    if best_pred is None:
        plan.blocking.append({"work": f"{config.infer_mode} at batch 1",
                              "reserved_gib": _gib(infer[1]),
                              "planned_gib": plan.budget["planned_gib"]})
    plan.verdict = "will run out of memory" if plan.blocking else "fits"


def _cpu_batch(config: Config) -> int:
    """The largest divisor of the effective batch per rank up to CPU_MAX_MICRO_BATCH, so
    accumulation keeps the effective batch exact."""
    per_rank = max(1, config.effective_batch_size // config.world_size)
    return max(d for d in range(1, min(per_rank, CPU_MAX_MICRO_BATCH) + 1) if per_rank % d == 0)


def plan_batches(config: Config, budget: Budget | None, arch: Architecture | None,
                 work: Workload | None, gpus_found: int = 0) -> Plan:
    """The run's batch sizes and checkpointing: the user's settings where made, else the
    planner's: from the peak-VRAM model on a GPU budget (with the architecture and the data's
    workload), the reference micro-batch without an architecture, CPU batches without a GPU."""
    plan = Plan(0, 0, 0, nproc=config.nproc, nnodes=config.nnodes,
                effective_batch_size=config.effective_batch_size,
                infer_mode=config.infer_mode, gpus_found=gpus_found)
    if budget is not None and arch is not None and work is not None:
        _gpu_plan(config, arch, work, budget, plan)
    else:
        gpu = budget is not None
        plan.verdict = "not planned (no architecture to plan from)" if gpu else "CPU run"
        source = "fallback" if gpu else "cpu"
        defaults = ((min(REFERENCE_MICRO_BATCH, config.effective_batch_size),
                     FALLBACK_PRED_BATCH) if gpu else (_cpu_batch(config), CPU_PRED_BATCH))
        decisions = [Decision(knob, user or default, "user" if user else source)
                     for knob, user, default in (
                         ("PER_DEVICE_BATCH", config.per_device_batch, defaults[0]),
                         ("PRED_BATCH_SIZE", config.pred_batch_size, defaults[1]))]
        # nothing planned the memory: the user's layers, else every layer recomputed
        kept = [Decision(knob, user or 0, "user" if user is not None else source)
                for knob, user in (("UNCHECKPOINTED_LAYERS", config.uncheckpointed_layers),
                                   ("UNCHECKPOINTED_ATTENTION",
                                    config.uncheckpointed_attention))]
        plan.decisions = [asdict(d) for d in (decisions[0], *kept, decisions[1])]
        plan.per_device_batch, plan.pred_batch_size = decisions[0].value, decisions[1].value
        plan.uncheckpointed_layers, plan.uncheckpointed_attention = kept[0].value, kept[1].value
    plan.gradient_accumulation = gradient_accumulation(
        config.effective_batch_size, plan.per_device_batch, config.world_size)
    return plan


def suggest_max_pixels(config: Config, arch: Architecture, train: list[RowShape],
                       predict: list[RowShape], tokens: Tokens, budget: Budget | None
                       ) -> int | None:
    """The largest MAX_PIXELS (a multiple of one visual token's pixels) under which training at
    micro-batch 1 and prediction at batch 1 fit the budget and every row fits
    MAX_SEQUENCE_LENGTH; None when nothing down to 64 visual tokens an image does."""
    largest = max([tokens.visual(r) for r in train + predict] or [0])
    limit = budget.usable_bytes * (1 - margin_for(arch)) if budget is not None else None
    for cap in range(largest, 63, -max(1, largest // 64)):
        max_pixels = cap * tokens.pixels_per_token
        work = workload(train, predict, tokens, max_pixels)
        if config.max_sequence_length and work.longest > config.max_sequence_length:
            continue
        if limit is None:
            return max_pixels
        if (train_estimate(config, arch, work, 1).reserved <= limit
                and infer_estimate(config, arch, work, 1).reserved <= limit):
            return max_pixels
    return None


def make_plan(config: Config, budget: Budget | None, arch: Architecture | None,
              train: list[RowShape], test: list[RowShape], tokens: Tokens,
              gpus_found: int = 0) -> tuple[Plan, Workload]:
    """The plan on this data (training without the rows above MAX_SEQUENCE_LENGTH, which it
    skips), with a MAX_PIXELS suggestion when the heaviest rows do not fit or any row exceeds
    MAX_SEQUENCE_LENGTH; and the planned workload. Prediction sees test.csv's rows, and
    train.csv's in make eval's validation sample: the workload's test rows come first."""
    limit = config.max_sequence_length
    predict = test + train
    trained = [r for r in train if not limit or tokens.length(r) <= limit]
    work = workload(trained, predict, tokens)
    work.test_rows = len(test)
    plan = plan_batches(config, budget, arch, work, gpus_found)
    too_long = bool(limit) and workload(train, predict, tokens).longest > limit
    if arch is not None and (plan.blocking or too_long):
        plan.suggested_max_pixels = suggest_max_pixels(config, arch, train, predict, tokens,
                                                       budget)
        if plan.suggested_max_pixels:
            plan.suggested_visual_tokens = plan.suggested_max_pixels // tokens.pixels_per_token
    return plan, work
