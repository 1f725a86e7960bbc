"""vqa/preflight.py: row-level problems are listed with what happens to each; exit codes."""

import json

import pandas as pd
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
