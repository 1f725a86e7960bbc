"""vqa/train.py: which rows train, and what a run's signature holds (what a resume must match)."""

import json

import pytest
from PIL import Image

from vqa.config import load_config


def test_rows_longer_than_max_sequence_length_are_skipped_by_train_and_listed(small_data,
                                                                             tiny_model_dir):
    """MAX_SEQUENCE_LENGTH was documented as refusing rows but only preflight noted them."""
    from vqa.train import split_rows

    Image.new("RGB", (1024, 768), (0, 0, 255)).save(small_data / "images" / "0.png")  # tr0
    settings = [f"DATA_DIR={small_data}", f"MODEL_ID={tiny_model_dir}"]
    train, val, skipped = split_rows(load_config(settings, environ={}))
    assert skipped == [] and len(train) + len(val) == 8
    train, val, skipped = split_rows(load_config([*settings, "MAX_SEQUENCE_LENGTH=150"],
                                                 environ={}))
    assert [(s["row"], s["id"]) for s in skipped] == [(2, "tr0")]
    assert "exceeds MAX_SEQUENCE_LENGTH=150" in skipped[0]["reason"]
    assert "tr0" not in {r["id"] for r in train + val} and len(train) + len(val) == 7


def test_the_signature_leaves_out_the_card_and_covers_every_weight_shard(tiny_model_dir,
                                                                         tmp_path):
    """A run killed on one card resumes on another (the micro-batch, kept layers and target card
    are not in it); a sharded checkpoint is fingerprinted shard by shard (only
    model.safetensors was, so a sharded one had none)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vqa.train import train_signature

    sharded = tmp_path / "sharded"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    model.save_pretrained(sharded, max_shard_size="300KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()

    def signature(*settings):
        return train_signature(load_config([f"MODEL_ID={sharded}", *settings], environ={}))

    base = signature()
    weights = base["base_weights"]["weights"]
    assert set(weights) == {p.name for p in shards} | {"model.safetensors.index.json"}
    assert all(weights.values())
    assert signature("PER_DEVICE_BATCH=4", "UNCHECKPOINTED_LAYERS=2", "TARGET_GPU=T4") == base
    assert signature("LORA_R=8") != base
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte
    shards[-1].write_bytes(bytes(data))
    assert signature()["base_weights"] != base["base_weights"]


def test_a_hub_model_is_fingerprinted_by_its_cached_commit(monkeypatch, tmp_path):
    from vqa import model

    snapshot = tmp_path / "models--Qwen--X" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({}))
    monkeypatch.setattr(model, "cached_config", lambda model_id: snapshot / "config.json")
    assert model.model_fingerprint("Qwen/X") == {"hub_id": "Qwen/X", "commit": "0123abc"}
    monkeypatch.setattr(model, "cached_config", lambda model_id: None)
    assert model.model_fingerprint("Qwen/X") == {"hub_id": "Qwen/X", "commit": None}


@pytest.mark.parametrize("nproc", [1, 2])
def test_accumulation_has_one_owner(nproc):
    """EFFECTIVE_BATCH_SIZE = micro-batch x accumulation x ranks, computed in the planner only."""
    from vqa.planning.planner import gradient_accumulation, plan_batches

    config = load_config([f"NPROC={nproc}", "PER_DEVICE_BATCH=4"], environ={})
    plan = plan_batches(config, None, None, None)
    assert plan.gradient_accumulation == gradient_accumulation(16, 4, nproc) == 4 // nproc


def test_shuffled_options_are_a_function_of_seed_epoch_and_row():
    from vqa.options import shuffled_options

    rows = [{"id": str(i), "question": "q", "a": f"{i}a", "b": f"{i}b", "c": f"{i}c",
             "d": f"{i}d", "answer": "abcd"[i % 4]} for i in range(400)]
    for row in rows[:50]:
        for epoch in range(3):
            out = shuffled_options(row, 42, epoch)
            assert out == shuffled_options(dict(row), 42, epoch)  # no hidden state
            assert out[out["answer"]] == row[row["answer"]]  # the label follows its option
            assert sorted(out[x] for x in "abcd") == sorted(row[x] for x in "abcd")
    orders = {tuple(shuffled_options(r, 42, 0)[x] for x in "abcd") for r in rows[:1]}
    assert len(orders | {tuple(shuffled_options(rows[0], 42, e)[x] for x in "abcd")
                         for e in range(1, 8)}) > 1  # epochs differ
    assert any(shuffled_options(r, 42, 0) != shuffled_options(r, 43, 0) for r in rows[:10])
    # the right option lands on each letter about a quarter of the time
    letters = [shuffled_options(r, 42, 0)["answer"] for r in rows]
    assert all(60 <= letters.count(x) <= 140 for x in "abcd")


def test_shuffle_options_reorders_the_training_rows_each_epoch_and_never_validation(
        small_data, tiny_model_dir, tmp_path, monkeypatch):
    """A real `train` with SHUFFLE_OPTIONS=1: each training row as the Trainer's epoch says,
    every row once an epoch, validation rows as they are."""
    from vqa import train as train_module
    from vqa.options import shuffled_options

    seen = []
    plain_getitem = train_module.RowDataset.__getitem__

    def recording(self, index):
        row = plain_getitem(self, index)
        seen.append((self.shuffle_seed, self.epoch, self.rows[index], row))
        return row

    monkeypatch.setattr(train_module.RowDataset, "__getitem__", recording)
    config = load_config([f"DATA_DIR={small_data}", f"MODEL_ID={tiny_model_dir}",
                          f"ARTIFACTS_DIR={tmp_path}", "SHUFFLE_OPTIONS=1", "EPOCHS=2",
                          "PER_DEVICE_BATCH=4", "EFFECTIVE_BATCH_SIZE=4", "VAL_FRACTION=0.25",
                          "QUANT=none"], environ={})
    metrics = train_module.train(config)
    shuffled = [s for s in seen if s[0] is not None]
    assert {epoch for _, epoch, _, _ in shuffled} == {0, 1}
    for epoch in (0, 1):
        ids = sorted(row["id"] for _, e, row, _ in shuffled if e == epoch)
        assert len(ids) == len(set(ids)) == metrics["train_rows"] == 6
    for seed, epoch, row, out in shuffled:
        assert seed == 42 and out == shuffled_options(row, 42, epoch)
    assert any(out != row for _, _, row, out in shuffled)
    validation = [(row, out) for seed, _, row, out in seen if seed is None]
    assert validation and all(row is out for row, out in validation)
    assert metrics["signature"]["settings"]["SHUFFLE_OPTIONS"] == 1


def test_training_writes_tensorboard_events_and_a_memory_panel(small_data, tiny_model_dir,
                                                               tmp_path):
    """A CPU `make train`: loss, learning rate, validation accuracy, tokens/s and the process's
    memory as TensorBoard scalars under ARTIFACTS_DIR/runs, and in train_metrics.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vqa.train import train

    config = load_config([f"DATA_DIR={small_data}", f"MODEL_ID={tiny_model_dir}",
                          f"ARTIFACTS_DIR={tmp_path}", "EPOCHS=2", "PER_DEVICE_BATCH=1",
                          "EFFECTIVE_BATCH_SIZE=1", "VAL_FRACTION=0.25", "QUANT=none"],
                         environ={})
    metrics = train(config)
    runs = list((tmp_path / "runs").glob("train-*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second",
            "train/cpu_rss_gib", "eval/accuracy"} <= scalars
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses and all(v > 0 for v in losses)
    memory = [h["cpu_rss_gib"] for h in metrics["log_history"] if "cpu_rss_gib" in h]
    assert memory and all(0.05 < m < 64 for m in memory)
    assert [e.value for e in events.Scalars("train/cpu_rss_gib")] == pytest.approx(memory)
    assert (tmp_path / "train_curve.png").stat().st_size > 1000
