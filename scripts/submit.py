#!/usr/bin/env python3
"""make submit: predicts every test row once and writes a validated submission.csv (FOLDS=K:
the folds' probabilities averaged)."""

from vqa.cli import main
from vqa.fold_runs import per_fold, submit_folds
from vqa.submit import submit

if __name__ == "__main__":
    main("submit", per_fold(submit, submit_folds))
