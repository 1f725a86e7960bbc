#!/usr/bin/env python3
"""make train: LoRA fine-tuning (QLoRA on a GPU); writes lora_adapter/ and train_metrics.json."""

from vqa.cli import main
from vqa.config import Config


def stage(config: Config) -> None:
    from vqa.preflight import plan_run
    from vqa.train import train

    plan = plan_run(config, train_csv=True)
    train(config, plan.per_device_batch, plan.uncheckpointed_layers,
          plan.uncheckpointed_attention)


if __name__ == "__main__":
    main("train", stage)
