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
