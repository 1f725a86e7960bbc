#!/usr/bin/env python3
"""make train: LoRA fine-tuning (QLoRA on a GPU); writes lora_adapter/ and train_metrics.json
(FOLDS=K: one adapter per fold and the out-of-fold probabilities)."""

from vqa.cli import main
from vqa.fold_runs import per_fold, train_folds
from vqa.train import train

if __name__ == "__main__":
    main("train", per_fold(train, train_folds))
