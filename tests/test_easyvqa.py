import random

import pandas as pd

from vqa.easyvqa import (
    CANONICAL_OPTIONS,
    COLORS,
    FAMILIES,
    SHAPES,
    family_of,
    load_split,
    make_options,
    sample_questions,
    to_rows,
    write_dataset,
)


def test_options_are_four_distinct_with_same_family_distractors_first():
    rng = random.Random(0)
    for answer in ["red", "circle", "yes"]:
        for index in range(4):
            options = make_options(answer, index, rng)
            assert len(set(options)) == 4 and options[index] == answer
            family = FAMILIES[family_of(answer)]
            same = [o for o in options if o in family]
            assert len(same) == min(4, len(family))
    assert all(o in COLORS for o in make_options("teal", 2, rng))


def test_rows_have_balanced_letters_and_the_contract_columns():
    questions = load_split("test")[:400]
    frame = to_rows(questions, "test", seed=3)
    assert frame["answer"].value_counts().to_dict() == {"a": 100, "b": 100, "c": 100, "d": 100}
    for row in frame.head(50).to_dict("records"):
        assert row[row["answer"]] in FAMILIES[row["family"]]


def test_colour_and_shape_options_come_in_one_order_that_leaks_nothing():
    """The letter of a colour or shape answer is fixed by the answer; the options shown are the
    same for every answer of a quad, so the text alone cannot tell them apart."""
    frame = to_rows(load_split("train")[:2000], "train", seed=5)
    colour = frame[frame["family"] == "color"]
    for quad in CANONICAL_OPTIONS[:2]:
        rows = colour[colour["a"] == quad[0]]
        assert len(rows) > 20
        assert (rows[["a", "b", "c", "d"]].values.tolist()) == [quad] * len(rows)
        assert {row[row["answer"]] for row in rows.to_dict("records")} == set(quad)
    shape = frame[frame["family"] == "shape"]
    assert (shape[["a", "b", "c"]].values.tolist()) == [SHAPES] * len(shape)
    assert shape["d"].isin(COLORS).all() and set(shape["answer"]) == {"a", "b", "c"}
    assert frame["answer"].value_counts().nunique() == 1  # yes/no rows even the letters out


def test_subset_keeps_family_shares():
    questions = load_split("train")
    picked = sample_questions(questions, 1000, seed=0)
    assert len(picked) == 1000 and len({id(q) for q in picked}) == 1000
    assert all(len(sample_questions(questions, n, seed=1)) == n for n in (1, 47, 48, 999))
    shares = pd.Series([family_of(q.answer) for q in picked]).value_counts(normalize=True)
    assert abs(shares["yes/no"] - 0.737) < 0.02


def test_written_dataset_is_disjoint_from_the_base_models_images(tmp_path):
    summary = write_dataset(tmp_path, train_rows=120, test_rows=40, seed=1)
    train = pd.read_csv(tmp_path / "train.csv")
    test = pd.read_csv(tmp_path / "test.csv")
    key = pd.read_csv(tmp_path / "test_answers.csv")
    assert summary["train_rows"] == len(train) == 120 and len(test) == 40
    assert "answer" not in test.columns and list(key["id"]) == list(test["id"])
    train_ids = {int(p.split("/")[-1][:-4]) for p in train["path"]}
    assert all(i % 2 == 1 for i in train_ids)  # even ids pretrain the tiny base model
    assert all((tmp_path / p).is_file() for p in list(train["path"]) + list(test["path"]))
