"""Fits the time model's factors (vqa/planning/timing.py) on make bench's measured rows.

    python scripts/fit_time.py BENCH_JSON [BENCH_JSON ...] [--fit 448x448] [--fit-models 3B,7B]

Reads the rows `make bench BENCH_WORK=time` recorded (each with its cost in parts: matrix
FLOPs, non-matrix elements, weight bytes, decoding steps, CPU seconds), and for each kind of
work (train, score) solves, by least squares over the rows whose images are in --fit (and whose
model's name ends in one of --fit-models, when given):

    measured - weight bytes / bandwidth - decoding - CPU = FLOPs / (rate x EFFICIENCY)
                                                        + elements x ELEMENT_BYTES / bandwidth

Each row weighs by its relative error; neither factor may be negative. Prints the factors to put
in timing.py and the table of every row, predicted with them against measured, and each fitted
row predicted again by the factors fitted on the others alone (leave one out): with the rows
never fitted on, that is the out-of-sample check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 25  # percent: the bar for a prediction


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            results = json.loads(path.read_text(encoding="utf-8"))["results"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"fit_time: {path}: not a bench.json ({exc})")
        rows += [r for r in results if r.get("cost") and r.get("measured_s")]
    if not rows:
        raise SystemExit("fit_time: no time-model rows (make bench BENCH_WORK=time) in "
                         + ", ".join(map(str, paths)))
    return rows


def fitted_on(row: dict, images: set[str], models: list[str]) -> bool:
    return row["images"] in images and (not models or any(row["model"].endswith(m)
                                                             for m in models))


def _cost(row: dict):
    """The row's recorded cost as the time model's Cost (its CPU seconds apart)."""
    from vqa.planning import timing

    c = row["cost"]
    return timing.Cost(c["flops"], c["elements"], c["weight_bytes"], c["decode_steps"])


def _terms(row: dict) -> tuple[list[float], float]:
    """The row's two fitted terms (FLOPs over the rate, elements over the bandwidth: the time
    model at unit factors) and what is left of its measured time for them."""
    from vqa.planning import timing
    from vqa.planning.hardware import gpu_table

    card, kind, cost = gpu_table()[row["card"]], row["kind"], _cost(row)
    fixed = timing.seconds(timing.Cost(0, 0, cost.weight_bytes, cost.decode_steps), card, kind,
                           (1.0, 0.0)) + row["cost"]["cpu_s"]
    flops = timing.seconds(timing.Cost(flops=cost.flops), card, kind, (1.0, 0.0))
    elements = timing.seconds(timing.Cost(elements=cost.elements), card, kind, (1.0, 1.0))
    return [flops, elements], row["measured_s"] - fixed


def solve(rows: list[dict]) -> tuple[float, float]:
    """(EFFICIENCY, ELEMENT_BYTES) that minimise the rows' relative errors, neither negative
    (one row: the efficiency alone)."""
    import numpy as np
    from scipy.optimize import nnls

    terms = [_terms(r) for r in rows]
    weight = np.array([1 / r["measured_s"] for r in rows])  # each row's error relative to it
    x = np.array([t[0] for t in terms]) * weight[:, None]
    y = np.array([t[1] for t in terms]) * weight
    if len(rows) < 2:
        x = x[:, :1]
    coefficients = nnls(x, y)[0]
    inverse, element_bytes = coefficients[0], (coefficients[1] if len(coefficients) > 1 else 0)
    return (1 / inverse if inverse else float("inf")), float(element_bytes)


def predicted(row: dict, factors: tuple[float, float]) -> float:
    """The row's time at `factors`, by the product's own time model, with its CPU seconds."""
    from vqa.planning import timing
    from vqa.planning.hardware import gpu_table

    return (timing.seconds(_cost(row), gpu_table()[row["card"]], row["kind"], factors)
            + row["cost"]["cpu_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", type=Path)
    parser.add_argument("--fit", default="448x448", help="image sets to fit on, comma-separated")
    parser.add_argument("--fit-models", default="",
                        help="fit only on models whose name ends so, comma-separated (e.g. 3B,7B)")
    args = parser.parse_args()
    rows = read_rows(args.bench_json)
    images = set(args.fit.split(","))
    models = [m for m in args.fit_models.split(",") if m]
    kinds = sorted({r["kind"] for r in rows})
    factors = {}
    for kind in kinds:
        fitted = [r for r in rows if r["kind"] == kind and fitted_on(r, images, models)]
        if not fitted:
            raise SystemExit(f"fit_time: no {kind} rows to fit at {', '.join(sorted(images))}")
        factors[kind] = solve(fitted)
    print("EFFICIENCY = {" + ", ".join(f'"{k}": {factors[k][0]:.3f}' for k in kinds) + "}")
    print("ELEMENT_BYTES = {" + ", ".join(f'"{k}": {factors[k][1]:.0f}.0' for k in kinds)
          + "}")
    print("\n| model | images | work | batch | measured s | predicted s | error | left out: "
          "predicted s | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    within = checked = 0
    for r in rows:
        kind = r["kind"]
        guess = predicted(r, factors[kind])
        error = 100 * (r["measured_s"] / guess - 1)
        if fitted_on(r, images, models):  # fitted again without it: an out-of-sample error
            others = [o for o in rows if o["kind"] == kind and o is not r
                      and fitted_on(o, images, models)]
            held = predicted(r, solve(others)) if others else None
        else:
            held = guess  # never fitted on
        held_error = 100 * (r["measured_s"] / held - 1) if held else None
        if held_error is not None:
            checked += 1
            within += abs(held_error) <= TOLERANCE
        name = Path(r["model"]).name.removeprefix("model-")
        print(f"| {name} | {r['images']} | {r['work']} | {r['batch']} | {r['measured_s']:.4g} | "
              f"{guess:.4g} | {error:+.1f}% | "
              + (f"{held:.4g} | {held_error:+.1f}% |" if held else "- | - |"))
    print(f"\n{within} of {checked} rows within ±{TOLERANCE}% when left out of the fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
