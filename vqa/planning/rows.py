"""What the data makes the model do: every row's image size and tokens, and the row problems.

The scan reads each image's header (size only, no decode) and counts each row's text tokens with
the loaded processor's own chat template and tokenizer, or, when the processor cannot be loaded
here (a hub id without network), with the published preprocessor settings and an estimate of the
text that errs high. A row's sequence length is its text tokens plus its visual tokens under the
run's pixel bounds (MIN_PIXELS, MAX_PIXELS).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from vqa.data import MAX_ASPECT_RATIO, DataError, build_messages, padded_size, resolve_image
from vqa.planning.shapes import published_architectures, visual_tokens_for


@dataclass
class RowProblem:
    file: str
    row: int  # 1-based line number in the CSV, header = 1
    id: str
    path: str
    reason: str
    action: str = ""  # what train/submit will do with the row
    kind: str = "image"  # image (unusable) | aspect (padded) | too long (MAX_SEQUENCE_LENGTH)


def _action(csv_name: str) -> str:
    return ("skipped by train" if csv_name == "train.csv"
            else "answered from the text alone by submit")


@dataclass
class RowShape:
    """What a row costs before the pixel bounds are applied: its text tokens and image size."""

    id: str
    text_tokens: int  # prompt with one <|image_pad|> placeholder, plus the answer and <|im_end|>
    width: int
    height: int


@dataclass
class Tokens:
    """How rows are measured: the loaded processor's rule, or an estimate when it is missing."""

    min_pixels: int
    max_pixels: int
    patch: int
    merge: int
    count_text: Callable[[dict], int]
    source: str

    def visual(self, shape: RowShape, max_pixels: int | None = None) -> int:
        return visual_tokens_for(shape.height, shape.width, min_pixels=self.min_pixels,
                                 max_pixels=max_pixels or self.max_pixels,
                                 patch_size=self.patch, merge_size=self.merge)

    def length(self, shape: RowShape, max_pixels: int | None = None) -> int:
        return shape.text_tokens - 1 + self.visual(shape, max_pixels)

    @property
    def pixels_per_token(self) -> int:
        return (self.patch * self.merge) ** 2


def tokens_from_processor(processor) -> Tokens:
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", {}) or {}

    def count_text(row) -> int:
        text = processor.apply_chat_template(build_messages(row), tokenize=False,
                                             add_generation_prompt=True)
        return len(processor.tokenizer.encode(text, add_special_tokens=False)) + 2

    return Tokens(size.get("shortest_edge") or image_processor.min_pixels,
                  size.get("longest_edge") or image_processor.max_pixels,
                  image_processor.patch_size, image_processor.merge_size, count_text,
                  "the loaded processor")


def tokens_from_table(model_id: str, min_pixels: int | None, max_pixels: int | None,
                      why: str) -> Tokens:
    """The model's published preprocessor settings (architectures.json; Qwen2.5-VL's for a model
    not in it), and text tokens estimated at one per two UTF-8 bytes (Qwen's BPE needs fewer
    for English and Korean alike, so the estimate errs high)."""
    entry = published_architectures()["models"].get(model_id)
    pre = entry["preprocessor"] if entry else next(
        m["preprocessor"] for m in published_architectures()["models"].values()
        if m["config"]["model_type"] == "qwen2_5_vl")
    template = 24  # <|im_start|>user ... <|vision_start|><|image_pad|><|vision_end|> ... assistant

    def count_text(row) -> int:
        text = "\n".join(str(row[k]) for k in ("question", "a", "b", "c", "d"))
        return template + math.ceil(len(text.encode("utf-8")) / 2) + 2

    return Tokens(min_pixels or pre["min_pixels"], max_pixels or pre["max_pixels"],
                  pre["patch_size"], pre["merge_size"], count_text,
                  f"the published preprocessor settings; text tokens estimated ({why})")


def scan_rows(frame, csv_name: str, data_dir: Path, tokens: Tokens,
              max_sequence_length: int | None = None
              ) -> tuple[list[RowShape], list[RowProblem]]:
    """Each usable row's shape (image header only, no decode) and every row-level problem: an
    image that cannot be used, an aspect ratio that needs padding, a sequence longer than
    `max_sequence_length`."""
    shapes, problems = [], []
    for n, row in enumerate(tqdm(frame.to_dict("records"), desc=f"scan {csv_name}", unit="row",
                                 leave=False)):
        line = n + 2

        def problem(reason: str, action: str = _action(csv_name), kind: str = "image") -> None:
            problems.append(RowProblem(csv_name, line, row["id"], row["path"], reason, action,
                                       kind))

        try:
            with Image.open(resolve_image(data_dir, row["path"])) as image:
                width, height = image.size
        except DataError as exc:
            problem(str(exc))
            continue
        except FileNotFoundError:
            problem("image file missing")
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problem(f"unreadable image ({type(exc).__name__}: {exc})")
            continue
        padded = padded_size(width, height)
        if padded != (width, height):
            problem(f"aspect ratio {max(width, height) / min(width, height):.0f}:1 exceeds "
                    f"{MAX_ASPECT_RATIO}:1 (Qwen's resize rejects it)",
                    f"padded with white to {padded[0]}x{padded[1]} on load", "aspect")
            width, height = padded
        shape = RowShape(row["id"], tokens.count_text(row), width, height)
        shapes.append(shape)
        length = tokens.length(shape)
        if max_sequence_length and length > max_sequence_length:
            problem(f"sequence of {length} tokens ({tokens.visual(shape)} visual) exceeds "
                    f"MAX_SEQUENCE_LENGTH={max_sequence_length}",
                    "skipped by train" if csv_name == "train.csv"
                    else "predicted all the same (a test row is never dropped)", "too long")
    return shapes, problems


@dataclass
class Workload:
    """Per usable row, its sequence length (prompt, image tokens and answer) and its visual
    tokens under the run's pixel bounds: the rows training sees, and the rows prediction sees
    (test.csv's, and train.csv's for make eval's validation sample)."""

    train_lengths: list[int]
    train_visual: list[int]
    predict_lengths: list[int]
    predict_visual: list[int]
    test_rows: int | None = None  # the first prediction rows that are test.csv's (None: all)

    @staticmethod
    def worst_batch(lengths: list[int], visual: list[int], batch: int) -> tuple[int, int]:
        """(tokens, patches) of the heaviest batch a sampler can form: the `batch` longest rows
        padded to the longest, with the `batch` largest images."""
        if not lengths:
            return 0, 0
        batch = min(batch, len(lengths))
        longest = max(lengths)
        largest = sorted(visual, reverse=True)[:batch]
        return batch * longest, 4 * sum(largest)

    @property
    def longest(self) -> int:
        return max(self.train_lengths + self.predict_lengths, default=0)


def workload(train: list[RowShape], predict: list[RowShape], tokens: Tokens,
             max_pixels: int | None = None) -> Workload:
    return Workload([tokens.length(r, max_pixels) for r in train],
                    [tokens.visual(r, max_pixels) for r in train],
                    [tokens.length(r, max_pixels) for r in predict],
                    [tokens.visual(r, max_pixels) for r in predict])


def distribution(values: list[int]) -> dict:
    """min, median, p95 and max of `values` ({} when there are none)."""
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}
