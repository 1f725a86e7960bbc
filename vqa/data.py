"""The data contract: CSV schema and validation, images, the stratified split, prompts, collators.

train.csv: id, path, question, a, b, c, d, answer (a-d); test.csv: the same without answer; `path`
is relative to DATA_DIR. An optional sample_submission.csv fixes the submission's id order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

LETTERS = ["a", "b", "c", "d"]
OPTION_LABELS = ["A", "B", "C", "D"]  # what the model reads and answers
REQUIRED_COLUMNS = ["id", "path", "question", *LETTERS]
PROMPT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# Qwen's resize rule raises above this aspect ratio; such images are padded to it.
MAX_ASPECT_RATIO = 200

log = logging.getLogger("vqa")


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the file and row."""


def csv_encoding(path: Path) -> str:
    """utf-8-sig (UTF-8 with or without a BOM), else cp949 for Korean files saved by Excel.

    CP949 is a superset of EUC-KR, so both decode. Anything else is refused with the byte that
    failed: guessing further would turn text into mojibake silently.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data.decode("utf-8-sig")
        return "utf-8-sig"
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        data.decode("cp949")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: neither UTF-8 ({utf8_error.reason} at byte {utf8_error.start}) nor "
            f"CP949/EUC-KR text; save it as UTF-8") from None
    log.warning("%s is not UTF-8: decoded as CP949 (EUC-KR)", path)
    return "cp949"


def _read_csv(path: Path, required: list[str], *, rows_needed: bool) -> pd.DataFrame:
    """A CSV of strings with the `required` columns, stripped, and unique ids; DataError on
    anything else (`rows_needed`: a header alone is an error)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False,
                            encoding=csv_encoding(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot parse CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"found {', '.join(frame.columns)}")
    if rows_needed and frame.empty:
        raise DataError(f"{path}: no rows (header only)")
    for column in required:
        frame[column] = frame[column].astype(str).str.strip()
    duplicated = frame["id"][frame["id"].duplicated()]
    if not duplicated.empty:
        row = int(duplicated.index[0]) + 2  # +1 header, +1 one-based
        raise DataError(f"{path}: row {row}: duplicate id {duplicated.iloc[0]!r} "
                        f"({duplicated.size} duplicate(s) in all)")
    return frame


def _check_answers(frame: pd.DataFrame, path: Path) -> None:
    """The answer column lower-cased, each one of a-d; DataError naming the first that is not."""
    frame["answer"] = frame["answer"].str.lower()
    bad = frame.index[~frame["answer"].isin(LETTERS)]
    if len(bad):
        raise DataError(f"{path}: row {int(bad[0]) + 2} (id {frame.at[bad[0], 'id']!r}): "
                        f"answer {frame.at[bad[0], 'answer']!r} is not one of a, b, c, d")


def read_table(path: Path, *, with_answer: bool) -> pd.DataFrame:
    """Reads and validates train.csv (with_answer) or test.csv; raises DataError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    frame = _read_csv(path, REQUIRED_COLUMNS + (["answer"] if with_answer else []),
                      rows_needed=True)
    for column in ["id", "path", "question", *LETTERS]:
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise DataError(f"{path}: row {int(empty[0]) + 2} (id {frame.at[empty[0], 'id']!r}): "
                            f"empty {column!r}")
    if with_answer:
        _check_answers(frame, path)
    return frame.reset_index(drop=True)


ANSWER_KEY = "test_answers.csv"  # id, answer[, family]: the embedded default's test answers


def read_answer_key(data_dir: Path) -> pd.DataFrame | None:
    """DATA_DIR's test answer key (id, answer, and optionally family), read and validated as
    train.csv's answers are; None when there is none (a competition's data has none)."""
    path = Path(data_dir) / ANSWER_KEY
    if not path.is_file():
        return None
    key = _read_csv(path, ["id", "answer"], rows_needed=False)
    _check_answers(key, path)
    return key


def resolve_image(data_dir: Path, rel: str) -> Path:
    """The image's absolute path; refuses paths that leave DATA_DIR."""
    root = Path(data_dir).resolve()
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise DataError(f"image path {rel!r} resolves outside DATA_DIR ({root})")
    return path


# Decode huge photos at a reduced size (JPEG draft mode) so RAM stays flat; Qwen resizes anyway.
DRAFT_SIZE = (3584, 3584)


def load_image(path: Path) -> Image.Image:
    """An RGB image: EXIF orientation applied, transparency over white, 16-bit scaled to 8.

    PIL's decompression-bomb guard stays on. Any unreadable file raises DataError naming it.
    """
    from PIL import ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", DRAFT_SIZE)
            image.load()
            image = ImageOps.exif_transpose(image)
            return pad_to_aspect_ratio(_to_rgb(image))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise DataError(f"{path}: unreadable image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64)
        top = pixels.max() or 1.0
        image = Image.fromarray((pixels / top * 255).astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def padded_size(width: int, height: int, limit: int = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """(width, height) after pad_to_aspect_ratio, computed without an image."""
    if max(width, height) <= limit * min(width, height):
        return width, height
    if width > height:
        return width, -(-width // limit)
    return -(-height // limit), height


def pad_to_aspect_ratio(image: Image.Image, limit: int = MAX_ASPECT_RATIO) -> Image.Image:
    """A strip longer than `limit`:1 gets white margins on its short side, centred, so that
    Qwen's resize accepts it; nothing of the picture is cut or squeezed."""
    width, height = image.size
    size = padded_size(width, height, limit)
    if size == (width, height):
        return image
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def image_problems(frame: pd.DataFrame, data_dir: Path, desc: str) -> dict[str, str]:
    """id -> reason for every row whose image cannot be used, found by decoding each one."""
    from tqdm import tqdm

    problems = {}
    for row in tqdm(frame.to_dict("records"), desc=desc, unit="image", leave=False):
        try:
            load_image(resolve_image(data_dir, row["path"]))
        except DataError as exc:
            problems[str(row["id"])] = str(exc)
    return problems


def blank_like(image: Image.Image) -> Image.Image:
    """A white image of the same size: the model's input with the picture's content removed."""
    return Image.new("RGB", image.size, (255, 255, 255))


def _stratified(frame: pd.DataFrame, seed: int, **size) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scikit-learn's split of `frame` (`size`: its train_size or test_size), the answer letters
    in the same proportions in both parts where every letter has rows enough, else at random;
    reproducible for a seed."""
    from sklearn.model_selection import train_test_split

    counts = frame["answer"].value_counts()
    parts = {"train_size": size.get("train_size"), "test_size": size.get("test_size")}
    smallest = min(math.ceil(v * len(frame)) if isinstance(v, float) else v
                   for v in parts.values() if v is not None)
    can_stratify = counts.min() >= 2 and min(smallest, len(frame) - smallest) >= len(counts)
    kept, other = train_test_split(frame, random_state=seed, **size,
                                   stratify=frame["answer"] if can_stratify else None)
    return kept.reset_index(drop=True), other.reset_index(drop=True)


def stratified_split(frame: pd.DataFrame, val_fraction: float, seed: int,
                     path: Path | str = "train.csv"):
    """(train, validation): VAL_FRACTION of the rows held out for validation, stratified by
    answer letter, reproducible for a seed. DataError when `path` has too few rows to leave any
    on either side."""
    val = math.ceil(val_fraction * len(frame))
    if not 1 <= val < len(frame):
        raise DataError(f"{path}: {len(frame)} usable row(s) cannot be split into training and "
                        f"validation (VAL_FRACTION={val_fraction}); at least 2 are needed")
    return _stratified(frame, seed, test_size=val_fraction)


def stratified_sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """At most `rows` rows keeping the answer-letter proportions: the fixed validation sample."""
    if len(frame) <= rows:
        return frame.reset_index(drop=True)
    return _stratified(frame, seed, train_size=rows)[0]


def prompt_text(row) -> str:
    options = "\n".join(f"{label}. {row[letter]}" for label, letter in zip(OPTION_LABELS, LETTERS))
    return f"{row['question']}\n{options}\n{PROMPT_INSTRUCTION}"


def build_messages(row, with_image: bool = True) -> list[dict]:
    image = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*image, {"type": "text", "text": prompt_text(row)}]}]


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of A-D as the model emits them after 'assistant\\n'; each must be one token."""
    ids = []
    for label in OPTION_LABELS:
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"option letter {label!r} is not a single token: {tokens}")
        ids.append(tokens[0])
    return ids


@dataclass
class VQACollator:
    """Turns rows into a left-padded model batch.

    With `train=True` the answer letter and <|im_end|> follow the prompt and are the only labelled
    tokens (with <|im_end|> labelled, generation learns to stop after the letter).
    `blank_images=True` replaces every picture with a white one of the same size.
    When predicting (`train=False`), a row whose image cannot be loaded is asked as text only,
    so it still gets an answer; its id and the reason land in `text_only`.
    """

    processor: object
    data_dir: Path
    train: bool = False
    blank_images: bool = False
    text_only: dict = field(default_factory=dict)  # id -> why the image was left out

    def _image(self, row) -> Image.Image | None:
        image = row.get("image")  # rows may carry a decoded image (the base's pretraining)
        if image is None:
            try:
                image = load_image(resolve_image(self.data_dir, row["path"]))
            except DataError as exc:
                if self.train:
                    raise
                self.text_only[str(row["id"])] = str(exc)
                return None
        return blank_like(image) if self.blank_images else image

    def __call__(self, rows: list[dict]) -> dict:
        texts, images = [], []
        for row in rows:
            image = self._image(row)
            text = self.processor.apply_chat_template(
                build_messages(row, with_image=image is not None), tokenize=False,
                add_generation_prompt=True)
            if self.train:
                text += OPTION_LABELS[LETTERS.index(row["answer"])] + "<|im_end|>"
            texts.append(text)
            if image is not None:
                images.append(image)
        batch = self.processor(text=texts, images=images or None, padding=True,
                               padding_side="left", return_tensors="pt")
        if self.train:
            labels = torch.full_like(batch["input_ids"], -100)
            labels[:, -2:] = batch["input_ids"][:, -2:]
            batch["labels"] = labels
            batch["row_ids"] = [str(row["id"]) for row in rows]  # named if a row cannot fit
        batch.pop("token_type_ids", None)
        if "mm_token_type_ids" not in batch:
            raise RuntimeError("processor returned no mm_token_type_ids: mRoPE positions need them")
        return dict(batch)
