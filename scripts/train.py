#!/usr/bin/env python3
"""make train: LoRA fine-tuning (QLoRA on a GPU); writes lora_adapter/ and train_metrics.json."""

from vqa.cli import main
from vqa.train import train

if __name__ == "__main__":
    main("train", train)
