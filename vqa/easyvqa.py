"""The embedded default data: the `easy-vqa` package turned into the competition's CSV contract.

easy-vqa (MIT) ships 38,575 train / 9,673 test questions over 4,000 / 1,000 small images with 13
one-word answers. Each question becomes a four-option row of the answer and distractors from its
family (colour, shape, yes/no):
- colour and shape questions list their options in one canonical order (`CANONICAL_OPTIONS`):
  the colours as two fixed quads, the three shapes with a colour in fourth place. The letter
  then names the answer itself, so a model that sees the colour can answer without looking up
  which line holds that word — the lookup the tiny demo model could not learn in its CPU budget
  (docs/EMBEDDED_DEFAULT.md). The text leaks nothing: within a quad every question shows the
  same four options, whatever the image.
- yes/no questions take same-family distractors first, at the letter that keeps the four
  letters balanced over the whole file.

The train images are split in two by image id: even ids are the base model's pretraining corpus
(`make model`), odd ids the demo's train.csv, so the fine-tune never sees what the base saw.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vqa.data import LETTERS

COLORS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
SHAPES = ["circle", "rectangle", "triangle"]
YES_NO = ["yes", "no"]
FAMILIES = {"color": COLORS, "shape": SHAPES, "yes/no": YES_NO}


def family_of(answer: str) -> str:
    for name, members in FAMILIES.items():
        if answer in members:
            return name
    raise ValueError(f"easy-vqa answer {answer!r} belongs to no family")


# Colour and shape options in a fixed order; a shape row's fourth option is a random colour.
CANONICAL_OPTIONS = [["red", "green", "blue", "black"], ["gray", "teal", "brown", "yellow"],
                     SHAPES]


def canonical_options(answer: str, rng: random.Random) -> list[str] | None:
    """The fixed-order options of a colour or shape answer; None for yes/no."""
    for options in CANONICAL_OPTIONS:
        if answer in options:
            return list(options) if len(options) == 4 else options + [rng.choice(COLORS)]
    return None


def make_options(answer: str, letter_index: int, rng: random.Random) -> list[str]:
    """Four distinct options with `answer` at `letter_index`, same-family distractors first."""
    family = FAMILIES[family_of(answer)]
    same = [a for a in family if a != answer]
    other = [a for f in FAMILIES.values() if f is not family for a in f]
    rng.shuffle(same)
    rng.shuffle(other)
    distractors = (same + other)[:3]
    return distractors[:letter_index] + [answer] + distractors[letter_index:]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image_id: int
    image_path: str


def load_split(split: str) -> list[Question]:
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"unknown easy-vqa split {split!r}")
    return [Question(q, a, i, paths[i]) for q, a, i in zip(questions, answers, image_ids)]


def pretraining_questions() -> list[Question]:
    """The base model's share of easy-vqa: train questions on even image ids."""
    return [q for q in load_split("train") if q.image_id % 2 == 0]


def sample_questions(questions: list[Question], rows: int, seed: int) -> list[Question]:
    """`rows` questions (0 = all), stratified by answer family so each keeps its share."""
    if rows <= 0 or rows >= len(questions):
        return list(questions)
    rng = random.Random(seed)
    by_family: dict[str, list[Question]] = {}
    for q in questions:
        by_family.setdefault(family_of(q.answer), []).append(q)
    # Largest-remainder shares, so the subset has exactly `rows` questions.
    families = sorted(by_family)
    exact = {f: rows * len(by_family[f]) / len(questions) for f in families}
    shares = {f: int(exact[f]) for f in families}
    for f in sorted(families, key=lambda f: exact[f] - shares[f], reverse=True):
        if sum(shares.values()) == rows:
            break
        shares[f] += 1
    picked: list[Question] = []
    for f in families:
        picked += rng.sample(by_family[f], shares[f])
    rng.shuffle(picked)
    return picked


def to_rows(questions: list[Question], prefix: str, seed: int) -> pd.DataFrame:
    """Competition-format rows; `path` points at images/<prefix>/<image id>.png."""
    rng = random.Random(seed)
    records = []
    counts = [0, 0, 0, 0]  # answers per letter so far: yes/no rows even them out
    for n, q in enumerate(questions):
        options = canonical_options(q.answer, rng)
        if options is not None:
            letter_index = options.index(q.answer)
        else:
            letter_index = min(range(4), key=lambda i: (counts[i], (i - n) % 4))
            options = make_options(q.answer, letter_index, rng)
        counts[letter_index] += 1
        records.append({
            "id": f"{prefix.upper()}_{n:05d}",
            "path": f"images/{prefix}/{q.image_id}.png",
            "question": q.question,
            **dict(zip(LETTERS, options)),
            "answer": LETTERS[letter_index],
            "family": family_of(q.answer),
        })
    frame = pd.DataFrame.from_records(records)
    # The balancing letter would otherwise follow the question order: shuffle rows.
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def write_dataset(data_dir: Path, train_rows: int, test_rows: int, seed: int) -> dict:
    """Writes train.csv, test.csv, test_answers.csv, sample_submission.csv and the images."""
    data_dir = Path(data_dir)
    train_pool = [q for q in load_split("train") if q.image_id % 2 == 1]
    train = to_rows(sample_questions(train_pool, train_rows, seed), "train", seed)
    test = to_rows(sample_questions(load_split("test"), test_rows, seed + 1), "test", seed + 1)

    for prefix, questions in (("train", train_pool), ("test", load_split("test"))):
        sources = {q.image_id: q.image_path for q in questions}
        wanted = train if prefix == "train" else test
        target = data_dir / "images" / prefix
        target.mkdir(parents=True, exist_ok=True)
        for rel in wanted["path"].unique():
            image_id = int(Path(rel).stem)
            shutil.copyfile(sources[image_id], data_dir / rel)

    columns = ["id", "path", "question", *LETTERS]
    train[columns + ["answer"]].to_csv(data_dir / "train.csv", index=False)
    test[columns].to_csv(data_dir / "test.csv", index=False)
    test[["id", "answer", "family"]].to_csv(data_dir / "test_answers.csv", index=False)
    train[["id", "family"]].to_csv(data_dir / "train_families.csv", index=False)
    pd.DataFrame({"id": test["id"], "answer": "a"}).to_csv(
        data_dir / "sample_submission.csv", index=False)
    return {
        "train_rows": len(train), "test_rows": len(test),
        "train_images": int(train["path"].nunique()), "test_images": int(test["path"].nunique()),
        "train_letters": train["answer"].value_counts().sort_index().to_dict(),
        "families": train["family"].value_counts().to_dict(),
    }
