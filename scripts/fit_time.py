"""Fits the time model's factors (vqa/planning/timing.py) on make bench's measured rows.

    python scripts/fit_time.py BENCH_JSON [BENCH_JSON ...] [--fit 448x448]

Reads the rows `make bench BENCH_WORK=time` recorded (each with its cost in parts: matrix
FLOPs, non-matrix elements, weight bytes, decoding steps, CPU seconds), and for each kind of
work (train, score) solves, by least squares over the rows whose images are in --fit:

    measured - weight bytes / bandwidth - decoding - CPU = FLOPs / (rate x EFFICIENCY)
                                                        + elements x ELEMENT_BYTES / bandwidth

Prints the factors to put in timing.py and the table of every row, predicted with them against
measured: the rows not fitted on are the check. A negative ELEMENT_BYTES (the rows cannot tell
the two terms apart) is fixed at 0 and the efficiency fitted alone.
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


def fit(rows: list[dict], kind: str, fitted_on: set[str]) -> tuple[float, float]:
    """(EFFICIENCY, ELEMENT_BYTES) of `kind` from its rows whose images are in `fitted_on`."""
    import numpy as np

    from vqa.planning import timing
    from vqa.planning.hardware import gpu_table

    design, target = [], []
    for r in rows:
        if r["kind"] != kind or r["images"] not in fitted_on:
            continue
        rate, bandwidth, _ = timing.card_rates(gpu_table()[r["card"]])
        c = r["cost"]
        fixed = (c["weight_bytes"] / bandwidth + c["decode_steps"] * timing.GENERATE_STEP_SECONDS
                 + c["cpu_s"])
        design.append([c["flops"] / rate, c["elements"] / bandwidth])
        target.append(r["measured_s"] - fixed)
    if not design:
        raise SystemExit(f"fit_time: no {kind} rows at {', '.join(sorted(fitted_on))}")
    x = np.array(design)
    y = np.array(target)
    inverse, element_bytes = np.linalg.lstsq(x, y, rcond=None)[0]
    if element_bytes < 0 or len(design) < 2:
        inverse, element_bytes = float(x[:, 0] @ y / (x[:, 0] @ x[:, 0])), 0.0
    return 1 / float(inverse), float(element_bytes)


def main() -> int:
    from vqa.planning import timing
    from vqa.planning.hardware import gpu_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", type=Path)
    parser.add_argument("--fit", default="448x448", help="image sets to fit on, comma-separated")
    args = parser.parse_args()
    rows = read_rows(args.bench_json)
    fitted_on = set(args.fit.split(","))
    kinds = sorted({r["kind"] for r in rows})
    for kind in kinds:
        timing.EFFICIENCY[kind], timing.ELEMENT_BYTES[kind] = fit(rows, kind, fitted_on)
    print("EFFICIENCY = {" + ", ".join(f'"{k}": {timing.EFFICIENCY[k]:.3f}' for k in kinds)
          + "}")
    print("ELEMENT_BYTES = {" + ", ".join(f'"{k}": {timing.ELEMENT_BYTES[k]:.0f}.0'
                                           for k in kinds) + "}")
    print("\n| model | images | work | batch | predicted s | measured s | error | role |")
    print("|---|---|---|---|---|---|---|---|")
    within = checked = 0
    for r in rows:
        c = r["cost"]
        cost = timing.Cost(c["flops"], c["elements"], c["weight_bytes"], c["decode_steps"])
        predicted = timing.seconds(cost, gpu_table()[r["card"]], r["kind"]) + c["cpu_s"]
        error = 100 * (r["measured_s"] / predicted - 1)
        role = "fit" if r["images"] in fitted_on else "check"
        checked += role == "check"
        within += role == "check" and abs(error) <= TOLERANCE
        print(f"| {r['model']} | {r['images']} | {r['work']} | {r['batch']} | {predicted:.4g} | "
              f"{r['measured_s']:.4g} | {error:+.1f}% | {role} |")
    print(f"\n{within} of {checked} checked rows within ±{TOLERANCE}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
