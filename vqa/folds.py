"""FOLDS=K: which fold each training row belongs to, grouped by image content.

Folds are stratified by answer letter and grouped by image (scikit-learn's StratifiedGroupKFold,
seeded with SEED): every row of one image lands in the same fold, so no image is both trained on
and held out, and each training row is out of fold exactly once. An image is known by the
SHA-256 of its decoded pixels (after EXIF orientation, in RGB) with its size: copies under other
names, and lossless re-encodings (PNG, BMP, lossless WebP, other metadata) share a group. It
misses near-duplicates whose pixels differ: a JPEG saved again, a resize, a crop, a colour or
brightness change, a screenshot of the picture; a perceptual hash would catch those and is not
used (it also merges distinct pictures that look alike).

The assignment is made once and saved to ARTIFACTS_DIR/folds.json; fold k runs in its own
folder ARTIFACTS_DIR/fold-k (FOLD=k), whose parent holds it. vqa/fold_runs.py trains, scores
and predicts the folds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pandas as pd

from vqa import distributed
from vqa.config import Config
from vqa.data import LETTERS, DataError, load_image, read_table, resolve_image
from vqa.io import file_fingerprint, write_json_atomic

log = logging.getLogger("vqa")

FOLDS_FILE = "folds.json"


def fold_root(config: Config) -> Path:
    """The folder that holds folds.json: ARTIFACTS_DIR's parent for a fold's own run (FOLD=k),
    else ARTIFACTS_DIR."""
    return config.artifacts_dir.parent if config.fold is not None else config.artifacts_dir


def fold_config(config: Config, k: int) -> Config:
    """Fold k's run: its own folder under ARTIFACTS_DIR, the same base model."""
    return dataclasses.replace(config, artifacts_dir=config.artifacts_dir / f"fold-{k}",
                               model_id=config.resolved_model_id, fold=k)


def pixel_digest(data_dir: Path, rel: str) -> str | None:
    """The SHA-256 of the image's decoded pixels and size; None when it cannot be decoded."""
    try:
        image = load_image(resolve_image(data_dir, rel))
    except DataError:
        return None
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_groups(frame: pd.DataFrame, data_dir: Path) -> dict[str, str]:
    """id -> the image's pixel digest (an unreadable image is a group of its own row)."""
    from tqdm import tqdm

    by_path: dict[str, str | None] = {}
    groups = {}
    for row in tqdm(frame.to_dict("records"), desc="hash train images", unit="image",
                    leave=False):
        if row["path"] not in by_path:
            by_path[row["path"]] = pixel_digest(data_dir, row["path"])
        groups[row["id"]] = by_path[row["path"]] or f"unreadable:{row['id']}"
    return groups


def assign_folds(frame: pd.DataFrame, groups: dict[str, str], k: int, seed: int
                 ) -> dict[str, int]:
    """id -> fold (0..k-1): stratified by answer, every row of a group in one fold."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    ids = list(frame["id"])
    distinct = len({groups[i] for i in ids})
    if distinct < k:
        raise DataError(f"train.csv: FOLDS={k} needs at least {k} distinct images; it has "
                        f"{distinct}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = {}
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(ids)), list(frame["answer"]),
                                                    [groups[i] for i in ids])):
        folds.update({ids[n]: fold for n in held})
    return folds


def _assignment_key(config: Config, frame: pd.DataFrame) -> dict:
    """What the assignment depends on: K, the seed, train.csv and its images' sizes and times."""
    stats = []
    for rel in sorted(set(frame["path"])):
        try:
            stat = resolve_image(config.data_dir, rel).stat()
            stats.append((rel, stat.st_size, stat.st_mtime_ns))
        except (OSError, DataError):
            stats.append((rel, -1, -1))
    return {"folds": config.folds, "seed": config.seed,
            "train_csv": file_fingerprint(config.data_dir / "train.csv"),
            "images": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}


def fold_assignment(config: Config) -> dict[str, int]:
    """id -> fold for every row of train.csv: read from folds.json when made from the same
    inputs, else made (images decoded and hashed once) and saved there."""
    path = fold_root(config) / FOLDS_FILE
    frame = read_table(config.data_dir / "train.csv", with_answer=True)
    key = _assignment_key(config, frame)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["folds"]
    groups = image_groups(frame, config.data_dir)
    folds = assign_folds(frame, groups, config.folds, config.seed)
    if distributed.world().is_main:
        write_json_atomic(path, {"key": key, "summary": fold_summary(frame, groups, folds),
                                 "folds": folds})
    return folds


def fold_summary(frame: pd.DataFrame, groups: dict[str, str], folds: dict[str, int]) -> dict:
    """Rows, images and answer shares of each fold; how many images more than one row shows."""
    per_image = pd.Series(groups).value_counts()
    out = {"rows": len(frame), "images": int(per_image.size),
           "images_with_several_rows": int((per_image > 1).sum()), "per_fold": []}
    for fold in sorted(set(folds.values())):
        rows = frame[frame["id"].map(folds) == fold]
        out["per_fold"].append({
            "fold": fold, "rows": len(rows), "images": len({groups[i] for i in rows["id"]}),
            "answer_shares": {x: round(float((rows["answer"] == x).mean()), 4)
                              for x in LETTERS}})
    return out
