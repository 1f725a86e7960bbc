"""`make eval`: accuracy on the fixed validation sample, per letter, with a confusion matrix.

When DATA_DIR holds the embedded default's answer key (test_answers.csv), the test split is scored
too, per question family, beside the same model's accuracy with every image blanked: the gap is
what the model learned from pictures rather than from the question's wording.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from vqa.config import Config
from vqa.data import LETTERS, read_table
from vqa.io import save_figure_atomic, write_json_atomic
from vqa.model import load_for_inference, load_processor
from vqa.predict import accuracy, accuracy_by, predict_rows
from vqa.planning.runplan import stage_plan
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
    key_path = config.data_dir / "test_answers.csv"
    if not key_path.is_file():
        return None
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    key = pd.read_csv(key_path, dtype=str, keep_default_na=False)
    merged = test.merge(key, on="id", how="inner")
    if "family" not in merged:
        merged["family"] = "all"
    return merged.to_dict("records")


def evaluate(config: Config) -> dict:
    adapter = config.artifacts_dir / "lora_adapter"
    processor = load_processor(config)
    batch = stage_plan(config, "eval", processor).pred_batch_size  # before the model is loaded
    _, val_rows, _ = split_rows(config, processor)
    model, source = load_for_inference(config, adapter, processor, mode="score")
    log.info("evaluating %s", source)

    def run(rows, blank=False, desc="eval"):
        return predict_rows(model, processor, rows, config.data_dir, batch_size=batch,
                            mode="score", blank_images=blank, desc=desc,
                            workers=config.loader_workers()).answers

    val_answers = run(val_rows, desc="validation")
    matrix = confusion(val_rows, val_answers)
    report = {
        "model": source,
        "validation": {
            "rows": len(val_rows),
            "accuracy": accuracy(val_rows, val_answers),
            "per_letter": accuracy_by(val_rows, val_answers, "answer"),
            "confusion_matrix": {"rows_true_cols_predicted": LETTERS, "counts": matrix.tolist()},
        },
    }
    plot_confusion(matrix, f"validation ({len(val_rows)} rows)",
                   config.artifacts_dir / "confusion_matrix.png")
    log.info("validation accuracy %.3f on %d rows", report["validation"]["accuracy"], len(val_rows))

    test_rows = test_rows_with_key(config)
    if test_rows:
        answers = run(test_rows, desc="test")
        blank = run(test_rows, blank=True, desc="test, blank images")
        report["test"] = {
            "rows": len(test_rows),
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


def print_test_table(test: dict) -> None:
    print(f"\n{'test accuracy':<22}{'images':>8}{'blank':>8}{'rows':>7}")
    for family, stats in test["per_family"].items():
        blank = test["per_family_blank_images"][family]["accuracy"]
        print(f"  {family:<20}{stats['accuracy']:>8.3f}{blank:>8.3f}{stats['rows']:>7}")
    print(f"  {'overall':<20}{test['accuracy']:>8.3f}{test['blank_image_accuracy']:>8.3f}"
          f"{test['rows']:>7}")
    print(f"  images beat blank images by {test['gain_over_blank_points']:+.1f} points\n")
