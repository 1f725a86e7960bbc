"""scripts/fit_time.py: the time model's factors recovered from rows made with known ones."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fit_time", ROOT / "scripts" / "fit_time.py")
fit_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fit_time)


def _rows(efficiency: float, element_bytes: float) -> list[dict]:
    """Rows whose measured time is exactly the model's at these factors on the H200."""
    rate, bandwidth = 989e12, 4800e9
    rows = []
    for n, (flops, elements) in enumerate([(1e14, 1e9), (4e14, 8e9), (9e15, 9e10), (2e14, 5e9)]):
        weights, cpu = 1e11, 0.01 * n
        measured = (flops / (rate * efficiency) + (elements * element_bytes + weights) / bandwidth
                    + cpu)
        rows.append({"model": f"m{n % 2}", "images": ["448x448", "mixed"][n // 2], "kind": "train",
                     "work": "train step", "batch": 8, "card": "H200", "measured_s": measured,
                     "cost": {"flops": flops, "elements": elements, "weight_bytes": weights,
                              "decode_steps": 0, "cpu_s": cpu}})
    return rows


def test_the_factors_the_rows_were_made_with_are_recovered():
    efficiency, element_bytes = fit_time.solve(_rows(0.3, 500.0))
    assert efficiency == pytest.approx(0.3, rel=1e-6)
    assert element_bytes == pytest.approx(500.0, rel=1e-6)
    # a negative element cost is not physical: the efficiency is then fitted alone
    assert fit_time.solve(_rows(0.3, -200.0))[1] == 0.0


def test_left_out_rows_are_predicted_from_the_others(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": _rows(0.3, 500.0)}))
    done = subprocess.run([sys.executable, "scripts/fit_time.py", str(path), "--fit",
                           "448x448,mixed", "--fit-models", "m0,m1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'EFFICIENCY = {"train": 0.300}' in done.stdout
    assert "4 of 4 rows within ±25% when left out of the fit" in done.stdout
    # fitted on the 448x448 rows alone, the mixed rows are the check
    done = subprocess.run([sys.executable, "scripts/fit_time.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "4 of 4 rows" in done.stdout
