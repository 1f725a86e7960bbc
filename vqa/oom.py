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


def _image_rows(batch: dict, rows: int) -> list[int]:
    """The row of each image in `pixel_values` / `image_grid_thw` order: at most one image a
    row, and a row asked as text only (its image unreadable) has none."""
    types = batch.get("mm_token_type_ids")
    with_image = (list(range(rows)) if types is None
                  else [r for r in range(rows) if bool(types[r].ne(0).any())])
    if len(with_image) != len(batch["image_grid_thw"]):
        raise ValueError(f"{len(batch['image_grid_thw'])} images for {len(with_image)} rows "
                         f"with image tokens: one image per row expected")
    return with_image


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """Cuts a collated, left-padded batch into consecutive pieces of `sizes` rows.

    Per-row tensors are cut along dim 0, the rope positions (3, rows, length) along dim 1;
    `pixel_values` (all images' patches concatenated) by each image's patch count from
    `image_grid_thw` (at most one image a row); lists by row. Columns that are padding in every
    row of a piece are dropped, so a piece of short rows is short too.
    """
    rows = batch["input_ids"].shape[0]
    if sum(sizes) != rows or min(sizes) < 1:
        raise ValueError(f"cannot split {rows} rows into {sizes}")
    has_images = batch.get("image_grid_thw") is not None
    image_rows = _image_rows(batch, rows) if has_images else []
    patches = batch["image_grid_thw"].prod(-1).tolist() if has_images else []
    pieces, start = [], 0
    for size in sizes:
        stop = start + size
        images = [i for i, r in enumerate(image_rows) if start <= r < stop]
        piece = {}
        for key, value in batch.items():
            if key == "pixel_values" and has_images:
                first = sum(patches[:images[0]]) if images else 0
                piece[key] = value[first:first + sum(patches[i] for i in images)]
            elif key == "image_grid_thw":
                piece[key] = value[images[0]:images[-1] + 1] if images else None
            elif key == "position_ids" and torch.is_tensor(value) and value.dim() == 3:
                piece[key] = value[:, start:stop]
            elif torch.is_tensor(value) or isinstance(value, list):
                piece[key] = value[start:stop]
            else:
                piece[key] = value
        if piece.get("image_grid_thw") is None:  # text only: no vision inputs at all
            piece.pop("image_grid_thw", None)
            piece.pop("pixel_values", None)
        mask = piece.get("attention_mask")
        if mask is not None:
            first = int(mask.any(0).nonzero()[0])  # left padding: leading all-pad columns
            for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
                if key in piece:
                    piece[key] = piece[key][:, first:]
            if "position_ids" in piece and torch.is_tensor(piece["position_ids"]):
                piece["position_ids"] = piece["position_ids"][..., first:]
        pieces.append(piece)
        start = stop
    return pieces


def even_sizes(rows: int, at_most: int) -> list[int]:
    """`rows` cut into the fewest pieces of at most `at_most` rows, as even as possible."""
    count = -(-rows // at_most)
    return [rows // count + (1 if i < rows % count else 0) for i in range(count)]
