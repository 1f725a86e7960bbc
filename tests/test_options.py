"""Option shifts at test time (vqa/options.py): the mapping back, what averaging cancels,
CircularEval, and probabilities.csv."""

import math

import pandas as pd
import pytest

from vqa.options import (circular_accuracy, combined, debiased, expanded, final_answers,
                         letter_prior, original_ids, original_order, per_shift, prior_rows,
                         rotated_ids, rotated_row, rotation_id, write_probabilities)

ROW = {"id": "7", "path": "x.png", "question": "q", "a": "red", "b": "blue", "c": "green",
       "d": "yellow", "answer": "c"}


@pytest.mark.parametrize("shift", range(4))
def test_a_shifted_rows_answer_follows_its_option_and_maps_back(shift):
    row = rotated_row(ROW, shift)
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
    rotated = rotated_ids(rows, "rotate")
    asked = expanded(rows, rotated)
    assert [r["id"] for r in asked] == [rotation_id("7", s) for s in range(4)]
    pure = _scorer({"red": 0, "blue": 0, "green": 0, "yellow": 0}, [0.7, 0.1, 0.1, 0.1])
    mean = combined(per_shift(rows, {r["id"]: pure(r) for r in asked}, rotated))["7"]
    assert mean == pytest.approx([0.25] * 4)
    # a bias towards "a" that outvotes a weak preference for green on the options as given
    biased = _scorer({"red": 0, "blue": 0, "green": 0.5, "yellow": 0}, [4, 1, 1, 1])
    plain = biased(ROW)
    assert max(range(4), key=plain.__getitem__) == 0
    answers, probs = final_answers(rows, {}, {r["id"]: biased(r) for r in asked}, rotated)
    assert answers == {"7": "c"} and sum(probs["7"]) == pytest.approx(1)


def _content_rows(n: int, seed: int = 0) -> tuple[list[dict], dict[str, float]]:
    """Rows whose options are distinct words, the right one liked best, and the liking."""
    import random

    rng = random.Random(seed)
    rows, content = [], {}
    for i in range(n):
        words = [f"w{i}-{k}" for k in range(4)]
        likes = sorted((rng.uniform(0, 2) for _ in range(4)), reverse=True)
        likes[0] = likes[1] + 0.5  # the right option liked clearly best
        for word, like in zip(words, likes):
            content[word] = like
        right = rng.randrange(4)
        order = words[1:]
        rng.shuffle(order)
        order.insert(right, words[0])
        rows.append({"id": str(i), "question": "q", **dict(zip("abcd", order)),
                     "answer": "abcd"[right]})
    return rows, content


def test_the_prior_divides_a_pure_letter_bias_out_exactly_and_rotation_recovers_the_answers():
    rows, content = _content_rows(40)
    bias = [3.0, 1.0, 1.2, 0.8]  # a strong preference for "a"
    score = _scorer(content, bias)
    plain = final_answers(rows, {r["id"]: "abcd"[max(range(4), key=score(r).__getitem__)]
                                 for r in rows}, {r["id"]: score(r) for r in rows})[0]
    right = sum(plain[r["id"]] == r["answer"] for r in rows)
    assert right < len(rows)  # the bias costs answers on the options as given
    rotated = rotated_ids(rows, "rotate")
    probs = {r["id"]: score(r) for r in expanded(rows, rotated)}
    prior = letter_prior(rows, probs, rotated)
    assert prior == pytest.approx([b / sum(bias) for b in bias], abs=1e-9)
    by_rotation = final_answers(rows, {}, probs, rotated)[0]
    answers, calibrated = final_answers(rows, {}, probs, rotated, prior)
    for row in rows:
        truth = [math.exp(content[row[x]]) for x in "abcd"]
        assert calibrated[row["id"]] == pytest.approx([t / sum(truth) for t in truth], abs=1e-9)
        assert answers[row["id"]] == by_rotation[row["id"]] == row["answer"]
    # each shift's own answer is right once the prior is out: CircularEval is perfect
    assert circular_accuracy(rows, per_shift(rows, probs, rotated, prior)) == 1.0
    assert circular_accuracy(rows, per_shift(rows, probs, rotated)) < 1.0


def test_calibration_alone_rotates_a_seeded_share_and_debiases_the_rest():
    rows, content = _content_rows(200, seed=1)
    bias = [0.6, 2.5, 0.9, 1.0]
    score = _scorer(content, bias)
    rotated = rotated_ids(rows, "none", "prior", share=0.05, seed=42)
    assert len(rotated) == 10 and rotated == set(prior_rows(rows[::-1], 0.05, 42))
    assert rotated != set(prior_rows(rows, 0.05, 43))  # another seed, another share
    asked = expanded(rows, rotated)
    assert len(asked) == 200 + 3 * 10
    assert sorted(set(original_ids(rows, rotated).values())) == sorted(r["id"] for r in rows)
    probs = {r["id"]: score(r) for r in asked}
    prior = letter_prior(rows, probs, rotated)
    assert prior == pytest.approx([b / sum(bias) for b in bias], abs=1e-9)
    answers, calibrated = final_answers(rows, {}, probs, rotated, prior, average=False)
    assert all(answers[r["id"]] == r["answer"] for r in rows)
    # a rotated row answers from its options as given, like the rest: the shifts only estimate
    row = rows[[r["id"] for r in rows].index(sorted(rotated)[0])]
    as_given = debiased(probs[rotation_id(row["id"], 0)], prior)
    assert calibrated[row["id"]] == pytest.approx(as_given)
    assert debiased([0.5, 0.5, 0, 0], [0.25, 0.75, 0, 0][:2] + [0.5, 0.5]) == pytest.approx(
        [0.75, 0.25, 0, 0])


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
