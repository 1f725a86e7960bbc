"""`make ensemble RUNS=dir1,dir2,...`: several runs' option probabilities blended into one
validated submission.

Each run folder holds the test rows' probabilities (probabilities.csv, from `make submit` with
INFER_MODE=score) and, when it has one, probabilities of held-out rows with their true letter:
oof_probabilities.csv (`make train FOLDS=K`, every training row out of fold) or else
validation_probabilities.csv (`make eval`). The blend is the weighted arithmetic mean of the
runs' probabilities, renormalised to sum 1, and its argmax is the answer. Arithmetic, not
geometric, for the reason vqa/options.py averages option shifts: one run that puts near-zero
mass on the right option would veto it in a product, while a mean lets the others outvote it.

The weights are chosen on the held-out rows that every run shares (their true letters must
agree): the highest accuracy of the blend, ties broken by the higher mean log-probability of the
true option, then by closeness to equal weights. Up to 4 runs the whole simplex is searched on a
0.05 grid; more runs climb from equal weights by moving 0.05 of weight from one run to another
while that gains. Without a held-out file in every run, or with fewer than MIN_SHARED_ROWS
shared rows, the weights are equal and the report says why.

Weights chosen on the same rows they are scored on overstate the blend's accuracy: the search
fits those rows' noise. ensemble_report.json therefore also gives an honest estimate, a 2-fold
cross-validated blend accuracy: the shared rows split in halves by a permutation seeded with
SEED, weights chosen on one half and scored on the other, both ways, averaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vqa.config import Config
from vqa.data import LETTERS, read_answer_key, read_table
from vqa.blending import (GRID_MAX_RUNS, WEIGHT_STEP, accuracy, blend,
                          cross_validated_accuracy, search_weights, weight_score)
from vqa.io import save_figure_atomic, write_json_atomic
from vqa.options import argmax_letter, write_probabilities
from vqa.submission import SubmissionError, submission_order, write_submission

log = logging.getLogger("vqa")

PROBABILITY_COLUMNS = [f"p_{x}" for x in LETTERS]
HELD_OUT_FILES = ("oof_probabilities.csv", "validation_probabilities.csv")  # first found wins
MIN_SHARED_ROWS = 20
SUM_TOLERANCE = 1e-3


@dataclass
class RunProbabilities:
    """One run's probabilities: the test rows', and its held-out rows' with their truth."""

    folder: Path
    test: pd.DataFrame  # index id, columns p_a..p_d
    held_out_source: str | None = None  # the held-out file's name, None when there is none
    held_out: pd.DataFrame | None = None  # index id, columns p_a..p_d and true
    no_held_out_reason: str | None = None


def run_folders(runs: str) -> list[Path]:
    """RUNS as folders; at least one, none twice."""
    folders = [Path(x.strip()) for x in runs.split(",") if x.strip()]
    if not folders:
        raise SubmissionError("RUNS is empty: name the runs' artifact folders, e.g. "
                              "RUNS=artifacts/run1,artifacts/run2")
    seen: dict[Path, Path] = {}
    for folder in folders:
        if folder.resolve() in seen:
            raise SubmissionError(f"RUNS names {seen[folder.resolve()]} twice")
        seen[folder.resolve()] = folder
    return folders


def check_output_folder(artifacts_dir: Path, folders: list[Path]) -> None:
    """The blend must not overwrite a run's own submission.csv and probabilities.csv."""
    for folder in folders:
        if Path(artifacts_dir).resolve() == folder.resolve():
            raise SubmissionError(f"ARTIFACTS_DIR={artifacts_dir} is one of RUNS ({folder}): "
                                  f"the ensemble would overwrite that run's submission; "
                                  f"choose another ARTIFACTS_DIR")


def check_runs(config: Config) -> None:
    """RUNS named and ARTIFACTS_DIR not among them: checked before the stage writes anything
    (its config.json included) into ARTIFACTS_DIR."""
    check_output_folder(config.artifacts_dir, run_folders(config.runs))


def read_probabilities(path: Path, *, with_truth: bool) -> pd.DataFrame | None:
    """A probabilities CSV indexed by id (p_a..p_d as floats, and `true` when `with_truth`);
    None when it holds no probabilities at all (INFER_MODE=generate). Raises SubmissionError
    naming the file on a missing column, a duplicated id, a partly empty or non-normalised row."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SubmissionError(f"{path}: cannot parse CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    needed = ["id", *PROBABILITY_COLUMNS, *(["true"] if with_truth else [])]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise SubmissionError(f"{path}: no rows")
    frame["id"] = frame["id"].str.strip()
    duplicated = frame["id"][frame["id"].duplicated()]
    if not duplicated.empty:
        raise SubmissionError(f"{path}: duplicate id {duplicated.iloc[0]!r} "
                              f"({duplicated.size} duplicate(s) in all)")
    cells = frame[PROBABILITY_COLUMNS].apply(lambda c: c.str.strip())
    if (cells == "").all().all():
        return None
    empty = frame["id"][(cells == "").any(axis=1)]
    if not empty.empty:
        raise SubmissionError(f"{path}: id {empty.iloc[0]!r} has no probabilities "
                              f"({empty.size} such row(s))")
    try:
        probs = cells.astype(float)
    except ValueError as exc:
        raise SubmissionError(f"{path}: a probability is not a number ({exc})") from None
    sums = probs.sum(axis=1)
    bad = frame["id"][((sums - 1).abs() > SUM_TOLERANCE) | (probs < 0).any(axis=1)]
    if not bad.empty:
        first = bad.index[0]
        raise SubmissionError(f"{path}: id {bad.iloc[0]!r}: probabilities sum to "
                              f"{sums[first]:.6f}, not 1 ({bad.size} such row(s))")
    probs.index = frame["id"]
    if with_truth:
        truth = frame["true"].str.strip().str.lower()
        wrong = frame["id"][~truth.isin(LETTERS)]
        if not wrong.empty:
            raise SubmissionError(f"{path}: id {wrong.iloc[0]!r}: true letter "
                                  f"{frame.loc[wrong.index[0], 'true']!r} is not one of a-d")
        probs["true"] = truth.to_numpy()
    return probs


def load_run(folder: Path) -> RunProbabilities:
    """A run's test probabilities (required) and its first held-out file (optional)."""
    if not folder.is_dir():
        raise SubmissionError(f"run {folder}: no such folder")
    test_path = folder / "probabilities.csv"
    if not test_path.is_file():
        raise SubmissionError(f"run {folder}: no probabilities.csv (run `make submit "
                              f"ARTIFACTS_DIR={folder}` first)")
    test = read_probabilities(test_path, with_truth=False)
    if test is None:
        raise SubmissionError(f"run {folder}: probabilities.csv holds letters only "
                              f"(INFER_MODE=generate); an ensemble needs INFER_MODE=score")
    run = RunProbabilities(folder, test)
    source = next((name for name in HELD_OUT_FILES if (folder / name).is_file()), None)
    if source is None:
        run.no_held_out_reason = f"run {folder} has no {' or '.join(HELD_OUT_FILES)}"
        return run
    held_out = read_probabilities(folder / source, with_truth=True)
    if held_out is None:
        run.no_held_out_reason = (f"run {folder}: {source} holds letters only "
                                  f"(INFER_MODE=generate)")
        return run
    run.held_out_source, run.held_out = source, held_out
    return run


def first_difference(left: list[str], right: list[str], left_name: str, right_name: str) -> str:
    """The first id (sorted) that only one of two id lists has, and whose list that is."""
    only_left = sorted(set(left) - set(right))
    only_right = sorted(set(right) - set(left))
    if only_left and (not only_right or only_left[0] <= only_right[0]):
        return f"{only_left[0]!r} only in {left_name}"
    return f"{only_right[0]!r} only in {right_name}"


def check_test_ids(runs: list[RunProbabilities], order: list[str], test_csv: Path) -> None:
    """Every run answered the same test ids, and they are test.csv's."""
    first = runs[0]
    expected = list(first.test.index)
    for run in runs[1:]:
        ids = list(run.test.index)
        if set(ids) != set(expected):
            raise SubmissionError(
                f"runs {first.folder} and {run.folder} have different test ids ({len(expected)} "
                f"vs {len(ids)} ids; "
                f"{first_difference(expected, ids, str(first.folder), str(run.folder))})")
    if set(expected) != set(order):
        others = " (and the other runs)" if len(runs) > 1 else ""
        raise SubmissionError(
            f"run {first.folder}{others} has other test ids than {test_csv} ({len(expected)} "
            f"vs {len(order)} ids; "
            f"{first_difference(expected, order, str(first.folder), test_csv.name)})")


def shared_held_out(runs: list[RunProbabilities]
                    ) -> tuple[list[str], np.ndarray, np.ndarray, str | None]:
    """The held-out ids every run has (in the first run's order), their true letters as
    indices, the runs' probabilities on them (runs x rows x 4), and why the weights must be
    equal (None when they can be searched). Refuses runs that disagree on a true letter."""
    empty = np.zeros((len(runs), 0, len(LETTERS)))
    reasons = [run.no_held_out_reason for run in runs if run.held_out is None]
    if reasons:
        return [], np.zeros(0, dtype=int), empty, reasons[0]
    common = set(runs[0].held_out.index)
    for run in runs[1:]:
        common &= set(run.held_out.index)
    ids = [i for i in runs[0].held_out.index if i in common]
    truth = runs[0].held_out.loc[ids, "true"]
    for run in runs[1:]:
        theirs = run.held_out.loc[ids, "true"]
        differ = truth.index[truth.to_numpy() != theirs.to_numpy()]
        if len(differ):
            i = differ[0]
            raise SubmissionError(
                f"runs {runs[0].folder} and {run.folder} disagree on the true letter of "
                f"held-out id {i!r} ({truth[i]} vs {theirs[i]}; {len(differ)} such row(s))")
    probs = np.stack([run.held_out.loc[ids, PROBABILITY_COLUMNS].to_numpy(float)
                      for run in runs]) if ids else empty
    labels = np.array([LETTERS.index(x) for x in truth], dtype=int)
    reason = None
    if len(ids) < MIN_SHARED_ROWS:
        reason = (f"only {len(ids)} held-out row(s) shared by every run (fewer than "
                  f"{MIN_SHARED_ROWS})")
    return ids, labels, probs, reason


def best_single(runs: list[RunProbabilities], probs: np.ndarray, labels: np.ndarray
                ) -> int | None:
    """The run most accurate on the shared rows (then the higher mean log-probability of the
    true option, then the first listed); None without shared rows."""
    if not len(labels):
        return None
    return max(range(len(runs)), key=lambda k: (*weight_score(probs[k:k + 1], labels,
                                                              np.ones(1))[:2], -k))


def plot_accuracies(names: list[str], singles: list[float | None], blends: dict[str, float | None],
                    shared_rows: int, path: Path) -> None:
    """Bars: each run's accuracy on the shared held-out rows, then the blend's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(n, a, "tab:gray") for n, a in zip(names, singles)]
    bars += [(f"blend ({k})", a, "tab:blue") for k, a in blends.items()]
    bars = [b for b in bars if b[1] is not None]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(bars) + 1.5), 3.6))
    if bars:
        ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        for x, (_, value, _) in enumerate(bars):
            ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right",
                      fontsize=8)
    else:
        ax.text(0.5, 0.5, "no held-out rows shared by every run", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(ylim=(0, 1.05), ylabel="accuracy",
           title=f"ensemble: accuracy on {shared_rows} shared held-out rows")
    save_figure_atomic(fig, path)
    plt.close(fig)


def describe_weights(names: list[str], weights: np.ndarray) -> str:
    return " ".join(f"{n}={w:.2f}" for n, w in zip(names, weights))


def test_key_accuracy(data_dir: Path, order: list[str], single_answers: list[list[str]],
                      answers: dict[str, str], names: list[str]) -> dict | None:
    """Each run's and the blend's test accuracy when DATA_DIR has an answer key
    (test_answers.csv: the embedded default has one; a competition's data has none)."""
    key = read_answer_key(data_dir)
    if key is None:
        return None
    key = key.set_index("id")["answer"]
    keyed = [n for n, i in enumerate(order) if i in key.index]
    if not keyed:
        return None

    def score(letters):
        return round(sum(letters[n] == key[order[n]] for n in keyed) / len(keyed), 4)

    return {"rows": len(keyed), "blend": score([answers[i] for i in order]),
            "runs": {name: score(own) for name, own in zip(names, single_answers)}}


def ensemble(config: Config) -> dict:
    """Blends RUNS' test probabilities with weights chosen on their shared held-out rows and
    writes submission.csv, probabilities.csv, ensemble_report.json and ensemble.png."""
    folders = run_folders(config.runs)
    check_output_folder(config.artifacts_dir, folders)
    test_csv = config.data_dir / "test.csv"
    test = read_table(test_csv, with_answer=False)
    order = submission_order(test, config.data_dir)
    runs = [load_run(folder) for folder in folders]
    check_test_ids(runs, order, test_csv)
    names = [str(folder) for folder in folders]

    ids, labels, held_probs, reason = shared_held_out(runs)
    log.info("ensemble of %d run(s): %d held-out row(s) shared by every run", len(runs),
             len(ids))
    if reason is None:
        weights = search_weights(held_probs, labels)
        method = (f"grid on the simplex, step {WEIGHT_STEP}" if len(runs) <= GRID_MAX_RUNS
                  else f"coordinate ascent from equal weights, step {WEIGHT_STEP}")
        searched_accuracy = accuracy(blend(held_probs, weights), labels)
        cv_accuracy = cross_validated_accuracy(held_probs, labels, config.seed)
        log.info("weights (%s): %s; blend accuracy %.4f on the rows they were chosen on, "
                 "%.4f cross-validated", method, describe_weights(names, weights),
                 searched_accuracy, cv_accuracy)
    else:
        weights = np.full(len(runs), 1 / len(runs))
        method, searched_accuracy, cv_accuracy = "equal", None, None
        log.warning("equal weights: %s", reason)
    equal_accuracy = accuracy(blend(held_probs, np.full(len(runs), 1 / len(runs))), labels)
    singles = [accuracy(held_probs[k], labels) for k in range(len(runs))]

    test_probs = np.stack([run.test.loc[order, PROBABILITY_COLUMNS].to_numpy(float)
                           for run in runs])
    mixed = blend(test_probs, weights)
    probs = {i: [float(p) for p in row] for i, row in zip(order, mixed)}
    answers = {i: argmax_letter(p) for i, p in probs.items()}
    single_answers = [[argmax_letter(list(row)) for row in run_probs] for run_probs in test_probs]
    changed = [sum(a != answers[i] for i, a in zip(order, own)) for own in single_answers]
    best = best_single(runs, held_probs, labels)

    out = config.artifacts_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "submission.csv"
    frame = write_submission(path, answers, order)
    write_probabilities(out / "probabilities.csv", order, answers, probs)
    blends = {"equal": equal_accuracy, "searched": searched_accuracy,
              "cross-validated": cv_accuracy}
    plot_accuracies(names, singles, blends, len(ids), out / "ensemble.png")
    report = {
        "runs": [{"folder": name, "held_out_source": run.held_out_source,
                  "held_out_rows": 0 if run.held_out is None else len(run.held_out),
                  "shared_accuracy": single, "weight": round(float(w), 6),
                  "test_answers_changed_by_blend": n}
                 for name, run, single, w, n in zip(names, runs, singles, weights, changed)],
        "shared_rows": len(ids),
        "weights": {name: round(float(w), 6) for name, w in zip(names, weights)},
        "weight_method": method,
        "equal_weights_reason": reason,
        "blend_accuracy_searched": searched_accuracy,
        "blend_accuracy_equal": equal_accuracy,
        "blend_accuracy_cross_validated": cv_accuracy,
        "test_rows": len(frame),
        "answer_counts": frame["answer"].value_counts().sort_index().to_dict(),
        "best_single_run": None if best is None else names[best],
        "answers_changed_vs_best_single": None if best is None else changed[best],
        "submission": str(path),
        "probabilities": str(out / "probabilities.csv"),
        "plot": str(out / "ensemble.png"),
    }
    keyed = test_key_accuracy(config.data_dir, order, single_answers, answers, names)
    if keyed:
        report["test_key"] = keyed
        log.info("test accuracy (DATA_DIR/test_answers.csv): blend %.4f; %s", keyed["blend"],
                 ", ".join(f"{n} {a:.4f}" for n, a in keyed["runs"].items()))
    write_json_atomic(out / "ensemble_report.json", report)
    chosen = (f"chosen on {len(ids)} shared held-out rows" if reason is None
              else f"equal: {reason}")
    print(f"vqa ensemble: wrote {path} ({len(frame)} rows, every test id once, answers in a-d), "
          f"weights {describe_weights(names, weights)} ({chosen})")
    return report
