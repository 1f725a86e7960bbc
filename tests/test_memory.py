import pytest
from PIL import Image

from vqa.config import load_config
from vqa.memory import gpu_table, plan_batch_sizes, probe_machine, visual_tokens_for


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
