"""The same SEED gives the same split, the same tiny model and the same predictions on CPU; a
model given as a local folder loads with the network cut off."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vqa.config import load_config


def _build(artifacts: Path, seed: int) -> Path:
    from vqa.pretrain import build_embedded_model

    config = load_config([f"ARTIFACTS_DIR={artifacts}", "BASE_PRETRAIN_STEPS=20",
                          f"SEED={seed}"], environ={})
    return build_embedded_model(config)


def _predict(model_dir: Path, data_dir: Path) -> dict:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vqa.predict import predict_rows

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    rows = pd.read_csv(data_dir / "test.csv", dtype=str).to_dict("records")
    return predict_rows(model, processor, rows, data_dir, batch_size=3).letter_probs


@pytest.mark.slow
def test_same_seed_same_tiny_model_and_predictions(tmp_path, small_data):
    first = _build(tmp_path / "one", seed=7)
    second = _build(tmp_path / "two", seed=7)
    other = _build(tmp_path / "three", seed=8)

    weights = [load_file(folder / "model.safetensors") for folder in (first, second, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    assert _predict(first, small_data) == _predict(second, small_data)


def test_same_seed_same_split_and_data(tmp_path):
    from vqa.data import read_table, stratified_split
    from vqa.easyvqa import write_dataset

    for name in ("one", "two"):
        write_dataset(tmp_path / name, 200, 40, seed=3)
    for csv in ("train.csv", "test.csv", "test_answers.csv"):
        assert (tmp_path / "one" / csv).read_bytes() == (tmp_path / "two" / csv).read_bytes()
    frame = read_table(tmp_path / "one" / "train.csv", with_answer=True)
    splits = [stratified_split(frame, 0.1, seed) for seed in (3, 3, 4)]
    assert splits[0][1]["id"].tolist() == splits[1][1]["id"].tolist()
    assert splits[0][1]["id"].tolist() != splits[2][1]["id"].tolist()


# Run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when first imported. Every
# connection attempt is refused (as on a host without network) and counted in a file.
GUARD = """
import socket, sys
def refuse(*args, **kwargs):
    with open(sys.argv[1], "a") as log:
        log.write("attempt\\n")
    raise ConnectionRefusedError("no network in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
sys.argv = sys.argv[1:]
sys.argv[0] = "scripts/submit.py"
import runpy
runpy.run_path("scripts/submit.py", run_name="__main__")
"""


def _submit_offline(tmp_path, data_dir, model_id, offline: str):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    attempts = tmp_path / "attempts.log"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": offline,
           "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([sys.executable, "-c", GUARD, str(attempts), f"MODEL_ID={model_id}",
                           f"DATA_DIR={data_dir}", f"ARTIFACTS_DIR={tmp_path / 'artifacts'}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    return done, attempts.read_text().count("attempt") if attempts.exists() else 0


@pytest.mark.slow
def test_local_model_folder_runs_offline_without_touching_the_network(tiny_model_dir, small_data,
                                                                      tmp_path):
    done, attempts = _submit_offline(tmp_path, small_data, tiny_model_dir, offline="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert attempts == 0
    assert (tmp_path / "artifacts" / "submission.csv").is_file()


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_id_without_network_says_what_to_mount(small_data, tmp_path, offline):
    done, _ = _submit_offline(tmp_path, small_data, "Qwen/Qwen2.5-VL-7B-Instruct", offline)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("vqa submit: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "'Qwen/Qwen2.5-VL-7B-Instruct'" in errors[0]
    assert "set MODEL_ID to the mounted folder" in errors[0]
