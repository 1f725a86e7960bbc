"""vqa/planning/: the machine and card, the shapes and the visual-token rule, the peak-VRAM model
against every measured peak, and the planner's choices."""

import json

import pytest
from PIL import Image

from vqa.config import DEFAULT_LORA_TARGETS, load_config
from vqa.planning.calibration import measured_peaks
from vqa.planning.hardware import (CUDA_CONTEXT_BYTES, GIB, GPUInfo, Machine, budget_for,
                                   parse_memory, probe_machine, visible_gpus)
from vqa.planning.peaks import infer_peak, infer_phases, train_peak, vision_chunk
from vqa.planning.planner import PLAN_MARGIN, plan_batches, train_estimate
from vqa.planning.rows import Workload
from vqa.planning.shapes import Architecture, architecture_for, visual_tokens_for


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


# ---------------------------------------------------------------------------------------------
# The machine and the card


class FakeNVML:
    """pynvml's calls that probe_machine makes, answering for `gpus` (name, total GiB, free GiB)."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus=(), fail=False):
        self.gpus, self.fail = list(gpus), fail

    def nvmlInit(self):
        if self.fail:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return b"580.1"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, index):
        name, total, free = self.gpus[index]
        return type("Memory", (), {"total": int(total * GIB), "free": int(free * GIB)})

    def nvmlDeviceGetCudaComputeCapability(self, index):
        return (8, 6)

    def nvmlDeviceGetComputeRunningProcesses(self, index):
        return []

    def nvmlDeviceGetName(self, index):
        return self.gpus[index][0].encode()

    def nvmlDeviceGetUUID(self, index):
        return f"GPU-{index}abc-{self.gpus[index][0]}"


def test_machine_probe_reads_every_gpu_and_says_when_there_is_no_driver(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([("A10G", 22.5, 21.9), ("L4", 22.5, 3.0)]))
    machine = probe_machine(tmp_path)
    assert [(g.index, g.name, g.uuid) for g in machine.gpus] == [
        (0, "A10G", "GPU-0abc-A10G"), (1, "L4", "GPU-1abc-L4")]
    assert machine.gpus[1].free_bytes == 3 * GIB and machine.cuda_driver_version == "13.0"
    assert machine.ram_total_bytes > 0 and machine.disk_free_bytes > 0
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail=True))
    none = probe_machine(tmp_path)
    assert none.gpus == [] and "NVML Shared Library Not Found" in none.nvml_error


def _machine(*gpus) -> Machine:
    return Machine(gpus=[GPUInfo(i, name, int(total * GIB), int(free * GIB), "8.6", True, 0,
                                 f"GPU-{i}abc")
                         for i, (name, total, free) in enumerate(gpus)])


def test_the_budget_is_the_cards_total_less_the_context_never_what_is_free():
    """The memory NVML reports free drops by the weights once a stage has loaded its model:
    planning from it counted the weights twice."""
    loaded = _machine(("A10G", 22.0, 14.5))  # 7.5 GiB already held, e.g. by our own weights
    budget = budget_for("", "", loaded)
    assert budget.usable_bytes == int(22.0 * GIB) - CUDA_CONTEXT_BYTES
    assert budget_for("", "", _machine(("A10G", 22.0, 22.0))) == budget


def test_the_budget_follows_cuda_visible_devices(monkeypatch):
    machine = _machine(("H200", 139.0, 139.0), ("A10G", 22.0, 22.0), ("L4", 22.5, 22.5))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.name for g in visible_gpus(machine)] == ["H200", "A10G", "L4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert budget_for("", "", machine).name.startswith("GPU 1 A10G")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2ab,0")  # by UUID prefix, CUDA's order
    assert [g.name for g in visible_gpus(machine)] == ["L4", "H200"]
    assert budget_for("", "", machine, nproc=2).name.startswith("GPU 2 L4")  # the smaller
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7,0")  # CUDA stops at the first bad entry
    assert [g.name for g in visible_gpus(machine)] == ["L4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(machine) == [] and budget_for("", "", machine) is None


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * GIB), ("24 gb", 24 * 10**9),
                                            ("23028MiB", 23028 * 2**20), ("16", 16 * GIB)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_unknown_target_card_or_memory_is_one_line():
    from vqa.config import ConfigError

    with pytest.raises(ValueError, match="TARGET_GPU='B300X'.*known: A10G"):
        budget_for("B300X", "", None)
    with pytest.raises(ConfigError, match="TARGET_GPU='B300X'.*known: A10G"):
        load_config(["TARGET_GPU=B300X"], environ={})  # a one-line error before any stage runs
    with pytest.raises(ConfigError, match="TARGET_GPU_MEMORY='lots'"):
        load_config(["TARGET_GPU_MEMORY=lots"], environ={})
    a10g = budget_for("a10g", "", None)
    assert a10g.name.startswith("TARGET_GPU=A10G") and a10g.usable_bytes < 23028 * 2**20


# ---------------------------------------------------------------------------------------------
# Shapes

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"
THREE_B = "Qwen/Qwen2.5-VL-3B-Instruct"


def _arch(model_id: str) -> Architecture:
    return architecture_for(model_id)[0]


def test_architecture_counts_match_the_real_module_tree(tiny_model_dir):
    """Linear weights (what bitsandbytes quantizes), embeddings and LoRA parameters, counted from
    config.json alone, equal what transformers and peft build."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    arch, source = architecture_for(str(tiny_model_dir))
    assert source.endswith("config.json")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    assert arch.linear_params == linears
    embeddings = {id(p): p.numel() for p in (model.get_input_embeddings().weight,
                                             model.get_output_embeddings().weight)}
    assert arch.embedding_params == sum(embeddings.values())
    peft_model = get_peft_model(model, LoraConfig(r=8,
                                                  target_modules=DEFAULT_LORA_TARGETS.split(",")))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(8, DEFAULT_LORA_TARGETS) == trainable


def test_published_3b_lora_count_is_the_one_training_reported():
    # `make bench-gpus` on the 3B logged "trainable 74305536 of 3828928512 parameters".
    assert _arch(THREE_B).lora_params(32, DEFAULT_LORA_TARGETS) == 74_305_536
    assert _arch(SEVEN_B).tied is False and _arch(THREE_B).tied is True


def test_a_broken_config_json_is_named_not_passed_over(tmp_path, monkeypatch):
    """A local folder's malformed config.json, and a malformed one in the hub cache, stop with
    the file's name; neither falls back to the table of published configs."""
    from vqa.planning import shapes

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"vision_config": {"depth": 2},')
    with pytest.raises(ValueError, match=r"model/config.json: not valid JSON"):
        architecture_for(str(folder))
    (folder / "config.json").write_text(json.dumps({"vision_config": {"depth": 2}}))
    with pytest.raises(ValueError, match=r"model/config.json: not a model's config.json"):
        architecture_for(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"model_type 'llava' is not a family vqa serves; "
                                         r"supported: Qwen2-VL \(qwen2_vl\), Qwen2.5-VL"):
        architecture_for(str(folder))
    cached = tmp_path / "snapshots" / "abc123" / "config.json"
    cached.parent.mkdir(parents=True)
    cached.write_text("{not json")
    monkeypatch.setattr(shapes, "cached_config", lambda model_id: cached)
    with pytest.raises(ValueError, match=r"abc123/config.json: not valid JSON"):
        architecture_for(SEVEN_B)  # in the table too, but the cached file is what exists


# ---------------------------------------------------------------------------------------------
# The peak-VRAM model, against every measured peak (calibration.csv)


def _measured_estimate(row):
    from vqa.speed import LABEL_WINDOW

    arch = _arch(row.model)
    if row.work == "train":
        return train_peak(arch, tokens=row.batch * row.length,
                          patches=row.batch * 4 * row.visual_tokens,
                          lora_r=32, lora_targets=DEFAULT_LORA_TARGETS,
                          logit_rows=row.batch * LABEL_WINDOW, length=row.length,
                          fp32_casts=False, uncheckpointed=row.layers_kept,
                          attention_kept=row.attention_kept)
    return infer_peak(arch, batch=row.batch, tokens=row.batch * row.length,
                      batch_patches=row.batch * 4 * row.visual_tokens,
                      vision_patches=vision_chunk([4 * row.visual_tokens] * row.batch),
                      mode=row.work, lora_r=32, lora_targets=DEFAULT_LORA_TARGETS)


MEASURED = measured_peaks()


def test_the_calibration_data_says_where_each_row_came_from():
    assert len(MEASURED) >= 90
    assert {r.work for r in MEASURED} == {"train", "score", "generate"}
    assert all(r.card and r.date and r.command and r.torch and r.transformers and r.bitsandbytes
               for r in MEASURED)
    assert {r.role for r in MEASURED} == {"fit", "held out", "check"}


# The grid's target: within 10% on every row (BENCHMARKS.md lists each row's error).
RESERVED_TOLERANCE: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r.model.split('/')[-1]}-{r.work}-"
                         f"{r.images}-b{r.batch}-k{r.layers_kept}+{r.attention_kept}")
def test_every_measured_peak_is_predicted_closely(row):
    from vqa.planning.planner import PLAN_MARGIN, margin_for

    estimate = _measured_estimate(row)
    arch = _arch(row.model)
    tolerance = RESERVED_TOLERANCE.get((arch.family, row.work), 0.10)
    assert abs(estimate.reserved / GIB / row.reserved_gib - 1) <= tolerance
    assert abs(estimate.allocated / GIB / row.allocated_gib - 1) <= 0.10
    assert margin_for(arch) >= PLAN_MARGIN + tolerance - 0.10  # the plan leaves room for it
    assert estimate.reserved >= estimate.allocated
    assert abs(sum(estimate.terms.values()) - estimate.reserved) < 1  # the terms add up


def test_layers_and_attention_blocks_kept_cost_memory_in_that_order():
    arch = _arch(SEVEN_B)

    def reserved(layers, blocks):
        return train_peak(arch, tokens=16 * 373, patches=16 * 1024, lora_r=32,
                          lora_targets=DEFAULT_LORA_TARGETS, logit_rows=48, length=373,
                          fp32_casts=False, uncheckpointed=layers,
                          attention_kept=blocks).reserved

    layers = [reserved(k, 0) for k in range(0, 29, 7)]
    assert layers == sorted(layers) and len(set(layers)) == len(layers)
    block = reserved(6, 3) - reserved(6, 2)
    layer = reserved(8, 0) - reserved(7, 0)
    assert 0 < block < layer / 2  # an attention block is a fraction of a layer


@pytest.mark.parametrize("model_id, batch, length, visual, larger", [
    # measured (bench-memory, H200): the vision tower's phase 5.13 GiB, the language model's 3.52
    (THREE_B, 8, 2617, 2500, "vision tower"),
    # measured: the language model's phase 13.51 GiB, the vision tower's 9.75
    (SEVEN_B, 48, 2617, 2500, "language model"),
])
def test_a_prediction_peaks_in_the_phase_measured_larger(model_id, batch, length, visual, larger):
    args = dict(batch=batch, tokens=batch * length, batch_patches=batch * 4 * visual,
                vision_patches=vision_chunk([4 * visual] * batch), mode="score", lora_r=32,
                lora_targets=DEFAULT_LORA_TARGETS)
    phases = infer_phases(_arch(model_id), **args)
    assert max(phases, key=lambda name: phases[name].allocated) == larger
    peak = infer_peak(_arch(model_id), **args)
    assert peak.reserved == max(p.reserved for p in phases.values())
    assert peak.allocated == max(p.allocated for p in phases.values())
    assert peak.terms == max(phases.values(), key=lambda p: p.reserved).terms


def test_peak_grows_with_batch_length_and_image_size():
    arch = _arch(SEVEN_B)
    lora = dict(lora_r=32, lora_targets=DEFAULT_LORA_TARGETS)
    train = [train_peak(arch, tokens=b * s, patches=b * 4 * v, **lora).reserved
             for b, s, v in [(1, 370, 256), (2, 370, 256), (2, 1113, 999), (4, 1113, 999)]]
    assert train == sorted(train) and len(set(train)) == 4
    for mode in ("score", "generate"):
        infer = [infer_peak(arch, batch=b, tokens=b * s, vision_patches=b * 4 * v, mode=mode,
                            **lora).reserved
                 for b, s, v in [(1, 370, 256), (8, 370, 256), (8, 1113, 999)]]
        assert infer == sorted(infer) and len(set(infer)) == 3
    # closed form: the 4-bit weights are half a byte a weight plus the quantization state
    weights = train_peak(arch, tokens=0, patches=0, **lora).terms["base weights (4-bit NF4)"]
    assert weights == pytest.approx(arch.linear_params * (0.5 + 1 / 64 + 4 / 16384))
    bf16 = train_peak(arch, tokens=0, patches=0, quant="none", **lora).terms[
        "base weights (bf16)"]
    assert bf16 == arch.linear_params * 2


# ---------------------------------------------------------------------------------------------
# The planner


def _work(visual: int, length: int, rows: int = 4096) -> Workload:
    return Workload([length] * rows, [visual] * rows, [length] * rows, [visual] * rows)


def _plan(settings: list[str], work: Workload, model_id: str = SEVEN_B):
    config = load_config(settings, environ={})
    budget = budget_for(config.target_gpu, config.target_gpu_memory, None, config.nproc)
    return plan_batches(config, budget, _arch(model_id), work), config


def _decision(plan, knob: str) -> dict:
    return plan.decision(knob)


def test_plan_respects_user_settings_and_keeps_the_effective_batch():
    def cpu(*settings):
        return plan_batches(load_config(list(settings), environ={}), None, None, None)

    plan = cpu("PER_DEVICE_BATCH=4", "PRED_BATCH_SIZE=3")
    assert (plan.per_device_batch, plan.gradient_accumulation, plan.pred_batch_size) == (4, 4, 3)
    assert _decision(plan, "PER_DEVICE_BATCH")["source"] == "user"
    auto = cpu()
    assert auto.per_device_batch * auto.gradient_accumulation == 16
    assert _decision(auto, "PER_DEVICE_BATCH")["source"] == "cpu"
    odd = cpu("EFFECTIVE_BATCH_SIZE=24")
    assert odd.per_device_batch * odd.gradient_accumulation == 24


@pytest.mark.parametrize("effective, ranks", [(16, 2), (16, 4), (24, 2), (8, 8)])
def test_cpu_plan_keeps_the_effective_batch_on_several_ranks(effective, ranks):
    """NPROC=2 on CPU once planned micro-batch 16 x accumulation 1 x 2 ranks = 32 rows a step."""
    plan = plan_batches(load_config([f"EFFECTIVE_BATCH_SIZE={effective}", f"NPROC={ranks}"],
                                    environ={}), None, None, None)
    assert plan.per_device_batch * plan.gradient_accumulation * ranks == effective


@pytest.mark.parametrize("card", ["A10G", "L4", "T4", "A100-40GB", "H100-80GB"])
def test_planner_picks_the_largest_batches_that_fit_each_card(card):
    plan, config = _plan([f"TARGET_GPU={card}"], _work(256, 370))
    limit = plan.budget["planned_gib"]
    assert limit == pytest.approx(plan.budget["usable_gib"] * (1 - PLAN_MARGIN), abs=0.01)
    assert plan.verdict == "fits" and not plan.blocking
    train = {c["batch"]: c["reserved_gib"] for c in plan.candidates
             if c["work"] == "train" and "layers_kept" not in c}
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


def test_each_planned_batch_says_what_stops_it():
    """Memory (the next candidate, predicted above the limit) or a limit of its own: the whole
    effective batch, MAX_PRED_BATCH, every row there is to predict."""
    big = _plan(["TARGET_GPU=A10G"], _work(2500, 2614))[0]
    micro = _decision(big, "PER_DEVICE_BATCH")
    assert micro["stop"] == "memory" and micro["next_value"] == 2 * micro["value"]
    assert micro["next_reserved_gib"] > big.budget["planned_gib"] >= micro["reserved_gib"]
    roomy = _decision(_plan(["TARGET_GPU=H100-80GB"], _work(256, 370))[0], "PER_DEVICE_BATCH")
    assert (roomy["stop"], roomy["value"], roomy["of"]) == ("whole", 16, 16)
    ceiling = _decision(_plan(["TARGET_GPU=A10G"], _work(256, 370))[0], "PRED_BATCH_SIZE")
    assert (ceiling["stop"], ceiling["value"]) == ("ceiling", 64)
    t4 = _plan(["TARGET_GPU=T4"], _work(2500, 2614))[0]
    pred = _decision(t4, "PRED_BATCH_SIZE")
    assert pred["stop"] == "memory" and pred["next_value"] == pred["value"] + 1
    few = _decision(_plan(["TARGET_GPU=A10G"], _work(256, 370, rows=10))[0], "PRED_BATCH_SIZE")
    assert (few["stop"], few["value"], few["of"]) == ("whole", 10, 10)


def test_an_override_that_will_not_fit_is_warned_with_its_predicted_peak():
    from vqa.planning.report import warnings

    plan, config = _plan(["TARGET_GPU=A10G", "PER_DEVICE_BATCH=16"], _work(2500, 2614))
    assert plan.per_device_batch == 16 and _decision(plan, "PER_DEVICE_BATCH")["source"] == "user"
    over = plan.over_memory[0]
    assert over["knob"] == "PER_DEVICE_BATCH" and over["reserved_gib"] > plan.budget["usable_gib"]
    assert warnings(plan.to_json())[0].startswith("PER_DEVICE_BATCH=16 is predicted to need")


def test_users_kept_layers_stay_when_nothing_fits_and_are_the_ones_estimated():
    """They once became 0 silently when training did not fit, and the warning quoted the
    estimate for 0 layers kept."""
    work = _work(16384, 16500)
    plan, config = _plan(["TARGET_GPU=T4", "UNCHECKPOINTED_LAYERS=3",
                          "UNCHECKPOINTED_ATTENTION=2"], work)
    assert plan.verdict == "will run out of memory"
    assert (plan.uncheckpointed_layers, plan.uncheckpointed_attention) == (3, 2)
    expected = train_estimate(config, _arch(SEVEN_B), work, plan.per_device_batch, 3, 2)
    assert plan.train_peak["reserved_gib"] == pytest.approx(expected.reserved / GIB, abs=1e-3)
    warned = {w["knob"]: w["reserved_gib"] for w in plan.over_memory}
    assert warned["UNCHECKPOINTED_LAYERS"] == round(expected.reserved / GIB, 2)


def test_nothing_fits_says_will_run_out_of_memory():
    from vqa.planning.report import blocking

    plan, _ = _plan(["TARGET_GPU=T4"], _work(16384, 16500))
    assert plan.verdict == "will run out of memory"
    assert plan.blocking[0]["work"] == "training at micro-batch 1"
    assert plan.blocking[0]["reserved_gib"] > plan.blocking[0]["planned_gib"]
    assert (plan.uncheckpointed_layers, plan.uncheckpointed_attention) == (0, 0)
    assert blocking(plan.to_json())[0].startswith("training at micro-batch 1 is predicted to "
                                                  "peak at")


def test_cpu_plan_without_a_target_plans_no_memory():
    plan = plan_batches(load_config([], environ={}), None, _arch(SEVEN_B), _work(4, 60))
    assert plan.verdict == "CPU run" and plan.budget is None and plan.train_peak is None


def test_the_saved_plan_reads_back_and_renders_the_same(tmp_path):
    from vqa.planning.planner import Plan
    from vqa.planning.report import reasons, stage_lines

    plan, _ = _plan(["TARGET_GPU=A10G"], _work(999, 1116))
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    again = Plan.from_json(json.loads((tmp_path / "plan.json").read_text()))
    assert again == plan
    assert reasons(again.to_json()) == reasons(plan.to_json())
    lines = stage_lines(plan.to_json(), "train")
    assert lines[0].startswith(f"PER_DEVICE_BATCH={plan.per_device_batch}: the largest")
    assert any(line.startswith(f"micro-batch {plan.per_device_batch} x accumulation "
                               f"{plan.gradient_accumulation} x 1 rank(s) = 16") for line in lines)
