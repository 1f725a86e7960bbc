"""FOLDS=K runs: each fold trained, scored out of fold, evaluated and predicting the test rows
in its own folder, and the folds' results brought together (vqa/folds.py assigns the folds).

Layout: ARTIFACTS_DIR holds folds.json and fold-k/ for each fold, a complete run folder of its
own (plan, checkpoints, lora_adapter/, train_metrics.json, oof_probabilities.csv, and after
`make submit` its journal, submission.csv and probabilities.csv). Each fold early-stops on a
fixed sample of its held-out fold and resumes on its own; a finished fold is not trained or
predicted again (a fold's out-of-fold scoring, killed, is redone whole). ARTIFACTS_DIR then gets
the merged oof_probabilities.csv (every usable training row once, with its fold),
folds_report.json with each fold's out-of-fold accuracy and folds.png; `make submit` averages
the folds' test probabilities (the arithmetic mean, as vqa/options.py explains) into
submission.csv and probabilities.csv; `make eval` evaluates each fold on its held-out rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from vqa import distributed
from vqa.config import Config
from vqa.data import LETTERS, DataError, read_table
from vqa.evaluate import evaluate, test_rows_with_key
from vqa.folds import FOLDS_FILE, fold_assignment, fold_config
from vqa.io import file_fingerprint, save_figure_atomic, write_json_atomic, write_text_atomic
from vqa.submit import submit
from vqa.train import split_rows, train

log = logging.getLogger("vqa")

OOF_FILE = "oof_probabilities.csv"
PROBABILITY_COLUMNS = [f"p_{x}" for x in LETTERS]


def per_fold(stage: Callable[[Config], dict], over_folds: Callable[[Config], dict]
             ) -> Callable[[Config], dict]:
    """What a script runs: `over_folds` under FOLDS=K (FOLD unset: every fold), else `stage`
    (one run, or fold k's own with FOLD=k)."""
    def run(config: Config) -> dict:
        if config.folds and config.fold is None:
            return over_folds(config)
        return stage(config)
    return run


def share_plan(root: Path, fold_dir: Path) -> None:
    """The run's plan.json into a fold's folder: the folds read one plan (same inputs)."""
    from vqa.planning.runplan import PLAN_FILE

    fold_dir.mkdir(parents=True, exist_ok=True)
    if (root / PLAN_FILE).is_file() and distributed.world().is_main:
        shutil.copyfile(root / PLAN_FILE, fold_dir / PLAN_FILE)
    distributed.barrier()


def out_of_fold(config: Config, processor) -> pd.DataFrame:
    """Fold `config.fold`'s held-out rows scored by its adapter (as TTA and CALIBRATE say) into
    its oof_probabilities.csv, with the true letter and the fold; read back instead when the
    adapter and those settings are unchanged."""
    from vqa.model import load_for_inference
    from vqa.options import answers_for, expanded, rotated_for, write_probabilities
    from vqa.planning.runplan import planned, stage_plan
    from vqa.predict import predict_rows

    adapter = config.artifacts_dir / "lora_adapter"
    path, stamp = config.artifacts_dir / OOF_FILE, config.artifacts_dir / "oof_signature.json"
    signature = {"adapter": file_fingerprint(adapter / "adapter_model.safetensors"),
                 "tta": config.tta, "calibrate": config.calibrate,
                 "calibrate_share": config.calibrate_share}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == signature:
        return pd.read_csv(path, dtype={"id": str, "true": str, "answer": str})
    plan = stage_plan(config, "eval", processor)
    config, processor = planned(config, plan, processor)
    _, held, _ = split_rows(config, processor, whole_fold=True)
    batch = plan.pred_batch_size
    model, _ = load_for_inference(config, adapter, processor, mode="score")
    rotated = rotated_for(config, held)
    result = predict_rows(model, processor, expanded(held, rotated), config.data_dir,
                          batch_size=batch, mode="score", desc=f"fold {config.fold}: out of fold",
                          workers=config.loader_workers())
    answers, probs, _ = answers_for(config, held, result.answers, result.letter_probs, rotated)
    frame = write_probabilities(path, [r["id"] for r in held], answers, probs,
                                {r["id"]: r["answer"] for r in held}).assign(fold=config.fold)
    write_text_atomic(path, frame.to_csv(index=False))
    write_json_atomic(stamp, signature)
    return frame


def train_folds(config: Config) -> dict:
    """`make train FOLDS=K`: each fold trained (or resumed, or found finished) and scored out of
    fold; the merged out-of-fold probabilities and the folds' report written to ARTIFACTS_DIR."""
    from vqa.model import load_processor
    from vqa.oom import free_memory
    from vqa.planning.runplan import stage_plan

    here = distributed.init()
    root = config.artifacts_dir
    processor = load_processor(config)
    assignment = fold_assignment(config)
    if here.is_main:
        stage_plan(config, "train", processor)  # once: every fold reads this plan
    distributed.barrier()
    folds, frames = [], []
    for k in range(config.folds):
        fold = fold_config(config, k)
        share_plan(root, fold.artifacts_dir)
        log.info("fold %d of %d: %d rows held out, the rest trains (%s)", k + 1, config.folds,
                 sum(v == k for v in assignment.values()), fold.artifacts_dir)
        metrics = train(fold)
        free_memory()  # the fold's training model, before its scoring model loads
        if here.is_main:
            frame = out_of_fold(fold, processor)
            frames.append(frame)
            folds.append({"fold": k, "folder": str(fold.artifacts_dir),
                          "train_rows": metrics.get("train_rows"),
                          "held_out_rows": len(frame),
                          "best_val_accuracy": metrics.get("best_val_accuracy"),
                          "epochs_run": metrics.get("epochs_run"),
                          "oof_accuracy": round(float((frame["answer"] == frame["true"]).mean()),
                                                4)})
        distributed.barrier()
    if not here.is_main:
        return {}
    merged = pd.concat(frames, ignore_index=True)
    write_text_atomic(root / OOF_FILE, merged.to_csv(index=False))
    report = {"folds": config.folds, "per_fold": folds, "oof_rows": len(merged),
              "oof_accuracy": round(float((merged["answer"] == merged["true"]).mean()), 4),
              "grouping": json.loads((root / FOLDS_FILE).read_text())["summary"],
              "tta": config.tta, "calibrate": config.calibrate}
    write_json_atomic(root / "folds_report.json", report)
    plot_folds(report, root / "folds.png")
    print(f"vqa train: {config.folds} folds trained; out-of-fold accuracy "
          f"{report['oof_accuracy']:.3f} on {len(merged)} rows ("
          + ", ".join(f"fold {f['fold']} {f['oof_accuracy']:.3f}" for f in folds)
          + f"); {root / OOF_FILE}")
    return report


def plot_folds(report: dict, path: Path) -> None:
    """Each fold's out-of-fold accuracy and its early-stopping sample's, with the pooled one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = report["per_fold"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = range(len(folds))
    ax.bar([x - 0.2 for x in xs], [f["oof_accuracy"] for f in folds], 0.4,
           label="out of fold (all held-out rows)")
    ax.bar([x + 0.2 for x in xs], [f["best_val_accuracy"] or 0 for f in folds], 0.4,
           label="early-stopping sample (best epoch)")
    ax.axhline(report["oof_accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"pooled out of fold {report['oof_accuracy']:.3f}")
    ax.axhline(0.25, color="gray", linestyle=":", linewidth=1)
    ax.set(xticks=list(xs), xticklabels=[f"fold {f['fold']}" for f in folds],
           ylabel="accuracy", ylim=(0, 1), title=f"{report['folds']} folds grouped by image")
    ax.legend(fontsize=7, loc="lower right")
    save_figure_atomic(fig, path)
    plt.close(fig)


def submit_folds(config: Config) -> dict:
    """`make submit FOLDS=K`: each fold's adapter predicts the test rows into its own folder
    (journalled and resumable like any submit), then their probabilities are averaged."""
    from vqa.options import argmax_letter, write_probabilities
    from vqa.submission import submission_order, write_submission

    if config.infer_mode != "score":
        raise DataError("FOLDS averages the folds' option probabilities: make submit needs "
                        "INFER_MODE=score")
    here = distributed.init()
    root = config.artifacts_dir
    missing = [k for k in range(config.folds)
               if not (root / f"fold-{k}" / "lora_adapter" / "adapter_config.json").is_file()]
    if missing:
        raise DataError(f"{root / f'fold-{missing[0]}'}: no lora_adapter/ for fold "
                        f"{missing[0]} of FOLDS={config.folds}: run `make train "
                        f"FOLDS={config.folds}` first")
    reports = []
    for k in range(config.folds):
        fold = fold_config(config, k)
        share_plan(root, fold.artifacts_dir)
        log.info("fold %d of %d: predicting the test rows with its adapter", k + 1, config.folds)
        reports.append(submit(fold))
    if not here.is_main:
        return {}
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    order = submission_order(test, config.data_dir)
    frames = [pd.read_csv(root / f"fold-{k}" / "probabilities.csv", dtype={"id": str})
              .set_index("id") for k in range(config.folds)]
    mean = sum(f.loc[order, PROBABILITY_COLUMNS] for f in frames) / len(frames)
    probs = {i: list(map(float, mean.loc[i])) for i in order}
    answers = {i: argmax_letter(p) for i, p in probs.items()}
    path = root / "submission.csv"
    frame = write_submission(path, answers, order)
    write_probabilities(root / "probabilities.csv", order, answers, probs)
    agreement = [round(float((f.loc[order, "answer"] == frame.set_index("id")["answer"]).mean()),
                       4) for f in frames]
    report = {"folds": config.folds, "rows": len(frame), "tta": config.tta,
              "calibrate": config.calibrate,
              "answer_counts": frame["answer"].value_counts().sort_index().to_dict(),
              "per_fold": [{"fold": k, "folder": str(root / f"fold-{k}"),
                            "agreement_with_average": agreement[k],
                            "resumed_rows": reports[k].get("resumed_rows"),
                            "predict_seconds": reports[k].get("predict_seconds")}
                           for k in range(config.folds)],
              "submission": str(path), "probabilities": str(root / "probabilities.csv")}
    write_json_atomic(root / "submit_report.json", report)
    print(f"vqa submit: wrote {path} ({len(frame)} rows, every test id once, answers in a-d) "
          f"and probabilities.csv: {config.folds} folds' probabilities averaged")
    return report


def evaluate_folds(config: Config) -> dict:
    """`make eval FOLDS=K`: each fold's adapter on its own held-out validation sample (and on
    the test key when there is one), then the folds' test probabilities averaged, as make
    submit averages them."""
    from vqa.options import argmax_letter
    from vqa.predict import accuracy

    root = config.artifacts_dir
    per_fold = []
    for k in range(config.folds):
        fold = fold_config(config, k)
        share_plan(root, fold.artifacts_dir)
        per_fold.append(evaluate(fold))
    report = {"folds": config.folds, "tta": config.tta, "calibrate": config.calibrate,
              "per_fold": [{"fold": k, "validation_accuracy": r["validation"]["accuracy"],
                            "validation_rows": r["validation"]["rows"],
                            "test_accuracy": r.get("test", {}).get("accuracy")}
                           for k, r in enumerate(per_fold)]}
    if (root / "folds_report.json").is_file():
        trained = json.loads((root / "folds_report.json").read_text())
        report["oof_accuracy"], report["oof_rows"] = trained["oof_accuracy"], trained["oof_rows"]
    rows = test_rows_with_key(config)
    if rows:
        frames = [pd.read_csv(root / f"fold-{k}" / "test_probabilities.csv", dtype={"id": str})
                  .set_index("id") for k in range(config.folds)]
        ids = [r["id"] for r in rows]
        mean = sum(f.loc[ids, PROBABILITY_COLUMNS] for f in frames) / len(frames)
        answers = {i: argmax_letter(list(mean.loc[i])) for i in ids}
        report["test"] = {"rows": len(rows), "fold_average_accuracy": accuracy(rows, answers),
                          "blank_image_accuracy_fold_0":
                              per_fold[0]["test"]["blank_image_accuracy"]}
        print(f"test accuracy of the {config.folds} folds' averaged probabilities: "
              f"{report['test']['fold_average_accuracy']:.3f} (each fold: "
              + ", ".join(f"{r['test']['accuracy']:.3f}" for r in per_fold) + ")")
    write_json_atomic(root / "eval.json", report)
    return report
