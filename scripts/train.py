#!/usr/bin/env python3
"""make train: LoRA fine-tuning (QLoRA on a GPU); writes lora_adapter/ and train_metrics.json."""

from vqa.cli import main
from vqa.config import Config


def stage(config: Config) -> None:
    from vqa.memory import plan_batch_sizes
    from vqa.train import train

    train(config, plan_batch_sizes(config).per_device_batch)


if __name__ == "__main__":
    main("train", stage)
