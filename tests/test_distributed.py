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


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _nodes(script: str, folders: list[Path], data: Path, *settings: str, timeout: int = 900):
    """`script` launched as node 0 and node 1 of two (one process each) on this host, gloo over
    127.0.0.1; node r uses folders[r] as ARTIFACTS_DIR. Returns both finished processes."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, f"scripts/{script}.py",
                               f"ARTIFACTS_DIR={folders[rank]}", f"DATA_DIR={data}", *settings,
                               "NNODES=2", f"NODE_RANK={rank}", "MASTER_ADDR=127.0.0.1",
                               f"MASTER_PORT={port}", "RENDEZVOUS_TIMEOUT=120"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (1, 0)]  # node 1 first: it waits
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)][::-1]


@pytest.mark.slow
def test_two_nodes_train_and_submit_as_one_process_does(tiny_model_dir, data_dir, tmp_path):
    """Two launchers as two "nodes" of one process each: the adapter equals the one-process
    adapter at the same effective batch, and the merged submission equals one process's."""
    from safetensors.torch import load_file

    settings = ["EPOCHS=1", "VAL_SAMPLE=8", "PER_DEVICE_BATCH=4", "EFFECTIVE_BATCH_SIZE=8",
                "LORA_DROPOUT=0", "PRED_BATCH_SIZE=4"]
    one, two, single = tmp_path / "one", tmp_path / "two", tmp_path / "single"
    for folder in (one, two, single):
        shutil.copytree(tiny_model_dir, folder / "base-model")
    _run("train", one, data_dir, *settings)
    nodes = _nodes("train", [two, two], data_dir, *settings)
    for code, out, err in nodes:
        assert code == 0, out[-1500:] + err[-3000:]
    assert "--nnodes=2 --node_rank=0" in nodes[0][1]
    metrics = json.loads((two / "train_metrics.json").read_text())
    alone = json.loads((one / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["gradient_accumulation"] == 1
    assert alone["world_size"] == 1 and alone["gradient_accumulation"] == 2
    assert metrics["optimizer_steps"] == alone["optimizer_steps"] == 9
    ours = load_file(two / "lora_adapter" / "adapter_model.safetensors")
    theirs = load_file(one / "lora_adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-4 + 1e-3 * theirs[name].abs().max()

    nodes = _nodes("submit", [two, two], data_dir, *settings)
    for code, out, err in nodes:
        assert code == 0, out[-1500:] + err[-3000:]
    shutil.copytree(two / "lora_adapter", single / "lora_adapter")
    _run("submit", single, data_dir, *settings)
    assert (two / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    assert (two / "predictions.journal.rank1.jsonl").is_file()  # node 1's rank journals its own


@pytest.mark.slow
def test_nodes_that_do_not_share_artifacts_stop_with_one_line(tiny_model_dir, data_dir,
                                                              tmp_path):
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        shutil.copytree(tiny_model_dir, folder / "base-model")
    nodes = _nodes("train", folders, data_dir, "EPOCHS=1", "PER_DEVICE_BATCH=4",
                   "EFFECTIVE_BATCH_SIZE=8")
    assert nodes[0][0] != 0 and nodes[1][0] != 0
    assert (f"vqa train: error: rank(s) 1 do not see ARTIFACTS_DIR={folders[0]} as rank 0 "
            f"wrote it") in nodes[0][2]
    assert not (folders[0] / "lora_adapter").exists()


def test_a_node_that_cannot_reach_the_master_says_where_in_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    done = subprocess.run([sys.executable, "scripts/train.py", f"ARTIFACTS_DIR={tmp_path}",
                           "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=127.0.0.1",
                           f"MASTER_PORT={port}", "RENDEZVOUS_TIMEOUT=2"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vqa train: error: cannot reach the master node at 127.0.0.1:{port} "
                           f"within 2 s")


def test_several_nodes_need_a_master_and_a_rank_among_them():
    from vqa.config import ConfigError, load_config

    assert load_config(["NNODES=2", "MASTER_ADDR=10.0.0.1"], environ={}).world_size == 2
    with pytest.raises(ConfigError, match="NNODES=2 needs MASTER_ADDR"):
        load_config(["NNODES=2"], environ={})
    with pytest.raises(ConfigError, match="NODE_RANK=2: must lie in 0..NNODES-1"):
        load_config(["NNODES=2", "NODE_RANK=2", "MASTER_ADDR=h"], environ={})
    with pytest.raises(ConfigError, match="PER_DEVICE_BATCH=4 x NPROC=1 x NNODES=3"):
        load_config(["NNODES=3", "MASTER_ADDR=h", "PER_DEVICE_BATCH=4"], environ={})
