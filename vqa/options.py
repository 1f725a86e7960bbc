"""The order of a row's four options at test time: TTA=rotate, CALIBRATE=prior, what they measure.

`TTA=rotate` asks every row four times, its options cyclically shifted by 0-3 places, maps each
shift's letter probabilities back to the original options and averages them. A model's
preference for a letter position then falls on each option once. Probabilities are averaged,
not log-probabilities: one shift that puts near-zero mass on the right option would dominate a
geometric mean, while the arithmetic mean lets the other three outvote it (it is also what the
published rotation entries average). The price: the arithmetic mean cancels a pure letter prior
only approximately (each shift's probabilities are normalised by a different sum), where the
geometric mean would cancel it exactly.

`CALIBRATE=prior` (PriDe, arXiv 2309.03882) models a letter probability as prior(letter) x
belief(option). Asked under the four shifts, a row shows every option at every letter, so the
geometric mean of each letter's probability over the shifts holds the prior alone: averaged over
a share of the rows (CALIBRATE_SHARE, chosen by a seeded hash of the id), that is the estimate.
It is then divided out of every asked probability vector and renormalised, before anything is
mapped back. Alone, it costs 3 extra passes on that share, and every row (that share too)
answers from its options as given with the prior divided out; with TTA=rotate every row is
rotated already, so the prior comes from all of them at no cost, and dividing it out of each shift
makes the average exact for a pure letter prior and makes each shift's own answer (what
CircularEval counts) unbiased, which averaging alone does not.

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


def rotated_row(row: dict, shift: int) -> dict:
    """The row with option letter i showing the original option (i + shift) mod 4; its answer
    (when it has one) follows its option. Shift 0 is the row itself under a rotation id."""
    out = dict(row, id=rotation_id(row["id"], shift))
    for i, letter in enumerate(LETTERS):
        out[letter] = row[LETTERS[(i + shift) % SHIFTS]]
    if row.get("answer") in LETTERS:
        out["answer"] = LETTERS[(LETTERS.index(row["answer"]) - shift) % SHIFTS]
    return out


def prior_rows(rows: list[dict], share: float, seed: int) -> list[str]:
    """The ids of CALIBRATE_SHARE of the rows (at least one): those first in the order of a
    seeded hash of their ids, so the choice does not depend on the rows' order or the process."""
    import hashlib
    import math

    ranked = sorted((r["id"] for r in rows),
                    key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return ranked[:max(1, math.ceil(share * len(ranked)))] if ranked else []


def rotated_ids(rows: list[dict], tta: str, calibrate: str = "none", share: float = 0.05,
                seed: int = 42) -> frozenset[str]:
    """The ids of the rows asked under their four shifts: every row under TTA=rotate; under
    CALIBRATE=prior alone, the share that estimates the prior; else none."""
    if tta == "rotate":
        return frozenset(r["id"] for r in rows)
    if calibrate == "prior":
        return frozenset(prior_rows(rows, share, seed))
    return frozenset()


def expanded(rows: list[dict], rotated: frozenset[str] = frozenset()) -> list[dict]:
    """The rows to ask: each row of `rotated` under its four shifts, the others as they are."""
    return [shifted for row in rows for shifted in (
        [rotated_row(row, s) for s in range(SHIFTS)] if row["id"] in rotated else [row])]


def original_order(probs: list[float], shift: int) -> list[float]:
    """A shifted row's letter probabilities as probabilities of the original options a-d."""
    return [probs[(j - shift) % SHIFTS] for j in range(SHIFTS)]


def debiased(probs: list[float], prior: list[float] | None) -> list[float]:
    """Letter probabilities with the letter prior divided out, renormalised."""
    if prior is None:
        return list(probs)
    scaled = [p / q for p, q in zip(probs, prior)]
    total = sum(scaled) or 1.0
    return [x / total for x in scaled]


def letter_prior(rows: list[dict], probs: dict[str, list[float]],
                 rotated: frozenset[str]) -> list[float] | None:
    """PriDe's estimate: for each rotated row, the normalised geometric mean over its shifts of
    each letter's probability (the options cancel: each stood at that letter once), averaged
    over the rows. None when no row was rotated."""
    import math

    per_row = []
    for row in rows:
        if row["id"] not in rotated:
            continue
        shifts = [probs[rotation_id(row["id"], s)] for s in range(SHIFTS)]
        logs = [sum(math.log(max(p[j], 1e-12)) for p in shifts) / SHIFTS for j in range(SHIFTS)]
        top = max(logs)
        weights = [math.exp(x - top) for x in logs]
        per_row.append([w / sum(weights) for w in weights])
    if not per_row:
        return None
    mean = [sum(p[j] for p in per_row) / len(per_row) for j in range(SHIFTS)]
    return [x / sum(mean) for x in mean]


def per_shift(rows: list[dict], probs: dict[str, list[float]],
              rotated: frozenset[str] = frozenset(), prior: list[float] | None = None
              ) -> dict[str, list[list[float]]]:
    """Each row's probabilities of its original options, one list per shift asked (the prior,
    when given, divided out of each first)."""
    return {row["id"]: ([original_order(debiased(probs[rotation_id(row["id"], s)], prior), s)
                         for s in range(SHIFTS)] if row["id"] in rotated
                        else [debiased(probs[row["id"]], prior)]) for row in rows}


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
                  rotated: frozenset[str] = frozenset(), prior: list[float] | None = None,
                  average: bool = True) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Each row's answer and option probabilities from what was asked: the mean over the
    shifts asked, the prior divided out first when given (the argmax is the answer). With
    `average` False (CALIBRATE=prior without TTA=rotate) a rotated row answers from its options
    as given, like every other row: its other shifts only estimated the prior. A row asked once
    without a prior keeps the answer given and, in score mode, its probabilities (generate mode
    has none)."""
    if not rotated and prior is None:
        return ({r["id"]: answers[r["id"]] for r in rows},
                {r["id"]: probs[r["id"]] for r in rows if r["id"] in probs})
    shifts = per_shift(rows, probs, rotated, prior)
    mean = combined(shifts if average else {i: ps[:1] for i, ps in shifts.items()})
    return {i: argmax_letter(p) for i, p in mean.items()}, mean


def rotated_for(config, rows: list[dict]) -> frozenset[str]:
    """`rotated_ids` as the run's TTA, CALIBRATE, CALIBRATE_SHARE and SEED say."""
    return rotated_ids(rows, config.tta, config.calibrate, config.calibrate_share, config.seed)


def answers_for(config, rows: list[dict], answers: dict[str, str],
                probs: dict[str, list[float]], rotated: frozenset[str]
                ) -> tuple[dict[str, str], dict[str, list[float]], list[float] | None]:
    """`final_answers` as the run says: under CALIBRATE=prior the prior estimated on the rows
    asked under their shifts (None when there were none) and divided out; the shifts averaged
    under TTA=rotate. Also returns the prior."""
    prior = letter_prior(rows, probs, rotated) if config.calibrate == "prior" else None
    answers, probs = final_answers(rows, answers, probs, rotated, prior,
                                   average=config.tta == "rotate")
    return answers, probs, prior


def original_ids(rows: list[dict], rotated: frozenset[str] = frozenset()) -> dict[str, str]:
    """Asked id -> the row's own id."""
    return {asked["id"]: row["id"] for row in rows for asked in expanded([row], rotated)}


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


def shuffled_options(row: dict, seed: int, epoch: int) -> dict:
    """SHUFFLE_OPTIONS=1: the training row with its options in an order drawn from (seed,
    epoch, row id) alone, its answer following its option. A function of those three, not of
    any generator's state: a resumed run and every rank and dataloader worker draw the same."""
    import hashlib
    import random

    digest = hashlib.sha256(f"{seed}:{epoch}:{row['id']}".encode()).digest()
    order = random.Random(int.from_bytes(digest[:8], "big")).sample(range(SHIFTS), SHIFTS)
    out = dict(row)
    for i, letter in enumerate(LETTERS):
        out[letter] = row[LETTERS[order[i]]]
    if row.get("answer") in LETTERS:
        out["answer"] = LETTERS[order.index(LETTERS.index(row["answer"]))]
    return out
