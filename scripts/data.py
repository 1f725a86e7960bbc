#!/usr/bin/env python3
"""make data: writes the embedded default (easy-vqa in the competition's CSV format) to DATA_DIR."""

import logging

from vqa.cli import main
from vqa.config import Config

log = logging.getLogger("vqa")


def stage(config: Config) -> None:
    from vqa.easyvqa import write_dataset

    summary = write_dataset(config.data_dir, config.data_train_rows, config.data_test_rows,
                            config.seed)
    log.info("wrote %s: %s", config.data_dir, summary)


if __name__ == "__main__":
    main("data", stage)
