"""Answering rows: one-pass option scoring (default) or the reference's greedy generation.

`score` runs one forward pass per batch with `logits_to_keep=1` and takes the highest of the four
option-letter logits, so every answer is a valid letter. `generate` decodes up to MAX_NEW_TOKENS
greedily and parses the first option letter; rows whose output holds none are answered by scoring
and counted. Batches are left-padded and sorted by length so padding stays small.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from vqa.clock import bar_postfix
from vqa.data import LETTERS, VQACollator, letter_token_ids
from vqa.oom import FaultInjector, free_memory, split_batch
from vqa.speed import RopeIndex, inner_model, letter_columns

log = logging.getLogger("vqa")

_LETTER = re.compile(r"\b([A-Da-d])\b")
_FAULT_SLEEP = float(os.environ.get("VQA_FAULT_SLEEP_PER_BATCH", "0") or 0)


@dataclass
class Predictions:
    answers: dict[str, str] = field(default_factory=dict)  # id -> a-d
    letter_probs: dict[str, list[float]] = field(default_factory=dict)  # score mode
    unparsed: list[str] = field(default_factory=list)  # generate mode: ids resolved by scoring
    raw_outputs: dict[str, str] = field(default_factory=dict)
    oom_splits: list[int] = field(default_factory=list)  # batch sizes that ran out of memory
    text_only: dict[str, str] = field(default_factory=dict)  # id -> why its image was left out


def parse_letter(text: str) -> str | None:
    """The first standalone option letter A-D in a generated answer, as a-d."""
    match = _LETTER.search(text.strip())
    return match.group(1).lower() if match else None


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _model_device(model):
    return next(p for p in model.parameters()).device


@torch.inference_mode()
def score_batch(model, batch: dict, letter_ids: list[int]) -> torch.Tensor:
    """Probabilities over A-D for each row of a left-padded batch: shape (rows, 4)."""
    # No KV cache: one pass needs none, and the model's config (use_cache, kept on for
    # generate) would otherwise hold every layer's keys and values for the whole batch (on the
    # 7B, 56 KiB a token: more than its activations).
    logits = model(**_to_device(batch, _model_device(model)), logits_to_keep=1,
                   use_cache=False).logits[:, -1]
    columns = letter_columns(model, letter_ids)  # the whole vocabulary or a LetterHead's four
    return torch.softmax(logits[:, columns].float(), dim=-1).cpu()


@torch.inference_mode()
def generate_batch(model, processor, batch: dict, max_new_tokens: int) -> list[str]:
    batch = _to_device(batch, _model_device(model))
    batch.pop("position_ids", None)  # generate keeps the rope offsets it computes itself
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def length_order(rows: list[dict], processor) -> list[int]:
    """Row indices sorted by prompt length (longest first), so a batch holds similar lengths."""
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer.encode(r["question"] + "".join(r[x] for x in LETTERS)))
               for r in rows]
    return sorted(range(len(rows)), key=lambda i: -lengths[i])


class PredictOutOfMemory(RuntimeError):
    """One row alone does not fit: the message names it and the remedy."""


# One-pass scoring computes the rope positions with the batch on the CPU (vqa/speed.py, lever 6);
# make bench turns it off to measure it.
ROPE_ON_CPU = True

# Fault injection for tests (vqa/oom.py); replaced by tests that need other faults.
FAULTS = FaultInjector()


def predict_rows(model, processor, rows: list[dict], data_dir: Path, *, batch_size: int,
                 mode: str = "score", max_new_tokens: int = 16, blank_images: bool = False,
                 desc: str = "predict",
                 on_batch: Callable[[dict[str, str], dict[str, str], dict[str, list[float]]],
                                    None] | None = None,
                 shard: tuple[int, int] = (0, 1), workers: int = 0) -> Predictions:
    """Answers every row exactly once; `on_batch` receives each finished batch's answers, the
    ids among them asked as text only (image unreadable) with the reason, and (score mode)
    their letter probabilities.

    A batch that runs out of GPU memory is split in two and retried, down to one row; later
    batches (shorter: rows run longest first) keep the smaller size. A row whose image cannot be
    read is asked without it. Nothing is skipped. `shard=(rank, world)` answers only this
    rank's whole batches (vqa/distributed.py). `workers` > 0 prepares the next batches (image
    decoding, the processor) in that many processes while the model works on this one.
    """
    collate = VQACollator(processor, Path(data_dir), train=False, blank_images=blank_images)
    result = Predictions(text_only=collate.text_only)
    inner = inner_model(model)
    rope = RopeIndex(inner.config) if mode == "score" and ROPE_ON_CPU else None
    job = _Prepare(collate, rope=rope, pixel_dtype=inner.model.visual.dtype)
    letter_ids = letter_token_ids(processor.tokenizer)
    order = length_order(rows, processor)

    def answer(chunk: list[dict], batch: dict) -> None:
        FAULTS.before_forward(len(chunk))
        if mode == "generate":
            texts = generate_batch(model, processor, batch, max_new_tokens)
            need_scores = []
            for row, text in zip(chunk, texts):
                result.raw_outputs[row["id"]] = text
                letter = parse_letter(text)
                if letter is None:
                    need_scores.append(row)
                else:
                    result.answers[row["id"]] = letter
            if need_scores:
                result.unparsed += [r["id"] for r in need_scores]
                probs = score_batch(model, collate(need_scores), letter_ids)
                for row, p in zip(need_scores, probs):
                    result.answers[row["id"]] = LETTERS[int(p.argmax())]
        else:
            probs = score_batch(model, batch, letter_ids)
            for row, p in zip(chunk, probs):
                result.answers[row["id"]] = LETTERS[int(p.argmax())]
                result.letter_probs[row["id"]] = [round(float(x), 5) for x in p]

    def answer_with_backoff(chunk: list[dict], batch: dict) -> int:
        """Answers `chunk` (`batch`: its collated form); returns the largest batch size that
        worked. On out-of-memory the collated batch itself is halved: nothing is collated
        again, so the preparing workers' work is never redone here."""
        try:
            answer(chunk, batch)
            return len(chunk)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside: the traceback's frames hold the batch's activations
        free_memory()
        if len(chunk) == 1:
            raise PredictOutOfMemory(
                f"row id {chunk[0]['id']} ({chunk[0]['path']}) does not fit in GPU memory "
                f"even alone; lower MAX_PIXELS or use a larger card") from None
        half = len(chunk) // 2
        result.oom_splits.append(len(chunk))
        log.warning("out of GPU memory at batch %d: retrying as %d + %d", len(chunk), half,
                    len(chunk) - half)
        first, second = split_batch(batch, [half, len(chunk) - half])
        return min(answer_with_backoff(chunk[:half], first),
                   answer_with_backoff(chunk[half:], second))

    # The single-process plan: length-sorted rows cut into batches. With several ranks each
    # takes every world-th batch whole, so a row meets the same batch as in one process.
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = shard
    mine = [[rows[i] for i in batch] for batch in batches[rank::world]]
    size = batch_size
    with tqdm(total=sum(map(len, mine)), desc=desc, unit="row", leave=False) as bar:
        for batch, (prepared, text_only) in zip(mine, prepare(mine, job, workers)):
            collate.text_only.update(text_only)
            start = 0
            while start < len(batch):
                chunk = batch[start:start + size]
                if len(chunk) < len(batch) - start:  # after a split: cut off the next piece
                    piece, prepared = split_batch(prepared, [len(chunk),
                                                             len(batch) - start - len(chunk)])
                else:
                    piece = prepared
                size = min(size, answer_with_backoff(chunk, piece))
                if on_batch is not None:
                    ids = [row["id"] for row in chunk]
                    on_batch({i: result.answers[i] for i in ids},
                             {i: collate.text_only[i] for i in ids if i in collate.text_only},
                             {i: result.letter_probs[i] for i in ids if i in result.letter_probs})
                if _FAULT_SLEEP:  # fault injection for tests: a slow batch leaves time to kill
                    time.sleep(_FAULT_SLEEP)
                bar.update(len(chunk))
                bar.set_postfix_str(bar_postfix(bar), refresh=False)
                start += len(chunk)
    missing = [r["id"] for batch in mine for r in batch if r["id"] not in result.answers]
    if missing:  # a bug, never a data problem
        raise RuntimeError(f"{len(missing)} row(s) left unanswered, first {missing[0]}")
    return result


class _Prepare:
    """A batch's collated form and the ids the collator asked as text only, with the reason
    (in a worker process the collator's own record stays there, so it travels with the batch)."""

    def __init__(self, collate: VQACollator, rope: RopeIndex | None = None,
                 pixel_dtype: torch.dtype | None = None):
        self.collate, self.rope, self.pixel_dtype = collate, rope, pixel_dtype

    def __call__(self, rows: list[dict]) -> tuple[dict, dict[str, str]]:
        batch = self.collate(rows)
        if self.rope is not None:  # the forward then skips its own per-row loop (vqa/speed.py)
            positions = self.rope(batch)
            if positions is not None:
                batch["position_ids"] = positions
        if self.pixel_dtype is not None and batch.get("pixel_values") is not None:
            # the vision tower casts to its dtype first: half the bytes to copy, same values
            batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        ids = {str(row["id"]) for row in rows}
        return batch, {i: why for i, why in self.collate.text_only.items() if i in ids}


def prepare(batches: list[list[dict]], job: _Prepare, workers: int):
    """The collated batches in order; with `workers` > 0, made ahead by a torch DataLoader's
    worker processes (two batches ahead each, in pinned memory on a GPU machine) while the
    caller runs the model."""
    if workers <= 0 or len(batches) < 2:
        return map(job, batches)
    from torch.utils.data import DataLoader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked
    return iter(DataLoader(batches, batch_size=None, collate_fn=job,
                           num_workers=min(workers, len(batches)), prefetch_factor=2,
                           pin_memory=torch.cuda.is_available()))


def accuracy_by(rows: list[dict], answers: dict[str, str], key: str) -> dict[str, dict]:
    """Accuracy and counts grouped by `key` (e.g. 'answer' for per-letter, 'family')."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(answers[row["id"]] == row["answer"])
    return {k: {"accuracy": sum(v) / len(v), "rows": len(v)} for k, v in sorted(groups.items())}


def accuracy(rows: list[dict], answers: dict[str, str]) -> float:
    return sum(answers[r["id"]] == r["answer"] for r in rows) / max(1, len(rows))

