"""The benchmarks on CPU (`--dry-run` with the tiny model): every phase runs through the product's
own training step and prediction, nothing is measured; their settings come from the one config."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts" /
                                                  "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_every_phase_on_cpu(tiny_model_dir, tmp_path):
    """`make bench` on CPU: reference and vqa's train and predict, the levers, the profile; the
    vqa rows go through make train's Trainer and make submit's model and predict function."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_PROFILE": "1"}
    done = subprocess.run([sys.executable, "scripts/bench.py", "--dry-run", "--model-dir",
                           str(tiny_model_dir), f"ARTIFACTS_DIR={tmp_path / 'out'}",
                           f"BENCH_SCRATCH={tmp_path / 'scratch'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out" / "bench"
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["work"], r["setup"]): r for r in report["results"]}
    assert {("train", "reference"), ("train", "vqa (make train)"),
            ("predict", "reference: generate, stock vision attention"),
            ("predict", "vqa: score (make submit)"), ("predict", "vqa: INFER_MODE=generate"),
            ("predict", "+ grouped vision attention"), ("predict", "+ LoRA weights in bf16"),
            ("predict", "+ LoRA merged on the fly, MLPs in chunks of tokens"),
            ("predict", "+ output layer cut to the four letters"),
            ("train", "+ expandable allocator segments"),
            ("predict", "preparation alone (images + processor, one process)"),
            ("train", "+ grouped vision attention"),
            ("train", "+ loss at the labelled positions"),
            ("predict", "vqa: score, TTA=none"),
            ("predict", "vqa: score, TTA=rotate (time per test row)")} <= set(rows)
    assert rows[("predict", "vqa: score, TTA=rotate (time per test row)")]["x_plain_time"] > 0
    assert not any(r.get("oom") for r in report["results"])
    curves = report["curves"]
    assert len(curves) == 2 and all(len(c) == 2 for c in curves.values())  # 2 steps each
    # both trained from the same initial adapter on the same rows in the same order: the first
    # step's loss (before any update) is the same model's on the same rows
    reference, ours = (curves[k] for k in sorted(curves, key=lambda k: "vqa" in k))
    assert ours[0] == pytest.approx(reference[0], rel=0.05)
    # the plan make train would run with (the tiny model keeps every layer on a 24 GiB card)
    assert rows[("train", "vqa (make train)")]["micro_batch"] == 4
    assert all(r["speedup"] > 0 for r in report["results"] if r.get("speedup"))
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "aten::" in (out / "profile_train.txt").read_text()
    assert "| vqa (make train) |" in (out / "bench.md").read_text()


def test_bench_levers_0_leaves_out_the_one_lever_rows_and_keeps_vqa_s(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "scripts/bench.py", "--dry-run", "--model-dir",
                           str(tiny_model_dir), f"ARTIFACTS_DIR={tmp_path / 'out'}",
                           f"BENCH_SCRATCH={tmp_path / 'scratch'}", "BENCH_LEVERS=0",
                           "BENCH_WORK=predict,train"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench" / "bench.json").read_text())["results"]
    setups = {(r["work"], r["setup"]) for r in rows}
    assert {("train", "reference"), ("train", "vqa (make train)"),
            ("predict", "reference: generate, stock vision attention"),
            ("predict", "vqa: score (make submit)"), ("predict", "vqa: INFER_MODE=generate")} \
        == setups  # no "+ ..." lever row, no preparation-alone row


def test_the_same_memory_descent_skips_only_batches_the_margin_cannot_bring_under():
    from types import SimpleNamespace

    from vqa.planning.hardware import GIB
    from vqa.planning.planner import margin_for
    from vqa.planning.shapes import architecture_for

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    arch, _ = architecture_for("Qwen/Qwen3-VL-8B-Instruct")
    case = SimpleNamespace(arch=arch, name="1024x768")
    low = 1 - margin_for(arch)  # 0.88 for Qwen3-VL
    assert bench.surely_over(case, "score", 32, 10 * GIB, limit_gib=10 * low - 0.01)
    assert not bench.surely_over(case, "score", 32, 10 * GIB, limit_gib=10 * low + 0.01)
    assert not bench.surely_over(case, "train", 8, 10 * GIB, limit_gib=10.5)


def test_time_rows_record_their_cost_and_fit_time_refits_the_factors_on_them(tiny_model_dir,
                                                                              tmp_path):
    """BENCH_WORK=time records each row's cost in parts; scripts/fit_time.py fits the factors
    on them, and with them predicts a row it was fitted on (one row: efficiency alone) exactly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "scripts/bench.py", "--dry-run", "--model-dir",
                           str(tiny_model_dir), f"ARTIFACTS_DIR={tmp_path / 'out'}",
                           f"BENCH_SCRATCH={tmp_path / 'scratch'}", "BENCH_WORK=time"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    bench_json = tmp_path / "out" / "bench" / "bench.json"
    rows = json.loads(bench_json.read_text())["results"]
    assert {r["kind"] for r in rows} == {"train", "score"}
    for r in rows:
        assert r["cost"]["flops"] > 0 and r["cost"]["elements"] > 0 and r["measured_s"] > 0
    score = next(r for r in rows if r["kind"] == "score")
    assert score["cost"]["cpu_s"] == pytest.approx(
        score["prepare_row_s"] * min(score["batch"], 8) / 8, rel=1e-3)  # 8 dry-run rows
    fitted = subprocess.run([sys.executable, "scripts/fit_time.py", str(bench_json)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    table = [line for line in fitted.stdout.splitlines() if line.startswith("| base-model |")]
    # fitted on its one row: exact; with no other row to fit on, nothing left out to predict
    assert len(table) == 2 and all(("| +0.0% |" in line or "| -0.0% |" in line)
                                   and line.endswith("| - | - |") for line in table)
    assert "EFFICIENCY = {" in fitted.stdout and "ELEMENT_BYTES = {" in fitted.stdout
    missing = subprocess.run([sys.executable, "scripts/fit_time.py", str(tmp_path / "none")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "not a bench.json" in missing.stderr


def test_bench_says_so_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    done = subprocess.run([sys.executable, "scripts/bench.py"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0
    assert done.stdout.strip() == "bench: no CUDA GPU here; this benchmark runs on a GPU machine only"


def test_a_bad_bench_setting_is_one_line():
    done = subprocess.run([sys.executable, "scripts/bench.py", "BENCH_CAP=lots"], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip() == ("bench: error: BENCH_CAP='lots': expected e.g. 24GiB, 24GB "
                                   "or 23028MiB")


def test_bench_memory_grid_runs_end_to_end_on_cpu(tiny_model_dir, tmp_path):
    """`make bench-memory` on CPU: the grid's train steps (make train's Trainer) and predictions
    (make submit's model) run with the tiny model; nothing is measured, every row is predicted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_IMAGES": "448x448",
           "BENCH_UNCHECKPOINTED": "0,2,0+1", "BENCH_ROWS": "70"}
    done = subprocess.run([sys.executable, "scripts/bench_memory.py", "--dry-run", "--model-dir",
                           str(tiny_model_dir), "BENCH_CAP=24GiB",
                           "BENCH_BATCHES=train=2,4 score=8,70 generate=2,6",
                           f"ARTIFACTS_DIR={tmp_path / 'out'}",
                           f"BENCH_SCRATCH={tmp_path / 'scratch'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench-memory" / "bench_memory.json").read_text())
    grid = {(r["work"], r["batch"]): r for r in rows if not r["planned"]}
    assert set(grid) == {("train", 2), ("train", 4), ("score", 8), ("score", 70),
                         ("generate", 2), ("generate", 6)}
    planned = {r["work"]: r for r in rows if r["planned"]}
    assert set(planned) == {"train", "score"} and planned["score"]["batch"] == 64
    # 24 GiB holds the tiny model's every layer un-checkpointed: the planned step is timed
    # against every layer checkpointed; a scoring batch above 64 against batches of 64
    layers = json.loads((tiny_model_dir / "config.json").read_text())["text_config"][
        "num_hidden_layers"]
    assert planned["train"]["uncheckpointed_layers"] == layers
    assert planned["train"]["predicted"]["reserved_gib"] > grid[("train", 4)]["predicted"][
        "reserved_gib"]
    assert planned["train"]["speed"]["seconds_per_step"] > 0
    assert planned["train"]["speed"]["seconds_per_step_baseline"] > 0
    assert grid[("score", 70)]["speed"]["seconds_per_row_baseline"] > 0
    assert f"last {layers} layers kept" in done.stdout and "(batches of 64) |" in done.stdout
    assert all(r["predicted"]["reserved_gib"] >= r["predicted"]["allocated_gib"] > 0 for r in rows)
    assert all(r["measured"]["oom"] is False and "reserved_gib" not in r["measured"] for r in rows)
    assert "| tiny" not in done.stdout and "| base-model | 448x448 | train | 2 |" in done.stdout
    trade = [json.loads(line) for line in done.stdout.splitlines()
             if line.startswith('{"uncheckpointed_layers"')]
    assert [(t["uncheckpointed_layers"], t["uncheckpointed_attention"], t["rows"])
            for t in trade] == [(0, 0, 4), (2, 0, 4), (0, 1, 4)]
    assert all(t["seconds_per_step"] > 0 for t in trade)
    # each with the planner's prediction: two kept layers cost more than an attention block
    reserved = [t["predicted"]["reserved_gib"] for t in trade]
    assert reserved[0] < reserved[2] < reserved[1]


def test_bench_memory_picks_work_and_batches_from_the_one_config():
    from vqa.config import load_bench_config

    bench = _load_bench_memory()
    default = load_bench_config([], environ={})
    assert bench.works(default) == ["train", "generate", "score"]
    assert bench.wanted_phases(default) == ("train", "predict")
    picked = load_bench_config(["BENCH_BATCHES=score=8,24,48 generate=1"],
                               environ={"BENCH_WORK": "score"})
    assert bench.works(picked) == ["score"] and bench.wanted_phases(picked) == ("predict",)
    assert bench.batches(picked, "score") == (8, 24, 48)
    assert bench.batches(picked, "generate") == (1,)
    assert bench.batches(picked, "train") == bench.BATCHES["train"]
    row = {"model": "/m/model-7B", "images": "448x448", "work": "score", "batch": 64,
           "planned": True, "predicted": {"allocated_gib": 7.8, "reserved_gib": 8.2},
           "measured": {"oom": False, "allocated_gib": 7.69, "reserved_gib": 8.1,
                        "vision_allocated_gib": 7.69, "language_allocated_gib": 6.67},
           "reserved_error": 0.013, "share_of_cap": 0.337}
    assert ("| model-7B | 448x448 | score (planner's) | 64 | 7.8 / 8.2 | 7.69 / 8.1 | "
            "7.69 / 6.67 | +1.3% | 34% |") in bench.markdown([row], "# h")


def test_bench_memory_runs_a_qwen3_vl_model_on_cpu(tmp_path):
    """The same grid on a tiny Qwen3-VL (DeepStack, full-attention vision tower): make train's
    step and make submit's prediction run, every row is predicted, the plan has its margin."""
    from vqa import tiny

    tokenizer = tiny.train_tokenizer(["what color is the shape?"] * 20)
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer, "qwen3_vl"), seed=0)
    tiny.save_model_folder(model, tiny.tiny_processor(tokenizer, "qwen3_vl"),
                           tmp_path / "qwen3-vl", {})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "scripts/bench_memory.py", "--dry-run", "--model-dir",
                           str(tmp_path / "qwen3-vl"), "BENCH_CAP=24GiB", "BENCH_ROWS=8",
                           "BENCH_IMAGES=1024x768", "BENCH_WORK=train,score",
                           "BENCH_BATCHES=train=2 score=4", f"ARTIFACTS_DIR={tmp_path / 'out'}",
                           f"BENCH_SCRATCH={tmp_path / 'scratch'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench-memory" / "bench_memory.json").read_text())
    assert {(r["work"], r["batch"], r["planned"]) for r in rows} == {
        ("train", 2, False), ("train", 16, True), ("score", 4, False), ("score", 8, True)}
    from vqa.planning.shapes import visual_tokens_for

    min_pixels, max_pixels = tiny.tiny_pixels("qwen3_vl")
    expected = visual_tokens_for(768, 1024, min_pixels=min_pixels, max_pixels=max_pixels,
                                 patch_size=16, merge_size=2)  # 32x32 pixels a token
    assert expected == 234 and all(r["predicted"]["visual_tokens"] == expected for r in rows)
    assert all(r["measured"]["oom"] is False for r in rows)
