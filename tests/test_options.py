"""Option shifts at test time (vqa/options.py): the mapping back, what averaging cancels,
CircularEval, and probabilities.csv."""

import math

import pandas as pd
import pytest

from vqa.options import (circular_accuracy, combined, expanded, final_answers, original_order,
                         per_shift, rotated, rotation_id, write_probabilities)

ROW = {"id": "7", "path": "x.png", "question": "q", "a": "red", "b": "blue", "c": "green",
       "d": "yellow", "answer": "c"}


@pytest.mark.parametrize("shift", range(4))
def test_a_shifted_rows_answer_follows_its_option_and_maps_back(shift):
    row = rotated(ROW, shift)
    assert row["id"] == rotation_id("7", shift) and row["question"] == "q"
    assert row[row["answer"]] == "green"  # the right option, wherever it moved
    assert sorted(row[x] for x in "abcd") == sorted(ROW[x] for x in "abcd")
    # a scorer sure of the option "green" at its shifted position is sure of c once mapped back
    probs = [1.0 if row[x] == "green" else 0.0 for x in "abcd"]
    assert original_order(probs, shift) == [0.0, 0.0, 1.0, 0.0]


def _scorer(content: dict[str, float], bias: list[float]):
    """Letter probabilities of a model with a preference per option text and per position."""
    def score(row):
        weights = [math.exp(content[row[x]]) * b for x, b in zip("abcd", bias)]
        return [w / sum(weights) for w in weights]
    return score


def test_rotation_cancels_a_pure_letter_bias_and_recovers_the_content():
    rows = [ROW]
    asked = expanded(rows, "rotate")
    assert [r["id"] for r in asked] == [rotation_id("7", s) for s in range(4)]
    pure = _scorer({"red": 0, "blue": 0, "green": 0, "yellow": 0}, [0.7, 0.1, 0.1, 0.1])
    mean = combined(per_shift(rows, {r["id"]: pure(r) for r in asked}, "rotate"))["7"]
    assert mean == pytest.approx([0.25] * 4)
    # a bias towards "a" that outvotes a weak preference for green on the options as given
    biased = _scorer({"red": 0, "blue": 0, "green": 0.5, "yellow": 0}, [4, 1, 1, 1])
    plain = biased(ROW)
    assert max(range(4), key=plain.__getitem__) == 0
    answers, probs = final_answers(rows, {}, {r["id"]: biased(r) for r in asked}, "rotate")
    assert answers == {"7": "c"} and sum(probs["7"]) == pytest.approx(1)


def test_circular_eval_counts_a_row_only_when_every_shift_is_right():
    rows = [dict(ROW, id="1"), dict(ROW, id="2"), dict(ROW, id="3", answer="a")]
    right = [0.1, 0.1, 0.7, 0.1]
    wrong = [0.7, 0.1, 0.1, 0.1]
    shifts = {"1": [right] * 4, "2": [right, right, wrong, right], "3": [wrong] * 4}
    assert circular_accuracy(rows, shifts) == pytest.approx(2 / 3)  # 3 is always "a": right
    assert circular_accuracy(rows[:2], shifts) == 0.5


def test_probabilities_csv_keeps_the_order_and_leaves_generate_rows_blank(tmp_path):
    path = tmp_path / "probabilities.csv"
    frame = write_probabilities(path, ["2", "1"], {"1": "a", "2": "d"},
                                {"2": [0.1, 0.2, 0.3, 0.4]}, truth={"1": "a", "2": "c"})
    read = pd.read_csv(path, dtype={"id": str})
    assert list(read["id"]) == ["2", "1"] and list(read["true"]) == ["c", "a"]
    assert read.loc[0, "margin"] == pytest.approx(0.1) and read.loc[0, "answer"] == "d"
    assert read.loc[1, ["p_a", "p_b", "p_c", "p_d", "margin"]].isna().all()
    assert len(frame) == 2


def test_rotation_needs_scores_and_says_so():
    from vqa.config import ConfigError, load_config

    assert load_config(["TTA=rotate"], environ={}).tta == "rotate"
    with pytest.raises(ConfigError, match="TTA=rotate averages letter probabilities: it needs "
                                          "INFER_MODE=score"):
        load_config(["TTA=rotate", "INFER_MODE=generate"], environ={})
    with pytest.raises(ConfigError, match="TTA='flip': must be one of none, rotate"):
        load_config(["TTA=flip"], environ={})
