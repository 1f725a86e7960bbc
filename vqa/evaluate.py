"""`make eval`: accuracy on the fixed validation sample, per letter, with a confusion matrix.

When DATA_DIR holds the embedded default's answer key (test_answers.csv), the test split is scored
too, per question family, beside the same model's accuracy with every image blanked: the gap is
what the model learned from pictures rather than from the question's wording.
"""

from __future__ import annotations

import logging

import numpy as np

from vqa.config import Config
from vqa.data import LETTERS, read_answer_key, read_table
from vqa.io import save_figure_atomic, write_json_atomic
from vqa.model import load_for_inference, load_processor
from vqa.options import (answers_for, argmax_letter, circular_accuracy, combined, expanded,
                         letter_shares, per_shift, rotated_for, write_probabilities)
from vqa.predict import accuracy, accuracy_by, predict_rows
from vqa.planning.runplan import planned, stage_plan
from vqa.train import split_rows

log = logging.getLogger("vqa")


def confusion(rows: list[dict], answers: dict[str, str]) -> np.ndarray:
    """Rows = true letter, columns = predicted letter."""
    matrix = np.zeros((4, 4), dtype=int)
    for row in rows:
        matrix[LETTERS.index(row["answer"]), LETTERS.index(answers[row["id"]])] += 1
    return matrix


def plot_confusion(matrix: np.ndarray, title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(4), yticks=range(4), xticklabels=LETTERS, yticklabels=LETTERS,
           xlabel="predicted", ylabel="true", title=title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    save_figure_atomic(fig, path)
    plt.close(fig)


def test_rows_with_key(config: Config) -> list[dict] | None:
    """test.csv rows joined with test_answers.csv (id, answer[, family]) when the key exists."""
    key = read_answer_key(config.data_dir)
    if key is None:
        return None
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    merged = test.merge(key, on="id", how="inner")
    if "family" not in merged:
        merged["family"] = "all"
    return merged.to_dict("records")


def evaluate(config: Config) -> dict:
    """Validation (and, with a key, test) accuracy of the adapter in ARTIFACTS_DIR (FOLDS=K:
    vqa/fold_runs.py runs this for each fold)."""
    adapter = config.artifacts_dir / "lora_adapter"
    processor = load_processor(config)
    plan = stage_plan(config, "eval", processor)  # before the model is loaded
    config, processor = planned(config, plan, processor)
    batch = plan.pred_batch_size
    _, val_rows, _ = split_rows(config, processor)
    model, source = load_for_inference(config, adapter, processor, mode="score")
    log.info("evaluating %s", source)

    def run(rows, blank=False, desc="eval", options=True):
        """The rows' answers and option probabilities, and for the report each shift's
        probabilities as asked and with the prior divided out, and the prior. `options`: ask
        as TTA and CALIBRATE say (the blank-image baseline asks each row once)."""
        rotated = rotated_for(config, rows) if options else frozenset()
        result = predict_rows(model, processor, expanded(rows, rotated), config.data_dir,
                              batch_size=batch, mode="score", blank_images=blank, desc=desc,
                              workers=config.loader_workers())
        probs = result.letter_probs
        # the blank-image baseline rotates nothing: no prior to estimate
        answers, mean, prior = answers_for(config, rows, result.answers, probs, rotated)
        return answers, mean, {"raw": per_shift(rows, probs, rotated),
                               "calibrated": per_shift(rows, probs, rotated, prior),
                               "prior": prior, "rotated": len(rotated)}

    val_answers, val_probs, val_shifts = run(val_rows, desc="validation")
    matrix = confusion(val_rows, val_answers)
    report = {
        "model": source,
        "tta": config.tta,
        "calibrate": config.calibrate,
        "validation": {
            "rows": len(val_rows),
            "accuracy": accuracy(val_rows, val_answers),
            "per_letter": accuracy_by(val_rows, val_answers, "answer"),
            "confusion_matrix": {"rows_true_cols_predicted": LETTERS, "counts": matrix.tolist()},
            **position_bias(val_rows, val_answers, val_shifts, config.tta),
        },
    }
    write_probabilities(config.artifacts_dir / "validation_probabilities.csv",
                        [r["id"] for r in val_rows], val_answers, val_probs,
                        {r["id"]: r["answer"] for r in val_rows})
    plot_confusion(matrix, f"validation ({len(val_rows)} rows)",
                   config.artifacts_dir / "confusion_matrix.png")
    plot_letter_shares(report["validation"], config.artifacts_dir / "letter_bias.png")
    v = report["validation"]
    log.info("validation accuracy %.3f on %d rows (TTA=%s, CALIBRATE=%s)%s", v["accuracy"],
             len(val_rows), config.tta, config.calibrate, describe_options(v))

    test_rows = test_rows_with_key(config)
    if test_rows:
        answers, test_probs, shifts = run(test_rows, desc="test")
        write_probabilities(config.artifacts_dir / "test_probabilities.csv",
                            [r["id"] for r in test_rows], answers, test_probs,
                            {r["id"]: r["answer"] for r in test_rows})
        blank = run(test_rows, blank=True, desc="test, blank images", options=False)[0]
        report["test"] = {
            "rows": len(test_rows),
            **position_bias(test_rows, answers, shifts, config.tta),
            "accuracy": accuracy(test_rows, answers),
            "blank_image_accuracy": accuracy(test_rows, blank),
            "per_family": accuracy_by(test_rows, answers, "family"),
            "per_family_blank_images": accuracy_by(test_rows, blank, "family"),
            "per_letter": accuracy_by(test_rows, answers, "answer"),
        }
        t = report["test"]
        t["gain_over_blank_points"] = round(100 * (t["accuracy"] - t["blank_image_accuracy"]), 1)
        print_test_table(t)
    write_json_atomic(config.artifacts_dir / "eval.json", report)
    return report


def position_bias(rows: list[dict], answers: dict[str, str], shifts: dict, tta: str) -> dict:
    """The predicted letters' shares against the true ones. Under TTA=rotate or CALIBRATE=prior
    also the plain accuracy (each row's options as given, nothing divided out), under rotate the
    rotated and CircularEval accuracy of the probabilities as asked, and under the prior the
    estimated prior with the accuracies once it is divided out."""
    out = {"predicted_letters": letter_shares([answers[r["id"]] for r in rows]),
           "true_letters": letter_shares([r["answer"] for r in rows])}
    raw, prior = shifts["raw"], shifts["prior"]
    if tta == "none" and prior is None:
        return out
    plain = {r["id"]: argmax_letter(raw[r["id"]][0]) for r in rows}
    out.update(plain_accuracy=accuracy(rows, plain),
               plain_predicted_letters=letter_shares(list(plain.values())))
    if tta == "rotate":
        rotated = {i: argmax_letter(p) for i, p in combined(raw).items()}
        out.update(rotated_accuracy=accuracy(rows, rotated),
                   circular_accuracy=circular_accuracy(rows, raw))
    if prior is not None:
        cal = shifts["calibrated"]
        calibrated = {"prior": dict(zip(LETTERS, (round(p, 4) for p in prior))),
                      "estimated_on_rows": shifts["rotated"],
                      "plain_accuracy": accuracy(rows, {r["id"]: argmax_letter(cal[r["id"]][0])
                                                        for r in rows}),
                      "accuracy": accuracy(rows, answers)}
        if tta == "rotate":
            calibrated["circular_accuracy"] = circular_accuracy(rows, cal)
        out["calibrated"] = calibrated
    return out


def plot_letter_shares(stats: dict, path) -> None:
    """Bars of how often each letter is predicted against how often it is right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("true", stats["true_letters"]), ("predicted", stats["predicted_letters"])]
    if "plain_predicted_letters" in stats:
        series.insert(1, ("predicted, options as given", stats["plain_predicted_letters"]))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    width = 0.8 / len(series)
    for k, (name, shares) in enumerate(series):
        ax.bar([i + k * width for i in range(4)], [shares[x] for x in LETTERS], width,
               label=name)
    ax.set(xticks=[i + 0.4 - width / 2 for i in range(4)], xticklabels=LETTERS,
           ylabel="share of rows", title="letter bias (validation)")
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)
    plt.close(fig)


def print_test_table(test: dict) -> None:
    print(f"\n{'test accuracy':<22}{'images':>8}{'blank':>8}{'rows':>7}")
    for family, stats in test["per_family"].items():
        blank = test["per_family_blank_images"][family]["accuracy"]
        print(f"  {family:<20}{stats['accuracy']:>8.3f}{blank:>8.3f}{stats['rows']:>7}")
    print(f"  {'overall':<20}{test['accuracy']:>8.3f}{test['blank_image_accuracy']:>8.3f}"
          f"{test['rows']:>7}")
    print(f"  images beat blank images by {test['gain_over_blank_points']:+.1f} points")
    if "plain_accuracy" in test:
        print(f"  {describe_options(test).lstrip('; ')}")
    print()


def describe_options(stats: dict) -> str:
    """'; plain ..., rotated ..., circular ...; prior ... -> ...' for what was measured."""
    if "plain_accuracy" not in stats:
        return ""
    out = f"; options as given {stats['plain_accuracy']:.3f}"
    if "rotated_accuracy" in stats:
        out += (f", rotated {stats['rotated_accuracy']:.3f}, circular "
                f"{stats['circular_accuracy']:.3f}")
    cal = stats.get("calibrated")
    if cal:
        prior = " ".join(f"{x}={p:.2f}" for x, p in cal["prior"].items())
        out += (f"; letter prior ({prior}, {cal['estimated_on_rows']} rows) divided out: "
                f"as given {cal['plain_accuracy']:.3f}")
        if "circular_accuracy" in cal:
            out += f", circular {cal['circular_accuracy']:.3f}"
        out += f", final {cal['accuracy']:.3f}"
    return out
