"""vqa/planning/runplan.py: the saved plan, its inputs' fingerprint, and what a stage does with
a plan.json that does not match or cannot be read."""

import json
import logging

from PIL import Image

from vqa.config import load_config
from vqa.planning.runplan import changed, stage_plan


def _config(data, artifacts, model, *settings):
    return load_config([f"DATA_DIR={data}", f"ARTIFACTS_DIR={artifacts}", f"MODEL_ID={model}",
                        "TARGET_GPU=A10G", *settings], environ={})


def test_changed_names_each_input_and_each_setting():
    saved = {"settings": {"MAX_PIXELS": None, "LORA_R": 32}, "train.csv": "a", "card": {"x": 1}}
    now = {"settings": {"MAX_PIXELS": 200704, "LORA_R": 32}, "train.csv": "b", "card": {"x": 1}}
    assert changed(saved, now) == ["MAX_PIXELS", "train.csv"]
    assert changed(now, now) == []


def test_a_stage_plans_once_then_reads_and_replans_only_on_change(small_data, tiny_model_dir,
                                                                   tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vqa")
    config = _config(small_data, tmp_path, tiny_model_dir)
    first = stage_plan(config, "train")
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["made_by"] == "train" and "no " in caplog.text and "yet; planning again" in \
        caplog.text
    caplog.clear()
    assert stage_plan(config, "submit") == first
    assert "its inputs match this run's" in caplog.text and "planning again" not in caplog.text
    caplog.clear()
    Image.new("RGB", (900, 700), (5, 5, 5)).save(small_data / "images" / "t0.png")
    stage_plan(_config(small_data, tmp_path, tiny_model_dir, "LORA_R=8"), "eval")
    assert "was made: LORA_R, images; planning again" in caplog.text
    assert json.loads((tmp_path / "plan.json").read_text())["made_by"] == "eval"


def test_a_broken_plan_file_is_planned_again_not_a_traceback(small_data, tiny_model_dir, tmp_path,
                                                            caplog):
    caplog.set_level(logging.INFO, logger="vqa")
    config = _config(small_data, tmp_path, tiny_model_dir)
    (tmp_path / "plan.json").write_text('{"plan": {"per_device_batch": 4}, "inp')
    plan = stage_plan(config, "train")
    assert "is not a plan this version of vqa reads: planning again" in caplog.text
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["per_device_batch"] == \
        plan.per_device_batch
