"""Surviving CUDA out-of-memory: fault injection for tests, freeing memory, splitting batches.

Both the training step (vqa/train.py) and prediction (vqa/predict.py) react to an
OutOfMemoryError by splitting the batch that failed and running the pieces, never by skipping rows
or by changing what the optimizer sees. Tests drive those paths on CPU through two variables that
raise a real `torch.cuda.OutOfMemoryError`:

- `VQA_FAULT_OOM_AT=3,7`: at the 3rd and 7th forward attempt of the process (each fires once);
- `VQA_FAULT_OOM_ROWS_ABOVE=2`: at every attempt with more than 2 rows, like a card that fits 2.
"""

from __future__ import annotations

import gc
import os

import torch


def _ints(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


class FaultInjector:
    """Counts forward attempts and raises the injected errors the environment asks for."""

    def __init__(self, oom_at: set[int] | None = None, rows_above: int | None = None):
        self.oom_at = _ints("VQA_FAULT_OOM_AT") if oom_at is None else oom_at
        if rows_above is None:
            raw = os.environ.get("VQA_FAULT_OOM_ROWS_ABOVE", "").strip()
            rows_above = int(raw) if raw else None
        self.rows_above = rows_above
        self.attempts = 0

    def before_forward(self, rows: int) -> None:
        self.attempts += 1
        if self.attempts in self.oom_at:
            raise torch.cuda.OutOfMemoryError(
                f"injected by VQA_FAULT_OOM_AT at attempt {self.attempts}")
        if self.rows_above is not None and rows > self.rows_above:
            raise torch.cuda.OutOfMemoryError(
                f"injected by VQA_FAULT_OOM_ROWS_ABOVE={self.rows_above} at {rows} rows")


def free_memory() -> None:
    """Drops what the failed attempt left behind so the retry starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """Cuts a collated, left-padded batch into consecutive pieces of `sizes` rows.

    Per-row tensors are cut along dim 0; `pixel_values` (all images' patches concatenated) by each
    image's patch count from `image_grid_thw` (one image per row); lists by row. Columns that are
    padding in every row of a piece are dropped, so a piece of short rows is short too.
    """
    rows = batch["input_ids"].shape[0]
    if sum(sizes) != rows or min(sizes) < 1:
        raise ValueError(f"cannot split {rows} rows into {sizes}")
    patches = batch["image_grid_thw"].prod(-1).tolist() if "image_grid_thw" in batch else None
    if patches is not None and len(patches) != rows:
        raise ValueError(f"{len(patches)} images for {rows} rows: one image per row expected")
    pieces, start, patch_start = [], 0, 0
    for size in sizes:
        stop = start + size
        piece = {}
        for key, value in batch.items():
            if key == "pixel_values":
                n = sum(patches[start:stop])
                piece[key] = value[patch_start:patch_start + n]
            elif torch.is_tensor(value) or isinstance(value, list):
                piece[key] = value[start:stop]
            else:
                piece[key] = value
        if patches is not None:
            patch_start += sum(patches[start:stop])
        mask = piece.get("attention_mask")
        if mask is not None:
            first = int(mask.any(0).nonzero()[0])  # left padding: leading all-pad columns
            for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
                if key in piece:
                    piece[key] = piece[key][:, first:]
        pieces.append(piece)
        start = stop
    return pieces


def even_sizes(rows: int, at_most: int) -> list[int]:
    """`rows` cut into the fewest pieces of at most `at_most` rows, as even as possible."""
    count = -(-rows // at_most)
    return [rows // count + (1 if i < rows % count else 0) for i in range(count)]
