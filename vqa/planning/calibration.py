"""The measured peaks the memory model's coefficients were fitted to and are checked against.

calibration.csv beside this file holds one row a measurement: the model, the work (train, score,
generate), the batch, its padded sequence length and visual tokens an image, the decoder layers
and attention blocks kept out of checkpointing, the peak allocated and reserved GiB, and where it
came from (card, date, command, library versions). `role` says what a row is for: `fit` rows
fixed the coefficients in peaks.py, `held out` and `check` rows were measured after the fit.
Every row is checked on every `make test` (tests/test_memory.py).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class MeasuredPeak:
    model: str
    work: str  # train | score | generate
    batch: int
    length: int  # padded sequence length
    visual_tokens: int  # per image
    layers_kept: int  # UNCHECKPOINTED_LAYERS
    attention_kept: int  # UNCHECKPOINTED_ATTENTION
    allocated_gib: float
    reserved_gib: float
    images: str
    role: str  # fit | held out | check
    date: str
    command: str
    card: str
    torch: str
    transformers: str
    peft: str
    bitsandbytes: str


_INTS = {"batch", "length", "visual_tokens", "layers_kept", "attention_kept"}
_FLOATS = {"allocated_gib", "reserved_gib"}


def measured_peaks() -> list[MeasuredPeak]:
    """Every row of calibration.csv."""
    text = resources.files(__package__).joinpath("calibration.csv").read_text(encoding="utf-8")
    rows = []
    for row in csv.DictReader(text.splitlines()):
        rows.append(MeasuredPeak(**{k: int(v) if k in _INTS else float(v) if k in _FLOATS else v
                                    for k, v in row.items()}))
    return rows
