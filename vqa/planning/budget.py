"""TIME_BUDGET: the largest resolution whose predicted training and submit fit the time given.

Each candidate MAX_PIXELS (the processor's own, then a ladder down to 64 visual tokens for the
largest image) measures the rows again under that bound, plans them for the card (planner.py)
and times them on the card predicted for (timing.py). The largest whose plan fits the card's
memory and whose training over every epoch (early stopping's worst case) plus submit is
predicted within the budget is chosen. When even the smallest does not fit, fewer EPOCHS are
planned, and said; when not even one epoch fits, preflight is blocked. Every candidate goes
into the plan's `time_budget` table, which preflight prints.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from vqa.config import Config
from vqa.planning.hardware import Budget
from vqa.planning.planner import Plan, make_plan
from vqa.planning.rows import RowShape, Tokens, Workload
from vqa.planning.shapes import Architecture

# visual tokens the largest image may have: the candidates below the processor's own bound
LADDER = (16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64)


def candidates(tokens: Tokens, shapes: list[RowShape]) -> list[int]:
    """MAX_PIXELS values to try, largest first: the processor's own bound, then each rung of
    LADDER that cuts the largest image and stays at or above MIN_PIXELS."""
    largest = max((tokens.visual(r) for r in shapes), default=0)
    pixels = tokens.pixels_per_token
    rungs = [t * pixels for t in LADDER
             if t < largest and tokens.min_pixels <= t * pixels < tokens.max_pixels]
    return [tokens.max_pixels, *rungs]


def _row(max_pixels: int, work: Workload, plan: Plan, times: dict, budget_s: float | None
         ) -> dict:
    visual = work.train_visual + work.predict_visual
    total = times["train_worst_s"] + times["submit_s"]
    return {"max_pixels": max_pixels,
            "visual_median": statistics.median(visual) if visual else 0,
            "visual_max": max(visual, default=0),
            "train_gib": (plan.train_peak or {}).get("reserved_gib"),
            "predict_gib": (plan.predict_peak or {}).get("reserved_gib"),
            "fits_memory": not plan.blocking,
            "epoch_s": times["train_epoch_s"], "train_s": times["train_worst_s"],
            "submit_s": times["submit_s"], "total_s": round(total, 4),
            "fits_time": None if budget_s is None else total <= budget_s}


def trade(config: Config, arch: Architecture, train: list[RowShape], test: list[RowShape],
          tokens: Tokens, budget: Budget | None, card: tuple[str, dict], gpus_found: int = 0
          ) -> list[tuple[Plan, Workload, dict]]:
    """Every candidate resolution planned and timed: its plan, workload and table row (whether
    it fits TIME_BUDGET, when one is set)."""
    from vqa.planning.timing import predicted_times

    tried = []
    for max_pixels in candidates(tokens, train + test):
        at = dataclasses.replace(tokens, max_pixels=max_pixels)
        plan, work = make_plan(config, budget, arch, train, test, at, gpus_found)
        times = predicted_times(config, arch, work, plan, card)
        tried.append((plan, work, _row(max_pixels, work, plan, times,
                                       config.time_budget_seconds)))
    return tried


def choose(config: Config, arch: Architecture, train: list[RowShape], test: list[RowShape],
           tokens: Tokens, budget: Budget | None, card: tuple[str, dict], gpus_found: int = 0
           ) -> tuple[Plan, Workload]:
    """The plan and workload at the resolution (and, if need be, the EPOCHS) the budget
    affords; the plan carries the table of every candidate and what was chosen."""
    from vqa.planning.timing import hours

    budget_s = config.time_budget_seconds
    tried = trade(config, arch, train, test, tokens, budget, card, gpus_found)
    fitting = [t for t in tried if t[2]["fits_memory"]] or tried
    chosen = next((t for t in fitting if t[2]["fits_time"]), None)
    epochs, note, blocking = None, "", ""
    if chosen is None:
        chosen = fitting[-1]
        row = chosen[2]
        affordable = math.floor((budget_s - row["submit_s"]) / row["epoch_s"]) if row[
            "epoch_s"] else config.epochs
        smallest = (f"even MAX_PIXELS={row['max_pixels']} ({row['visual_max']} visual tokens "
                    f"for the largest image) is predicted to take {hours(row['total_s'])} with "
                    f"EPOCHS={config.epochs}")
        if affordable >= 1:
            epochs = min(affordable, config.epochs)
            note = f"{smallest}: EPOCHS={epochs} fits TIME_BUDGET={config.time_budget}"
        else:
            epochs = 1
            blocking = (f"TIME_BUDGET={config.time_budget}: {smallest}, and one epoch plus "
                        f"submit {hours(row['epoch_s'] + row['submit_s'])}: raise the budget or "
                        f"plan for a faster card")
    plan, work, row = chosen
    plan.max_pixels, plan.epochs = row["max_pixels"], epochs
    plan.time_budget = {"budget": config.time_budget, "budget_s": budget_s, "card": card[0],
                        "chosen_max_pixels": row["max_pixels"], "epochs": epochs or config.epochs,
                        "note": note, "blocking": blocking, "rows": [t[2] for t in tried]}
    return plan, work
