"""Shared fixtures: small generated datasets and one tiny model built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_rows(data_dir: Path, name: str, rows: list[dict]) -> Path:
    path = data_dir / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def make_image(path: Path, size=(64, 64), color=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def small_data(tmp_path) -> Path:
    """Eight train and four test rows in the contract, with real PNG images."""
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "black": (0, 0, 0)}
    names = list(colors)
    train, test = [], []
    for n in range(8):
        name = names[n % 4]
        make_image(tmp_path / "images" / f"{n}.png", color=colors[name])
        options = names[n % 4:] + names[:n % 4]  # the answer is always option a here
        train.append({"id": f"tr{n}", "path": f"images/{n}.png", "question": "무슨 색입니까?",
                      "a": options[0], "b": options[1], "c": options[2], "d": options[3],
                      "answer": "abcd"[n % 4] if n % 2 else "a"})
    for n in range(4):
        make_image(tmp_path / "images" / f"t{n}.png", color=colors[names[n]])
        test.append({"id": f"te{n}", "path": f"images/t{n}.png", "question": "what color?",
                     "a": "red", "b": "blue", "c": "green", "d": "black"})
    write_rows(tmp_path, "train.csv", train)
    write_rows(tmp_path, "test.csv", test)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny model, built by the real `make model` code with a short pretraining."""
    from vqa.config import load_config
    from vqa.pretrain import build_embedded_model

    artifacts = tmp_path_factory.mktemp("artifacts")
    config = load_config([f"ARTIFACTS_DIR={artifacts}", "BASE_PRETRAIN_STEPS=40"], environ={})
    return build_embedded_model(config)


def three_size_batch(processor, folder: Path, train: bool = True) -> dict:
    """A collated batch of two rows each of 448x448 (a vision tower's whole windows only),
    1024x768 and 300x200 (windows cut at the right and bottom edges; other patch grids).
    Tests take it as the `make_batch` fixture."""
    from vqa.data import VQACollator
    from vqa.realsize import write_synthetic_data

    rows = []
    for size in [(448, 448), (1024, 768), (300, 200)]:
        data = write_synthetic_data(folder / f"{size[0]}", 2, 0, size)
        for row in pd.read_csv(data / "train.csv").to_dict("records"):
            row["image"] = Image.open(data / row["path"]).convert("RGB")
            rows.append(row)
    batch = VQACollator(processor, folder, train=train)(rows)
    batch.pop("row_ids", None)
    return batch


@pytest.fixture(scope="session")
def make_batch():
    return three_size_batch

