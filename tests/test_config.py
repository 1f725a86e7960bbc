import json

import pytest

from vqa.cli import run_stage
from vqa.config import Config, ConfigError, load_config


def test_defaults_are_the_reference_setup():
    config = load_config([], environ={})
    assert (config.effective_batch_size, config.lora_r, config.lora_alpha) == (16, 32, 64)
    assert config.lora_dropout == 0.08 and config.max_new_tokens == 16 and config.epochs == 3
    assert config.quant == "4bit" and config.infer_mode == "score"
    assert config.per_device_batch is None and config.pred_batch_size is None


def test_environment_then_arguments_override():
    config = load_config(["LORA_R=16"], environ={"LORA_R": "8", "LR": "1e-3", "QUANT": "none"})
    assert config.lora_r == 16  # the argument wins
    assert config.lr == 1e-3 and config.quant == "none"


def test_unrelated_environment_is_ignored():
    assert load_config([], environ={"HOME": "/x", "LORA": "3"}).lora_r == 32


@pytest.mark.parametrize("arg, message", [
    ("LORA_RR=16", "unknown setting LORA_RR (did you mean LORA_R?)"),
    ("LORA_R=abc", "LORA_R='abc': expected int"),
    ("QUANT=8bit", "QUANT='8bit': must be one of 4bit, none"),
    ("INFER_MODE=beam", "must be one of score, generate"),
    ("LORA_DROPOUT=1.5", "LORA_DROPOUT=1.5: must lie in [0, 1)"),
    ("PER_DEVICE_BATCH=0", "PER_DEVICE_BATCH=0: must be positive"),
    ("PER_DEVICE_BATCH=3", "not a multiple of PER_DEVICE_BATCH=3"),
    # once passed here and ended in a traceback from scikit-learn's split
    ("VAL_FRACTION=0", "VAL_FRACTION=0.0: must lie in (0, 1): early stopping and the best "
                       "checkpoint are chosen on validation rows"),
    ("justaword", "settings are KEY=value"),
])
def test_bad_settings_are_one_line_errors(arg, message):
    with pytest.raises(ConfigError) as info:
        load_config([arg], environ={})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_auto_means_planner_choice():
    assert load_config(["PER_DEVICE_BATCH=auto"], environ={"PRED_BATCH_SIZE": ""}).pred_batch_size is None


def test_stage_prints_and_saves_config_and_fails_cleanly(tmp_path, capsys):
    seen = {}
    code = run_stage("probe", lambda c: seen.setdefault("config", c) and None,
                     argv=[f"ARTIFACTS_DIR={tmp_path}", "LORA_R=4"])
    assert code == 0 and seen["config"].lora_r == 4
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["LORA_R"] == 4 and saved["MODEL_ID"] == str(tmp_path / "base-model")
    assert "LORA_R" in capsys.readouterr().out

    assert run_stage("probe", lambda c: None, argv=["NOPE=1"]) == 2
    assert "vqa probe: error: unknown setting NOPE" in capsys.readouterr().err


def test_model_id_defaults_to_embedded_model():
    assert Config().resolved_model_id.endswith("base-model")
    assert Config(model_id="Qwen/Qwen2.5-VL-7B-Instruct").resolved_model_id.startswith("Qwen/")
