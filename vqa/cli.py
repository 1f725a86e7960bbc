"""What every scripts/<verb>.py shares: config from env and KEY=value, logging, one-line errors."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from vqa.config import Config, ConfigError, load_config

log = logging.getLogger("vqa")


def _user_errors() -> tuple[type[Exception], ...]:
    from vqa.data import DataError
    from vqa.families.base import UnsupportedModel
    from vqa.model import ModelError
    from vqa.predict import PredictOutOfMemory
    from vqa.submission import SubmissionError
    from vqa.trainer import TrainingOutOfMemory

    return (ConfigError, DataError, ModelError, PredictOutOfMemory, SubmissionError,
            TrainingOutOfMemory, UnsupportedModel, FileNotFoundError)


# Stages that run on several ranks when NPROC > 1; the others ignore NPROC.
DISTRIBUTED_STAGES = {"train", "submit"}


def run_stage(name: str, stage: Callable[[Config], int | None], argv: list[str] | None = None,
              before: Callable[[Config], None] | None = None) -> int:
    """Parses the config, prints and saves it, runs `stage`, and turns user errors into one line.
    `before`: a check that must pass before anything is written to ARTIFACTS_DIR.

    With NPROC > 1, train and submit rerun themselves under torchrun (vqa/distributed.py); the
    config is then printed and saved by rank 0 only. Returns the process exit code: the
    stage's own when it returns an int, else 0; 2 on a user error.
    """
    from vqa import distributed

    here = distributed.world()
    logging.basicConfig(level=logging.INFO if here.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"vqa {name}: error: {exc}", file=sys.stderr)
        return 2
    if config.world_size > 1 and name in DISTRIBUTED_STAGES and not distributed.launched():
        args = sys.argv[1:] if argv is None else argv
        return distributed.launch(name, config, [sys.argv[0], *args])
    try:
        if before is not None:
            before(config)
    except _user_errors() as exc:
        print(f"vqa {name}: error: {exc}", file=sys.stderr)
        return 2
    if config.num_threads:
        import torch

        torch.set_num_threads(config.num_threads)
    if here.is_main:
        print(f"vqa {name}: resolved config\n{config.describe()}", flush=True)
        config.artifacts_dir.mkdir(parents=True, exist_ok=True)
        config.save(config.artifacts_dir / "config.json")
    started = time.time()
    try:
        code = stage(config)
    except _user_errors() as exc:
        if here.is_main:  # every rank meets the same error; one line is enough
            print(f"vqa {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqa {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.finish()
    log.info("%s finished in %.1f s", name, time.time() - started)
    return code if isinstance(code, int) else 0


def main(name: str, stage: Callable[[Config], int | None],
         before: Callable[[Config], None] | None = None) -> None:
    sys.exit(run_stage(name, stage, before=before))
