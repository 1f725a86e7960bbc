"""NPROC=2 on CPU: torchrun starts two ranks (gloo backend) for train and submit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# GPU and NCCL settings of the host (e.g. NVLink multicast switched off) reach the ranks.
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
       "HF_HUB_OFFLINE": "1", "NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       **{k: v for k, v in os.environ.items()
          if k.startswith(("NCCL_", "TORCH_", "NVSHMEM_", "CUDA_"))}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vqa.easyvqa import write_dataset

    data = tmp_path_factory.mktemp("data")
    write_dataset(data, 80, 30, seed=5)
    return data


def _run(script: str, artifacts: Path, data: Path, *settings: str):
    done = subprocess.run([sys.executable, f"scripts/{script}.py", f"ARTIFACTS_DIR={artifacts}",
                           f"DATA_DIR={data}", *settings], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_ranks_train_with_the_same_effective_batch_and_save_once(tiny_model_dir, data_dir,
                                                                     tmp_path):
    artifacts = tmp_path / "two"
    shutil.copytree(tiny_model_dir, artifacts / "base-model")
    done = _run("train", artifacts, data_dir, "NPROC=2", "EPOCHS=1", "VAL_SAMPLE=8",
                "PER_DEVICE_BATCH=4", "EFFECTIVE_BATCH_SIZE=8")
    assert "torchrun --standalone --nproc_per_node=2" in done.stdout
    metrics = json.loads((artifacts / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["gradient_accumulation"] == 1
    assert metrics["effective_batch_size"] == 8
    # 72 training rows (90% of 80), 8 per optimizer step across both ranks: 9 steps.
    assert metrics["train_rows"] == 72 and metrics["optimizer_steps"] == 9
    assert (artifacts / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert not list(artifacts.glob("lora_adapter.partial*"))
    assert len(list((artifacts / "checkpoints").glob("checkpoint-*"))) == 1


@pytest.mark.slow
def test_two_ranks_predict_disjoint_batches_and_merge_into_the_single_process_file(
        tiny_model_dir, data_dir, tmp_path):
    files = {}
    for name, settings in (("one", []), ("two", ["NPROC=2"])):
        artifacts = tmp_path / name
        shutil.copytree(tiny_model_dir, artifacts / "base-model")
        _run("submit", artifacts, data_dir, "PRED_BATCH_SIZE=4", *settings)
        files[name] = (artifacts / "submission.csv").read_bytes()
        report = json.loads((artifacts / "submit_report.json").read_text())
        assert report["world_size"] == (2 if settings else 1)
    assert files["one"] == files["two"]
    rank1 = pd.read_json(tmp_path / "two" / "predictions.journal.rank1.jsonl", lines=True)
    rank0 = pd.read_json(tmp_path / "two" / "predictions.journal.jsonl", lines=True)
    ids0, ids1 = set(rank0["id"].dropna()), set(rank1["id"].dropna())
    assert ids0 and ids1 and not ids0 & ids1  # disjoint shards
    test_ids = set(pd.read_csv(data_dir / "test.csv", dtype=str)["id"])
    assert {str(i) for i in ids0 | ids1} == test_ids
