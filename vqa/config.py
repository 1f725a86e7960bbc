"""The one typed config of a vqa run.

Defaults are the reference setup. Each field has an upper-case knob name; a knob is set from the
environment (`LORA_R=16 make train`) or as a `KEY=value` argument (`make train LORA_R=16`, which
Make forwards to the script). Arguments win over the environment. An unknown `KEY=value`
argument or a bad value stops the run with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A knob the user set is unknown or has a bad value."""


@dataclass
class Config:
    # where things are
    data_dir: Path = Path("data/easy-vqa")
    artifacts_dir: Path = Path("artifacts")
    model_id: str = ""  # local folder or hub id; empty = the embedded tiny model in the artifacts
    # the reference recipe
    per_device_batch: int | None = None  # None = the planner's choice
    effective_batch_size: int = 16
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.08
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    epochs: int = 3
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.3
    val_fraction: float = 0.1
    val_sample: int = 256
    early_stopping_patience: int = 1
    # the last decoder layers that keep their activations instead of recomputing them in the
    # backward pass (less recomputation for memory); None = the planner's choice, 0 = none
    uncheckpointed_layers: int | None = None
    # the decoder layers below those that keep their attention's activations and recompute only
    # their MLP (a finer step of the same trade); None = the planner's choice, 0 = none
    uncheckpointed_attention: int | None = None
    retrain: int = 0  # 1 = train again even when a finished run with these settings exists
    seed: int = 42
    quant: Literal["4bit", "none"] = "4bit"
    max_sequence_length: int | None = None  # None = no limit; rows above a limit are refused
    min_pixels: int | None = None  # None = the loaded processor's own value
    max_pixels: int | None = None
    # prediction
    pred_batch_size: int | None = None  # None = the planner's choice
    max_new_tokens: int = 16
    infer_mode: Literal["score", "generate"] = "score"
    # planning for a card other than the one at hand (preflight's peak-VRAM model)
    target_gpu: str = ""  # a name from vqa/gpus.json, e.g. A10G, L4, T4, A100-40GB
    target_gpu_memory: str = ""  # e.g. 24GiB; wins over TARGET_GPU
    # the embedded default
    data_train_rows: int = 3000  # 0 = all of easy-vqa's share for the demo
    data_test_rows: int = 1000  # 0 = all 9,673
    base_pretrain_steps: int = 2000  # full fine-tuning steps that pretrain the tiny base model
    # housekeeping
    nproc: int = 1  # processes (GPUs) for train and submit; >1 runs them under torchrun
    num_threads: int | None = None  # CPU threads for torch; None = torch's default
    # processes that load images and run the processor while the GPU works; None = auto
    dataloader_workers: int | None = None

    @property
    def model_dir(self) -> Path:
        """The embedded tiny model's folder (where `make model` writes it)."""
        return self.artifacts_dir / "base-model"

    def loader_workers(self, cuda: bool | None = None) -> int:
        """DATALOADER_WORKERS, or when unset: on a GPU, up to 4 (one core left to the main
        process), so image decoding and preprocessing overlap the GPU's work; on CPU, 0 (the
        model's own threads use the cores). `cuda`: None = whether torch sees a GPU."""
        if self.dataloader_workers is not None:
            return self.dataloader_workers
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return min(4, (os.cpu_count() or 1) - 1) if cuda else 0

    @property
    def resolved_model_id(self) -> str:
        return self.model_id or str(self.model_dir)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[knob_name(f.name)] = str(value) if isinstance(value, Path) else value
        out["MODEL_ID"] = self.resolved_model_id
        return out

    def save(self, path: Path) -> None:
        from vqa.io import write_json_atomic

        write_json_atomic(path, self.to_json())

    def describe(self) -> str:
        return "\n".join(f"  {k:<24} {v}" for k, v in self.to_json().items())


def knob_name(field_name: str) -> str:
    return field_name.upper()


KNOBS = {knob_name(f.name): f.name for f in fields(Config)}


def _parse_value(knob: str, raw: str, annotation):
    raw = raw.strip()
    optional = type(None) in get_args(annotation)
    if optional:
        if raw.lower() in ("", "auto", "none"):
            return None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        if raw not in choices:
            raise ConfigError(f"{knob}={raw!r}: must be one of {', '.join(choices)}")
        return raw
    try:
        if annotation is int:
            value = int(raw)
        elif annotation is float:
            value = float(raw)
        elif annotation is Path:
            value = Path(raw)
        else:
            value = raw
    except ValueError:
        raise ConfigError(f"{knob}={raw!r}: expected {annotation.__name__}") from None
    return value


_POSITIVE = {"per_device_batch", "effective_batch_size", "lora_r", "lora_alpha", "epochs",
             "pred_batch_size", "max_new_tokens", "val_sample", "max_sequence_length",
             "min_pixels", "max_pixels", "num_threads", "nproc",
             "base_pretrain_steps"}
_FRACTIONS = {"lora_dropout", "warmup_ratio", "val_fraction"}


def _check(config: Config) -> None:
    for name in _POSITIVE:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{knob_name(name)}={value}: must be positive")
    for name in _FRACTIONS:
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{knob_name(name)}={value}: must lie in [0, 1)")
    for name in ("uncheckpointed_layers", "uncheckpointed_attention"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"{knob_name(name)}={value}: must be 0 or more")
    if config.dataloader_workers is not None and config.dataloader_workers < 0:
        raise ConfigError(f"DATALOADER_WORKERS={config.dataloader_workers}: must be 0 or more")
    if config.lr <= 0:
        raise ConfigError(f"LR={config.lr}: must be positive")
    if config.target_gpu or config.target_gpu_memory:
        from vqa.memory import target_card_memory  # vqa.memory imports this module

        try:
            target_card_memory(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if config.min_pixels and config.max_pixels and config.min_pixels > config.max_pixels:
        raise ConfigError(f"MIN_PIXELS={config.min_pixels} exceeds MAX_PIXELS={config.max_pixels}")
    if config.per_device_batch and config.effective_batch_size % (config.per_device_batch
                                                                    * config.nproc):
        raise ConfigError(
            f"EFFECTIVE_BATCH_SIZE={config.effective_batch_size} is not a multiple of "
            f"PER_DEVICE_BATCH={config.per_device_batch} x NPROC={config.nproc}")


def load_config(argv: list[str] | None = None, environ: dict | None = None) -> Config:
    """The config from defaults, then the environment, then `KEY=value` arguments."""
    environ = dict(os.environ if environ is None else environ)
    # An empty variable means unset: docker compose passes `${KNOB:-}` through as "".
    overrides: dict[str, str] = {k: environ[k] for k in KNOBS if environ.get(k, "").strip()}
    for arg in argv or []:
        if "=" not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: settings are KEY=value")
        key, raw = arg.split("=", 1)
        key = key.strip().upper()
        if key not in KNOBS:
            near = difflib.get_close_matches(key, KNOBS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown setting {key}{hint}; `make help` lists them")
        overrides[key] = raw
    hints = get_type_hints(Config)
    values = {KNOBS[k]: _parse_value(k, raw, hints[KNOBS[k]]) for k, raw in overrides.items()}
    config = dataclasses.replace(Config(), **values)
    _check(config)
    return config

