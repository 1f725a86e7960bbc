#!/usr/bin/env python3
"""make eval: validation accuracy per letter, confusion matrix, test accuracy when a key exists
(FOLDS=K: each fold on its held-out rows, and the folds' averaged test probabilities)."""

from vqa.cli import main
from vqa.evaluate import evaluate
from vqa.fold_runs import evaluate_folds, per_fold

if __name__ == "__main__":
    main("eval", per_fold(evaluate, evaluate_folds))
