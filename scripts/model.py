#!/usr/bin/env python3
"""make model: builds and pretrains the embedded tiny Qwen2.5-VL into ARTIFACTS_DIR/base-model."""

from vqa.cli import main
from vqa.config import Config


def stage(config: Config) -> None:
    from vqa.pretrain import build_embedded_model

    build_embedded_model(config)


if __name__ == "__main__":
    main("model", stage)
