"""vqa/oom.py: splitting a collated batch, piece sizes, and the injected faults."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from vqa.oom import FaultInjector, even_sizes, split_batch


@pytest.mark.parametrize("rows,at_most,sizes", [
    (8, 8, [8]), (8, 4, [4, 4]), (8, 3, [3, 3, 2]), (5, 2, [2, 2, 1]), (1, 1, [1]), (7, 1, [1] * 7),
])
def test_even_sizes(rows, at_most, sizes):
    assert even_sizes(rows, at_most) == sizes


def test_split_batch_pieces_equal_batches_collated_alone(tiny_model_dir, small_data):
    """Each piece is exactly the batch those rows would have formed on their own."""
    from transformers import AutoProcessor

    from vqa.data import VQACollator

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = pd.read_csv(small_data / "train.csv", dtype=str).to_dict("records")[:5]
    # Different image sizes give different patch counts; a long question gives left padding.
    Image.new("RGB", (200, 120), (9, 9, 9)).save(small_data / "images" / "wide.png")
    rows[1] = {**rows[1], "path": "images/wide.png", "question": "a much longer question " * 6}
    collate = VQACollator(processor, Path(small_data), train=True)
    batch = collate(rows)

    pieces = split_batch(batch, [2, 1, 2])
    assert [p["input_ids"].shape[0] for p in pieces] == [2, 1, 2]
    for piece, chunk in zip(pieces, [rows[:2], rows[2:3], rows[3:]]):
        alone = collate(chunk)
        assert piece.keys() == alone.keys()
        for key, value in alone.items():
            if torch.is_tensor(value):
                assert torch.equal(piece[key], value), key
            else:
                assert piece[key] == value, key
    assert sum(p["pixel_values"].shape[0] for p in pieces) == batch["pixel_values"].shape[0]


def test_prediction_batches_split_like_batches_prepared_alone(tiny_model_dir, small_data):
    """A prediction batch as the preparing workers make it (rope positions computed on the CPU,
    a row asked as text only because its image is broken) splits into the batches its rows
    would have formed on their own: the OOM back-off never collates again."""
    from transformers import AutoProcessor

    from vqa.data import VQACollator
    from vqa.predict import _Prepare
    from vqa.speed import RopeIndex
    from vqa.tiny import tiny_config

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    (small_data / "images" / "t1.png").write_bytes(b"broken")
    Image.new("RGB", (200, 120), (9, 9, 9)).save(small_data / "images" / "t2.png")
    rows = pd.read_csv(small_data / "test.csv", dtype=str).to_dict("records")
    rows[3] = {**rows[3], "question": "a much longer question " * 6}
    prepare = _Prepare(VQACollator(processor, Path(small_data)),
                       rope=RopeIndex(tiny_config(processor.tokenizer)))
    batch, text_only = prepare(rows)
    assert set(text_only) == {"te1"} and batch["position_ids"].shape[:2] == (3, 4)
    for sizes in ([1, 3], [2, 2], [1, 1, 2]):
        start = 0
        for piece, size in zip(split_batch(batch, sizes), sizes):
            alone, _ = prepare(rows[start:start + size])
            if "position_ids" not in alone:  # text only alone: the model's own 1-D positions,
                length = alone["input_ids"].shape[1]  # which the batch's rope rows equal
                alone["position_ids"] = torch.arange(length).expand(3, size, length)
            assert piece.keys() == alone.keys(), sizes
            for key, value in alone.items():
                assert torch.equal(piece[key], value), (sizes, key)
            start += size


def test_split_batch_refuses_sizes_that_do_not_add_up():
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="cannot split 4 rows"):
        split_batch(batch, [2, 1])


def test_fault_injector_fires_at_attempts_and_above_a_row_count(monkeypatch):
    faults = FaultInjector(oom_at={2}, rows_above=None)
    faults.before_forward(8)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="attempt 2"):
        faults.before_forward(8)
    faults.before_forward(8)  # each listed attempt fires once

    monkeypatch.setenv("VQA_FAULT_OOM_ROWS_ABOVE", "2")
    monkeypatch.setenv("VQA_FAULT_OOM_AT", "")
    faults = FaultInjector()
    faults.before_forward(2)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="at 3 rows"):
        faults.before_forward(3)
