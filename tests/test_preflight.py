"""vqa/preflight.py: row-level problems are listed with what happens to each; exit codes."""

import json

import pandas as pd
import pytest
from PIL import Image

from vqa.config import load_config
from vqa.preflight import run_preflight


def _config(data, artifacts, model):
    return load_config([f"DATA_DIR={data}", f"ARTIFACTS_DIR={artifacts}", f"MODEL_ID={model}"],
                       environ={})


def test_row_problems_are_listed_with_row_id_file_reason_and_action(small_data, tiny_model_dir,
                                                                     tmp_path, capsys):
    (small_data / "images" / "1.png").write_bytes(b"not a png")  # train row tr1
    (small_data / "images" / "t2.png").unlink()  # test row te2
    Image.new("RGB", (4000, 10), (255, 0, 0)).save(small_data / "images" / "t3.png")  # te3

    code = run_preflight(_config(small_data, tmp_path, tiny_model_dir))
    out = capsys.readouterr().out
    assert code == 0 and "vqa preflight: runnable" in out
    report = json.loads((tmp_path / "preflight.json").read_text())
    problems = {p["id"]: p for p in report["problems"]}
    assert set(problems) == {"tr1", "te2", "te3"}
    assert problems["tr1"]["row"] == 3 and problems["tr1"]["file"] == "train.csv"
    assert problems["tr1"]["action"] == "skipped by train"
    assert problems["te2"]["reason"] == "image file missing"
    assert problems["te2"]["action"] == "answered from the text alone by submit"
    assert "aspect ratio 400:1 exceeds 200:1" in problems["te3"]["reason"]
    assert problems["te3"]["action"] == "padded with white to 4000x20 on load"
    assert "test.csv row 4 (id te2, images/t2.png): image file missing" in out
    markdown = (tmp_path / "preflight.md").read_text()
    assert "| train.csv | 3 | tr1 | images/1.png |" in markdown and "## Row problems (3)" in markdown


def test_mostly_unreadable_training_images_block_with_one_line(small_data, tiny_model_dir,
                                                               tmp_path, capsys):
    train = pd.read_csv(small_data / "train.csv", dtype=str)
    for path in train["path"][:5]:
        (small_data / path).unlink()
    code = run_preflight(_config(small_data, tmp_path, tiny_model_dir))
    assert code == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("vqa preflight: blocked: only 3 of 8 training images are usable")
    assert last.endswith("is DATA_DIR right?")


def _no_hub(monkeypatch):
    """The hub unreachable at once: vqa's probe finds the endpoint closed. (HF_HUB_OFFLINE would
    not do here: huggingface_hub reads it once, when an earlier test first imported it.)"""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


def _target_config(data, artifacts, *settings):
    return load_config([f"DATA_DIR={data}", f"ARTIFACTS_DIR={artifacts}",
                        "MODEL_ID=Qwen/Qwen2.5-VL-7B-Instruct", *settings], environ={})


def test_a10g_plan_for_the_7b_from_the_package_table_when_the_hub_is_unreachable(
        small_data, tmp_path, monkeypatch, capsys):
    _no_hub(monkeypatch)
    Image.new("RGB", (1024, 768), (0, 0, 255)).save(small_data / "images" / "0.png")
    code = run_preflight(_target_config(small_data, tmp_path / "a", "TARGET_GPU=A10G"))
    out = capsys.readouterr().out
    assert code == 0 and "vqa preflight: runnable (fits on TARGET_GPU=A10G" in out
    report = json.loads((tmp_path / "a" / "preflight.json").read_text())
    assert report["architecture_source"].startswith("the package's table")
    assert "text tokens estimated" in report["measured_with"]
    assert report["data"]["longest_rows"][0] == {"id": "tr0", "width": 1024, "height": 768,
                                                 "visual_tokens": 999,
                                                 "length": report["data"]["longest_rows"][0]
                                                 ["length"]}
    plan = report["plan"]
    assert plan["budget"]["name"].startswith("TARGET_GPU=A10G")
    assert plan["train_peak"]["reserved_gib"] <= plan["budget"]["planned_gib"]
    assert plan["per_device_batch"] * plan["gradient_accumulation"] == 16
    markdown = (tmp_path / "a" / "preflight.md").read_text()
    assert "**fits on TARGET_GPU=A10G" in markdown and "| train | 1 |" in markdown
    # the prediction's terms are its larger phase's: the vision tower's or the language model's
    where = next(line for line in markdown.splitlines()
                 if line.startswith("Where the prediction peak goes: base weights (4-bit NF4)"))
    assert ("decoder activations" in where) != (
        "vision tower activations (one chunk)" in where)
    assert f"PER_DEVICE_BATCH={plan['per_device_batch']} PRED_BATCH_SIZE=" in markdown
    # eight rows: micro-batch 16 is the effective batch; the rest of the card keeps layers,
    # and what those leave keeps attention blocks below them
    kept, attention = plan["uncheckpointed_layers"], plan["uncheckpointed_attention"]
    assert plan["per_device_batch"] == 16 and 0 < kept and 0 < attention and kept + attention <= 28
    assert f"UNCHECKPOINTED_LAYERS={kept} UNCHECKPOINTED_ATTENTION={attention}\n```" in markdown
    assert (f"| train, last {kept} layers kept + {attention} attention blocks kept below | 16 |"
            in markdown)
    assert (f"with UNCHECKPOINTED_LAYERS={kept} UNCHECKPOINTED_ATTENTION={attention}, predict peak"
            in out)


def test_images_too_large_for_the_card_block_and_name_the_max_pixels_that_fit(
        small_data, tmp_path, monkeypatch, capsys):
    _no_hub(monkeypatch)
    Image.new("RGB", (4000, 3000), (0, 0, 255)).save(small_data / "images" / "0.png")
    code = run_preflight(_target_config(small_data, tmp_path / "b", "TARGET_GPU=T4"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("vqa preflight: blocked: training at micro-batch 1 is predicted to "
                           "peak at")
    suggested = json.loads((tmp_path / "b" / "preflight.json").read_text())[
        "plan"]["suggested_max_pixels"]
    assert last.endswith(f"set MAX_PIXELS={suggested}") and suggested % 784 == 0
    # With the suggestion the same data is runnable on the same card.
    code = run_preflight(_target_config(small_data, tmp_path / "c", "TARGET_GPU=T4",
                                        f"MAX_PIXELS={suggested}"))
    assert code == 0
    report = json.loads((tmp_path / "c" / "preflight.json").read_text())
    assert report["memory_verdict"] == "fits"


def test_rows_longer_than_max_sequence_length_get_a_max_pixels_that_fits(small_data, tiny_model_dir,
                                                                          tmp_path):
    Image.new("RGB", (1024, 768), (0, 0, 255)).save(small_data / "images" / "0.png")
    settings = [f"DATA_DIR={small_data}", f"MODEL_ID={tiny_model_dir}", "MAX_SEQUENCE_LENGTH=150",
                "TARGET_GPU=A10G"]
    config = load_config([*settings, f"ARTIFACTS_DIR={tmp_path / 'a'}"], environ={})
    assert run_preflight(config) == 0
    report = json.loads((tmp_path / "a" / "preflight.json").read_text())
    assert any(p["id"] == "tr0" and "exceeds MAX_SEQUENCE_LENGTH=150" in p["reason"]
               for p in report["problems"])
    suggested = report["plan"]["suggested_max_pixels"]
    assert suggested and f"MAX_PIXELS={suggested}" in (tmp_path / "a" / "preflight.md").read_text()
    again = load_config([*settings, f"ARTIFACTS_DIR={tmp_path / 'b'}", f"MAX_PIXELS={suggested}"],
                        environ={})
    assert run_preflight(again) == 0
    report = json.loads((tmp_path / "b" / "preflight.json").read_text())
    assert report["data"]["train_sequence_length"]["max"] <= 150
    assert not any("MAX_SEQUENCE_LENGTH" in p["reason"] for p in report["problems"])


@pytest.mark.parametrize("model_id, visual_tokens, margin, calibrated", [
    ("Qwen/Qwen3-VL-8B-Instruct", 768, "12% margin: its scoring peaks", True),
    ("Qwen/Qwen2-VL-7B-Instruct", 999, "10% margin)", True),
    ("Qwen/Qwen3.5-9B", 768, "30% margin: the peak-VRAM model is not yet checked", False)])
def test_a10g_plan_for_each_family_offline_counts_the_familys_own_tokens(
        small_data, tmp_path, monkeypatch, model_id, visual_tokens, margin, calibrated):
    """Offline, with a hub id: the architecture and the pixel rule come from the package's
    table, so a 1024x768 photo is 768 visual tokens on Qwen3-VL and Qwen3.5 (32x32 pixels a
    token) and 999 on Qwen2-VL (28x28); each family planned with its own margin, said why."""
    _no_hub(monkeypatch)
    Image.new("RGB", (1024, 768), (0, 0, 255)).save(small_data / "images" / "0.png")
    config = load_config([f"DATA_DIR={small_data}", f"ARTIFACTS_DIR={tmp_path}",
                          f"MODEL_ID={model_id}", "TARGET_GPU=A10G"], environ={})
    assert run_preflight(config) == 0
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["architecture_source"].startswith("the package's table")
    assert report["data"]["longest_rows"][0]["visual_tokens"] == visual_tokens
    plan = report["plan"]
    assert plan["budget"]["calibrated"] is calibrated
    assert plan["train_peak"]["reserved_gib"] <= plan["budget"]["planned_gib"]
    assert margin in report["reasons"][0]
