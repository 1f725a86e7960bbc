import pytest
from PIL import Image

from vqa.config import load_config
from vqa.memory import (
    GIB,
    PLAN_MARGIN,
    MEASURED_KEPT_PEAKS,
    MEASURED_PEAKS,
    Architecture,
    Workload,
    architecture_for,
    budget_for,
    gpu_table,
    infer_peak,
    infer_phases,
    parse_memory,
    plan_batch_sizes,
    probe_machine,
    train_estimate,
    train_peak,
    vision_chunk,
    visual_tokens_for,
)


@pytest.mark.parametrize("size", [(64, 64), (448, 448), (1024, 768), (768, 1024), (1400, 1400),
                                  (3000, 40), (57, 4000), (1, 1), (28, 28), (1920, 1080)])
@pytest.mark.parametrize("pixels", [(3136, 1003520), (3136, 12845056), (12544, 200704)])
def test_visual_token_rule_matches_the_real_processor(size, pixels):
    from transformers import Qwen2VLImageProcessor

    min_pixels, max_pixels = pixels
    processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    width, height = size
    if max(size) / min(size) > 200:
        with pytest.raises(ValueError):
            visual_tokens_for(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        return
    grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
    expected = int(grid.prod()) // 4
    assert visual_tokens_for(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == expected


def test_published_max_pixels_allow_16384_tokens_per_image():
    assert visual_tokens_for(4000, 3200, min_pixels=3136, max_pixels=12845056) <= 16384
    assert visual_tokens_for(448, 448, min_pixels=3136, max_pixels=12845056) == 256


def test_machine_probe_without_a_gpu_says_so(tmp_path):
    machine = probe_machine(tmp_path)
    assert machine.ram_total_bytes > 0 and machine.disk_free_bytes > 0
    assert machine.gpus or machine.nvml_error


def test_gpu_table_has_the_common_cards():
    table = gpu_table()
    assert table["A10G"]["memory_mib"] == 23028 and table["T4"]["bf16"] is False


def test_plan_respects_user_settings_and_keeps_the_effective_batch():
    plan = plan_batch_sizes(load_config(["PER_DEVICE_BATCH=4", "PRED_BATCH_SIZE=3"], environ={}))
    assert (plan.per_device_batch, plan.gradient_accumulation, plan.pred_batch_size) == (4, 4, 3)
    assert any("set by the user" in r for r in plan.reasons)
    auto = plan_batch_sizes(load_config([], environ={}))
    assert auto.per_device_batch * auto.gradient_accumulation == 16
    odd = plan_batch_sizes(load_config(["EFFECTIVE_BATCH_SIZE=24"], environ={}))
    assert odd.per_device_batch * odd.gradient_accumulation == 24


# ---------------------------------------------------------------------------------------------
# The peak-VRAM model

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"
THREE_B = "Qwen/Qwen2.5-VL-3B-Instruct"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _arch(model_id: str) -> Architecture:
    return architecture_for(load_config([f"MODEL_ID={model_id}"],
                                        environ={"HF_HUB_OFFLINE": "1"}))[0]


def test_architecture_counts_match_the_real_module_tree(tiny_model_dir):
    """Linear weights (what bitsandbytes quantizes), embeddings and LoRA parameters, counted from
    config.json alone, equal what transformers and peft build."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    arch, source = architecture_for(load_config([f"MODEL_ID={tiny_model_dir}"], environ={}))
    assert source.endswith("config.json")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    assert arch.linear_params == linears
    embeddings = {id(p): p.numel() for p in (model.get_input_embeddings().weight,
                                             model.get_output_embeddings().weight)}
    assert arch.embedding_params == sum(embeddings.values())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS.split(",")))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(8, TARGETS) == trainable


def test_published_3b_lora_count_is_the_one_training_reported():
    # `make bench-gpus` on the 3B logged "trainable 74305536 of 3828928512 parameters".
    assert _arch(THREE_B).lora_params(32, TARGETS) == 74_305_536
    assert _arch(SEVEN_B).tied is False and _arch(THREE_B).tied is True


# The grid's target: within 10% on every row (BENCHMARKS.md lists each row's error).
def _measured_estimate(model_id, work, batch, length, visual):
    from vqa.speed import LABEL_WINDOW

    arch = _arch(model_id)
    if work == "train":
        return train_peak(arch, tokens=batch * length, patches=batch * 4 * visual,
                          logit_rows=batch * LABEL_WINDOW, length=length, fp32_casts=False)
    return infer_peak(arch, batch=batch, tokens=batch * length, batch_patches=batch * 4 * visual,
                      vision_patches=vision_chunk([4 * visual] * batch), mode=work)


@pytest.mark.parametrize("model_id, work, batch, length, visual, allocated, reserved",
                         MEASURED_PEAKS)
def test_every_measured_peak_is_predicted_closely(model_id, work, batch, length, visual,
                                                  allocated, reserved):
    estimate = _measured_estimate(model_id, work, batch, length, visual)
    assert abs(estimate.reserved / GIB / reserved - 1) <= 0.10
    assert abs(estimate.allocated / GIB / allocated - 1) <= 0.10
    assert estimate.reserved >= estimate.allocated
    assert abs(sum(estimate.terms.values()) - estimate.reserved) < 1  # the terms add up


@pytest.mark.parametrize("model_id, batch, length, visual, kept, attention, allocated, reserved",
                         MEASURED_KEPT_PEAKS)
def test_training_with_layers_kept_is_predicted_closely(model_id, batch, length, visual, kept,
                                                        attention, allocated, reserved):
    from vqa.speed import LABEL_WINDOW

    def estimate(layers, blocks=attention):
        return train_peak(_arch(model_id), tokens=batch * length, patches=batch * 4 * visual,
                          logit_rows=batch * LABEL_WINDOW, length=length, fp32_casts=False,
                          uncheckpointed=layers, attention_kept=blocks)

    assert abs(estimate(kept).reserved / GIB / reserved - 1) <= 0.10
    assert abs(estimate(kept).allocated / GIB / allocated - 1) <= 0.10
    # each layer kept costs, and each attention block a fraction of what a layer costs
    assert kept == 0 or estimate(kept).reserved > estimate(kept - 1).reserved
    if attention:
        block = estimate(kept).reserved - estimate(kept, attention - 1).reserved
        layer = estimate(kept + 2, 0).reserved - estimate(kept + 1, 0).reserved
        assert 0 < block < layer / 2


@pytest.mark.parametrize("model_id, batch, length, visual, larger", [
    # measured (bench-memory, H200): the vision tower's phase 5.13 GiB, the language model's 3.52
    (THREE_B, 8, 2617, 2500, "vision tower"),
    # measured: the language model's phase 13.51 GiB, the vision tower's 9.75
    (SEVEN_B, 48, 2617, 2500, "language model"),
])
def test_a_prediction_peaks_in_the_phase_measured_larger(model_id, batch, length, visual, larger):
    args = dict(batch=batch, tokens=batch * length, batch_patches=batch * 4 * visual,
                vision_patches=vision_chunk([4 * visual] * batch), mode="score")
    phases = infer_phases(_arch(model_id), **args)
    assert max(phases, key=lambda name: phases[name].allocated) == larger
    peak = infer_peak(_arch(model_id), **args)
    assert peak.reserved == max(p.reserved for p in phases.values())
    assert peak.allocated == max(p.allocated for p in phases.values())
    assert peak.terms == max(phases.values(), key=lambda p: p.reserved).terms


def test_peak_grows_with_batch_length_and_image_size():
    arch = _arch(SEVEN_B)
    train = [train_peak(arch, tokens=b * s, patches=b * 4 * v).reserved
             for b, s, v in [(1, 370, 256), (2, 370, 256), (2, 1113, 999), (4, 1113, 999)]]
    assert train == sorted(train) and len(set(train)) == 4
    for mode in ("score", "generate"):
        infer = [infer_peak(arch, batch=b, tokens=b * s, vision_patches=b * 4 * v,
                            mode=mode).reserved
                 for b, s, v in [(1, 370, 256), (8, 370, 256), (8, 1113, 999)]]
        assert infer == sorted(infer) and len(set(infer)) == 3
    # closed form: the 4-bit weights are half a byte a weight plus the quantization state
    weights = train_peak(arch, tokens=0, patches=0).terms["base weights (4-bit NF4)"]
    assert weights == pytest.approx(arch.linear_params * (0.5 + 1 / 64 + 4 / 16384))
    bf16 = train_peak(arch, tokens=0, patches=0, quant="none").terms["base weights (bf16)"]
    assert bf16 == arch.linear_params * 2


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * GIB), ("24 gb", 24 * 10**9),
                                            ("23028MiB", 23028 * 2**20), ("16", 16 * GIB)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_unknown_target_card_or_memory_is_one_line():
    from vqa.config import ConfigError

    with pytest.raises(ValueError, match="TARGET_GPU='B300X'.*known: A10G"):
        budget_for(load_config(["TARGET_GPU=B300X"], environ={}), None)
    with pytest.raises(ConfigError, match="TARGET_GPU='B300X'.*known: A10G"):
        load_config(["TARGET_GPU=B300X"], environ={})  # a one-line error before any stage runs
    with pytest.raises(ConfigError, match="TARGET_GPU_MEMORY='lots'"):
        load_config(["TARGET_GPU_MEMORY=lots"], environ={})
    a10g = budget_for(load_config(["TARGET_GPU=a10g"], environ={}), None)
    assert a10g.name.startswith("TARGET_GPU=A10G") and a10g.usable_bytes < 23028 * 2**20


def _work(visual: int, length: int, rows: int = 4096) -> Workload:
    return Workload([length] * rows, [visual] * rows, [length] * rows, [visual] * rows)


def _plan(settings: list[str], work: Workload, model_id: str = SEVEN_B):
    config = load_config(settings, environ={})
    return plan_batch_sizes(config, None, _arch(model_id), work), config


@pytest.mark.parametrize("card", ["A10G", "L4", "T4", "A100-40GB", "H100-80GB"])
def test_planner_picks_the_largest_batches_that_fit_each_card(card):
    plan, config = _plan([f"TARGET_GPU={card}"], _work(256, 370))
    limit = plan.budget["planned_gib"]
    assert plan.verdict == "fits" and not plan.blocking
    train = {c["batch"]: c["reserved_gib"] for c in plan.candidates if c["work"] == "train"}
    assert train[plan.per_device_batch] <= limit
    larger = [b for b in train if b > plan.per_device_batch]
    assert all(train[b] > limit for b in larger)  # the next divisor would not fit
    assert plan.per_device_batch * plan.gradient_accumulation == 16
    assert plan.predict_peak["reserved_gib"] <= limit
    # what the micro-batch leaves goes to un-checkpointed layers, one more would not fit; what
    # those leave, to attention blocks below them, one more of which would not fit either
    kept, attention = plan.uncheckpointed_layers, plan.uncheckpointed_attention
    arch, work, batch = _arch(SEVEN_B), _work(256, 370), plan.per_device_batch
    assert train[batch] <= plan.train_peak["reserved_gib"] <= limit
    assert plan.train_peak["reserved_gib"] * GIB == pytest.approx(
        train_estimate(config, arch, work, batch, kept, attention).reserved, rel=1e-3)
    assert kept == arch.layers or train_estimate(
        config, arch, work, batch, kept + 1).reserved > limit * GIB
    assert kept + attention == arch.layers or train_estimate(
        config, arch, work, batch, kept, attention + 1).reserved > limit * GIB
    predict = {c["batch"]: c["reserved_gib"] for c in plan.candidates if c["work"] == "score"}
    assert predict[plan.pred_batch_size] <= limit
    assert predict.get(plan.pred_batch_size + 1, limit + 1) > limit  # shown when memory stops it


def test_planner_batches_follow_the_card_and_the_images():
    small = {card: _plan([f"TARGET_GPU={card}"], _work(256, 370))[0]
             for card in ("T4", "A10G", "H100-80GB")}
    assert (small["T4"].per_device_batch <= small["A10G"].per_device_batch
            <= small["H100-80GB"].per_device_batch)
    large = {card: _plan([f"TARGET_GPU={card}"], _work(2500, 2614))[0]
             for card in ("T4", "H100-80GB")}
    assert large["T4"].pred_batch_size < large["H100-80GB"].pred_batch_size
    big = {card: _plan([f"TARGET_GPU={card}"], _work(2500, 2614))[0] for card in ("T4", "A10G")}
    assert big["A10G"].per_device_batch < small["A10G"].per_device_batch
    assert big["T4"].pred_batch_size < small["T4"].pred_batch_size
    # the plan says what stops each batch: memory (the next candidate's peak) or its own limit
    why = lambda plan, knob: next(r for r in plan.reasons if r.startswith(knob + "="))  # noqa: E731
    b = big["A10G"].per_device_batch
    assert f"; the next divisor, {2 * b}, is predicted at" in why(big["A10G"], "PER_DEVICE_BATCH")
    assert why(small["H100-80GB"], "PER_DEVICE_BATCH").endswith(
        "it is the whole effective batch per GPU (16)")
    assert why(small["A10G"], "PRED_BATCH_SIZE").endswith(
        "64 is the ceiling: score throughput does not grow beyond it (MAX_PRED_BATCH)")
    p = big["T4"].pred_batch_size
    assert f"; {p + 1} is predicted at" in why(big["T4"], "PRED_BATCH_SIZE")
    few = _plan(["TARGET_GPU=A10G"], _work(256, 370, rows=10))[0]
    assert few.pred_batch_size == 10 and why(few, "PRED_BATCH_SIZE").endswith(
        "10 is the ceiling: it holds every row to predict (10)")


def test_an_override_that_will_not_fit_is_warned_with_its_predicted_peak():
    plan, _ = _plan(["TARGET_GPU=A10G", "PER_DEVICE_BATCH=16"], _work(2500, 2614))
    assert plan.per_device_batch == 16 and "set by the user" in " ".join(plan.reasons)
    assert plan.warnings and plan.warnings[0].startswith("PER_DEVICE_BATCH=16 is predicted to need")


def test_nothing_fits_says_will_run_out_of_memory():
    plan, _ = _plan(["TARGET_GPU=T4"], _work(16384, 16500))
    assert plan.verdict == "will run out of memory"
    assert plan.blocking[0].startswith("training at micro-batch 1 is predicted to peak at")


def test_cpu_plan_is_unchanged_without_a_target():
    plan = plan_batch_sizes(load_config([], environ={}), None, _arch(SEVEN_B), _work(4, 60))
    assert plan.verdict == "CPU run" and plan.budget is None
    assert PLAN_MARGIN == 0.10


def test_bench_memory_grid_runs_end_to_end_on_cpu(tiny_model_dir, tmp_path):
    """`make bench-memory` on CPU: the grid's train steps and predictions run through the
    product's code with the tiny model; nothing is measured, every row is predicted."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "ARTIFACTS_DIR": str(tmp_path / "out"),
           "BENCH_SCRATCH": str(tmp_path / "scratch"), "BENCH_IMAGES": "448x448",
           "BENCH_UNCHECKPOINTED": "0,2,0+1", "BENCH_ROWS": "70",
           "BENCH_BATCHES": "train=2,4 score=8,70 generate=2,6"}
    done = subprocess.run([sys.executable, "scripts/bench_memory.py", "--dry-run", "--model-dir",
                           str(tiny_model_dir), "--cap", "24GiB"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
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


def test_bench_memory_picks_work_and_batches_from_the_environment(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.works() == ["train", "generate", "score"]
    assert bench.wanted_phases() == ("train", "predict")
    monkeypatch.setenv("BENCH_WORK", "score")
    monkeypatch.setenv("BENCH_BATCHES", "score=8,24,48 generate=1")
    assert bench.works() == ["score"] and bench.wanted_phases() == ("predict",)
    assert bench.batches("score") == (8, 24, 48) and bench.batches("generate") == (1,)
    assert bench.batches("train") == bench.BATCHES["train"]
    row = {"model": "/m/model-7B", "images": "448x448", "work": "score", "batch": 64,
           "planned": True, "predicted": {"allocated_gib": 7.8, "reserved_gib": 8.2},
           "measured": {"oom": False, "allocated_gib": 7.69, "reserved_gib": 8.1,
                        "vision_allocated_gib": 7.69, "language_allocated_gib": 6.67},
           "reserved_error": 0.013, "share_of_cap": 0.337}
    assert ("| model-7B | 448x448 | score (planner's) | 64 | 7.8 / 8.2 | 7.69 / 8.1 | "
            "7.69 / 6.67 | +1.3% | 34% |") in bench.markdown([row], "# h")
