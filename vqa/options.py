"""The order of a row's four options at test time: TTA=rotate and what it measures.

`TTA=rotate` asks every row four times, its options cyclically shifted by 0-3 places, maps each
shift's letter probabilities back to the original options and averages them. A model's
preference for a letter position then falls on each option once, so a pure letter bias cancels.
Probabilities are averaged, not log-probabilities: one shift that puts near-zero mass on the
right option would dominate a geometric mean, while the arithmetic mean lets the other three
outvote it (it is also what the published rotation entries average).

CircularEval (MMBench, arXiv 2307.06281) counts a row correct only when every shift picks the
right option: a position-robust accuracy for validation.
"""

from __future__ import annotations

from vqa.data import LETTERS

SHIFTS = len(LETTERS)
TTA_MODES = ("none", "rotate")


def rotation_id(row_id: str, shift: int) -> str:
    """The id of `row_id` asked with its options shifted by `shift`."""
    return f"{row_id}#rot{shift}"


def rotated(row: dict, shift: int) -> dict:
    """The row with option letter i showing the original option (i + shift) mod 4; its answer
    (when it has one) follows its option. Shift 0 is the row itself under a rotation id."""
    out = dict(row, id=rotation_id(row["id"], shift))
    for i, letter in enumerate(LETTERS):
        out[letter] = row[LETTERS[(i + shift) % SHIFTS]]
    if row.get("answer") in LETTERS:
        out["answer"] = LETTERS[(LETTERS.index(row["answer"]) - shift) % SHIFTS]
    return out


def expanded(rows: list[dict], tta: str) -> list[dict]:
    """The rows to ask: as they are (TTA=none), or each under its four shifts."""
    if tta == "none":
        return list(rows)
    return [rotated(row, shift) for row in rows for shift in range(SHIFTS)]


def original_order(probs: list[float], shift: int) -> list[float]:
    """A shifted row's letter probabilities as probabilities of the original options a-d."""
    return [probs[(j - shift) % SHIFTS] for j in range(SHIFTS)]


def per_shift(rows: list[dict], probs: dict[str, list[float]], tta: str
              ) -> dict[str, list[list[float]]]:
    """Each row's probabilities of its original options, one list per shift asked."""
    if tta == "none":
        return {row["id"]: [probs[row["id"]]] for row in rows}
    return {row["id"]: [original_order(probs[rotation_id(row["id"], s)], s)
                        for s in range(SHIFTS)] for row in rows}


def combined(shifts: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    """The mean over shifts of each row's option probabilities."""
    return {i: [sum(p[j] for p in ps) / len(ps) for j in range(SHIFTS)]
            for i, ps in shifts.items()}


def argmax_letter(probs: list[float]) -> str:
    return LETTERS[max(range(SHIFTS), key=lambda j: probs[j])]


def circular_accuracy(rows: list[dict], shifts: dict[str, list[list[float]]]) -> float:
    """Share of rows whose right option wins under every shift (CircularEval)."""
    right = [all(argmax_letter(p) == row["answer"] for p in shifts[row["id"]]) for row in rows]
    return sum(right) / max(1, len(rows))


def letter_shares(letters: list[str]) -> dict[str, float]:
    """How often each letter appears: the predicted against the true shows a position bias."""
    return {x: round(letters.count(x) / max(1, len(letters)), 4) for x in LETTERS}


def margin(probs: list[float]) -> float:
    """The top option's probability minus the second's."""
    top = sorted(probs, reverse=True)
    return top[0] - top[1]


def final_answers(rows: list[dict], answers: dict[str, str], probs: dict[str, list[float]],
                  tta: str) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Each row's answer and option probabilities from what was asked: under TTA=rotate the
    mean over its four shifts (its argmax is the answer); otherwise the answer given and, in
    score mode, its probabilities (generate mode has none)."""
    if tta == "none":
        return ({r["id"]: answers[r["id"]] for r in rows},
                {r["id"]: probs[r["id"]] for r in rows if r["id"] in probs})
    mean = combined(per_shift(rows, probs, tta))
    return {i: argmax_letter(p) for i, p in mean.items()}, mean


def original_ids(rows: list[dict], tta: str) -> dict[str, str]:
    """Asked id -> the row's own id."""
    if tta == "none":
        return {r["id"]: r["id"] for r in rows}
    return {rotation_id(r["id"], s): r["id"] for r in rows for s in range(SHIFTS)}


def write_probabilities(path, order: list[str], answers: dict[str, str],
                        probs: dict[str, list[float]], truth: dict[str, str] | None = None):
    """probabilities.csv: id, p_a..p_d, the chosen letter, the margin between the top two (and
    the true letter for validation rows); probabilities left empty where there are none
    (INFER_MODE=generate). Written atomically; returns the frame."""
    import pandas as pd

    from vqa.io import write_text_atomic

    records = []
    for i in order:
        p = probs.get(i)
        record = {"id": i, **{f"p_{x}": (round(p[j], 6) if p else None)
                             for j, x in enumerate(LETTERS)},
                  "answer": answers[i], "margin": round(margin(p), 6) if p else None}
        if truth is not None:
            record["true"] = truth[i]
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    write_text_atomic(path, frame.to_csv(index=False))
    return frame
