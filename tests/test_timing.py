"""The time model (vqa/planning/timing.py): exact on hand-counted FLOPs, monotone in rows,
tokens and epochs, scaled by each card's published rates; preflight's hours."""

import dataclasses

import pytest

from vqa.config import load_config
from vqa.planning import timing
from vqa.planning.hardware import gpu_table
from vqa.planning.shapes import architecture_for

ARCH, _ = architecture_for("Qwen/Qwen2.5-VL-7B-Instruct")


def _toy():
    """A one-layer model small enough to count its FLOPs by hand."""
    return dataclasses.replace(ARCH, hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1,
                               head_dim=2, vocab=10, vision_depth=1, vision_hidden=2,
                               vision_intermediate=4, vision_out=4, merge=2, vision_mergers=1,
                               attention_layer_count=0, text_linear_shapes=())


def test_forward_flops_match_a_hand_count():
    toy = _toy()
    # language model: q,o 2*(4x4), k,v 2*(4x2), MLP 3*(4x8) = 32+16+96 = 144 weights a layer;
    # 2 FLOPs each per token over 5 tokens, attention 4*5*5*4, lm_head 2*4*10 at one position
    assert timing.forward_flops(toy, 5, 0, 1) == 2 * 144 * 5 + 4 * 25 * 4 + 2 * 4 * 10
    # vision, one visual token = 4 patches: blocks 4*2*2 + 3*2*4 = 40 weights, merger
    # (8x8 + 8x4) per visual token; full attention (a 1-block windowed tower keeps no window
    # block beyond its 4 full ones, so the whole image): 4 * 4*4 patches * 2
    vision = 2 * 40 * 4 + 2 * (64 + 32) * 1 + 4 * 16 * 2
    assert timing.forward_flops(toy, 0, 1, 0, windowed=False) == vision


def test_time_grows_with_rows_tokens_and_epochs_and_shrinks_with_a_faster_card():
    a10g, h200 = gpu_table()["A10G"], gpu_table()["H200"]
    base = timing.train_epoch_seconds(ARCH, [400] * 64, [256] * 64, 8, a10g)
    assert timing.train_epoch_seconds(ARCH, [400] * 128, [256] * 128, 8, a10g) > base * 1.9
    assert timing.train_epoch_seconds(ARCH, [800] * 64, [256] * 64, 8, a10g) > base
    assert timing.train_epoch_seconds(ARCH, [400] * 64, [1024] * 64, 8, a10g) > base
    faster = timing.train_epoch_seconds(ARCH, [400] * 64, [256] * 64, 8, h200)
    assert faster < base / 5  # 989 against 70 TFLOPS bf16
    # keeping layers out of checkpointing recomputes less
    assert timing.train_epoch_seconds(ARCH, [400] * 64, [256] * 64, 8, a10g,
                                      kept_layers=28) < base
    score = timing.predict_seconds(ARCH, [400] * 64, [256] * 64, 32, a10g)
    generate = timing.predict_seconds(ARCH, [400] * 64, [256] * 64, 32, a10g, mode="generate")
    assert generate > score and timing.predict_seconds(ARCH, [400] * 64, [256] * 64, 32, a10g,
                                                       ranks=2) == pytest.approx(score / 2)


def test_durations_read_in_hours_minutes_or_seconds():
    assert [timing.hours(s) for s in (3900, 720, 40, 4.2, 0.0123)] == [
        "1 h 05 min", "12 min", "40 s", "4.2 s", "0.012 s"]


def test_padding_counts_each_batch_at_its_longest_row():
    lengths, visual = [100, 900, 100, 900], [4] * 4
    # prediction orders rows by text length, longest first (vqa.predict.length_order)
    assert [b[0] for b in timing.batches(lengths, visual, 2, None)] == [900, 100]
    # ... by text alone: a large image does not move a row
    assert timing.batches([300, 200, 1000], [8, 8, 900], 1, None) == [
        (300, [8]), (200, [8]), (1000, [900])]
    # training draws them in the sampler's seeded order: some batch mixes long and short
    drawn = timing.batches([100, 900] * 8, [4] * 16, 2, seed=42)
    assert len(drawn) == 8 and {b[0] for b in drawn} == {100, 900}
    assert drawn == timing.batches([100, 900] * 8, [4] * 16, 2, seed=42)


def test_submit_is_predicted_on_the_test_rows_alone():
    from vqa.planning.planner import Plan
    from vqa.planning.rows import Workload

    config = load_config(["TARGET_GPU=A10G", "VAL_SAMPLE=64"], environ={})
    a10g = gpu_table()["A10G"]
    # 100 test rows, then 300 of train.csv's that make eval's validation sample may use
    work = Workload([400] * 300, [256] * 300, [400] * 400, [256] * 400, test_rows=100)
    times = timing.predicted_times(config, ARCH, work, Plan(8, 2, 32), ("A10G", a10g))
    alone = timing.predict_seconds(ARCH, [400] * 100, [256] * 100, 32, a10g)
    assert times["submit_s"] == pytest.approx(alone, rel=1e-3)


def test_cards_without_bf16_use_their_fp16_rate():
    rate, bandwidth, dtype = timing.card_rates(gpu_table()["T4"])
    assert (rate, bandwidth, dtype) == (65e12, 320e9, "fp16")
    assert timing.card_rates(gpu_table()["L4"])[2] == "bf16"
    assert all("rates_source" in card for card in gpu_table().values())


def test_stage_times_follow_early_stopping_and_rotation():
    from vqa.planning.planner import Plan
    from vqa.planning.rows import Workload

    settings = ["EPOCHS=3", "TARGET_GPU=A10G", "VAL_SAMPLE=64"]
    config = load_config(settings, environ={})
    work = Workload([400] * 200, [256] * 200, [400] * 100, [256] * 100)
    plan = Plan(8, 2, 32)
    a10g = ("A10G", gpu_table()["A10G"])
    once = timing.predicted_times(config, ARCH, work, plan, a10g)
    rotated = timing.predicted_times(load_config([*settings, "TTA=rotate"], environ={}), ARCH,
                                     work, plan, a10g)
    assert once["best_epochs"] == 2 and once["epochs"] == 3
    assert once["train_worst_s"] == pytest.approx(once["train_epoch_s"] * 3, rel=1e-3)
    assert once["train_best_s"] == pytest.approx(once["train_epoch_s"] * 2, rel=1e-3)
    assert rotated["submit_s"] == pytest.approx(once["submit_s"] * 4, rel=0.01)
    assert once["extrapolated_from_h200"]
    assert "predicted on A10G (extrapolated" in timing.time_lines(once)[0]


def test_preflight_prints_predicted_hours_for_the_target_card(small_data, tiny_model_dir,
                                                              tmp_path, capsys):
    from vqa.preflight import run_preflight

    config = load_config([f"DATA_DIR={small_data}", f"MODEL_ID={tiny_model_dir}",
                          f"ARTIFACTS_DIR={tmp_path}", "TARGET_GPU=L4"], environ={})
    run_preflight(config)
    out = capsys.readouterr().out
    assert "time: predicted on L4 (extrapolated from the H200's measured efficiency)" in out
    assert "CPU side:" in out  # decoding and processing a row, measured here
    assert "## Time" in (tmp_path / "preflight.md").read_text()


def test_the_job_ends_when_the_stage_ends_plus_the_later_stages_at_the_measured_pace():
    from vqa.clock import clock, postfix

    now = 1_800_000_000.0
    predicted = {"train_worst_s": 200.0, "submit_s": 50.0}
    # 10 of 20 steps in 100 s: on the predicted pace, 100 s of training and 50 of submit left
    assert postfix("train", 100, 10, 10, 20, predicted, now) == (
        f"train ends {clock(now + 100, now)}, job ends {clock(now + 150, now)}")
    # twice as slow as predicted: the later stages are assumed twice as slow too
    assert postfix("train", 200, 10, 10, 20, predicted, now) == (
        f"train ends {clock(now + 200, now)}, job ends {clock(now + 300, now)}")
    # without a prediction (a CPU run, no card), the stage's own end only
    assert postfix("train", 100, 10, 10, 20, None, now) == f"train ends {clock(now + 100, now)}"
    assert postfix("submit", 10, 5, 5, 10, predicted, now) == f"submit ends {clock(now + 10, now)}"
    assert postfix("train", 0, 0, 20, 20, predicted, now) == ""
    assert clock(now + 3 * 86400, now)[:3].isalpha()  # days ahead: the weekday too


def test_a_prediction_bar_shows_when_its_rows_will_be_done(monkeypatch):
    from types import SimpleNamespace

    import vqa.clock
    from vqa.clock import bar_postfix, clock

    monkeypatch.setattr(vqa.clock.time, "time", lambda: 1_800_000_000.0)
    # 5 of 10 rows in 10 s: 10 s to go
    bar = SimpleNamespace(n=5, total=10, format_dict={"elapsed": 10.0})
    assert bar_postfix(bar) == f"ends {clock(1_800_000_010.0, 1_800_000_000.0)}"
    assert bar_postfix(SimpleNamespace(n=0, total=10, format_dict={"elapsed": 0.0})) == ""


def test_the_training_bar_shows_the_jobs_end(monkeypatch):
    from types import SimpleNamespace

    import vqa.clock
    from vqa.clock import job_clock

    shown = []
    bar = SimpleNamespace(set_postfix_str=lambda text, refresh: shown.append(text))
    callback = job_clock({"train_epoch_s": 5.0, "train_worst_s": 15.0, "submit_s": 5.0})
    callback.progress = SimpleNamespace(training_bar=bar)
    state = SimpleNamespace(global_step=3, max_steps=10)  # resumed at step 3
    args = SimpleNamespace(num_train_epochs=2)  # not the 3 epochs the plan was made at
    callback.on_train_begin(args, state, None)
    state.global_step = 5
    callback.on_step_end(args, state, None)
    assert len(shown) == 1 and shown[0].startswith("train ends ") and ", job ends " in shown[0]
    # the steps this run made itself, the steps left, and the prediction for the epochs it runs
    asked = []
    monkeypatch.setattr(vqa.clock, "postfix", lambda *a: asked.append(a) or "")
    callback.on_step_end(args, state, None)
    _, _, done, remaining, whole, predicted = asked[0]
    assert (done, remaining, whole) == (2, 5, 10)
    assert predicted["train_worst_s"] == 10.0 and predicted["submit_s"] == 5.0


@pytest.mark.parametrize("name, total_gib, expected", [
    ("NVIDIA A100-SXM4-80GB", None, "A100-80GB"), ("NVIDIA A100-SXM4-40GB", None, "A100-40GB"),
    ("NVIDIA A100 80GB PCIe", None, "A100-80GB"), ("NVIDIA A100-PCIE", 80, "A100-80GB"),
    ("NVIDIA A100-PCIE", 40, "A100-40GB"), ("NVIDIA H100 80GB HBM3", None, "H100-80GB"),
    ("NVIDIA H200", 141, "H200"), ("NVIDIA A10G", 22, "A10G"), ("NVIDIA L4", None, "L4"),
    ("Tesla T4", None, "T4"), ("NVIDIA GeForce RTX 3090", None, "RTX3090"),
    ("NVIDIA L40S", 45, None), ("NVIDIA A10", 24, None), ("NVIDIA B200", None, None),
    ("A100-80GB", None, "A100-80GB")])  # TARGET_GPU's own keys name themselves
def test_a_card_is_found_by_its_nvml_name_and_memory(name, total_gib, expected):
    from vqa.planning.timing import card_named

    found = card_named(name, total_gib and total_gib * 2**30)
    assert (found and found[0]) == expected
