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
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from vqa.planning.hardware import parse_memory, target_card


class ConfigError(ValueError):
    """A knob the user set is unknown or has a bad value."""


# The reference LoRA targets. The vision tower's MLPs share the language model's names
# (gate_proj, up_proj, down_proj), so the adapter lands there too.
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


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
    lora_targets: str = DEFAULT_LORA_TARGETS
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
    # None = no limit; training skips rows above a limit (listed), prediction answers them
    max_sequence_length: int | None = None
    min_pixels: int | None = None  # None = the loaded processor's own value
    max_pixels: int | None = None
    # prediction
    pred_batch_size: int | None = None  # None = the planner's choice
    max_new_tokens: int = 16
    infer_mode: Literal["score", "generate"] = "score"
    tta: Literal["none", "rotate"] = "none"  # rotate: each row under its 4 option shifts
    # prior: a letter prior estimated on CALIBRATE_SHARE of the rows by rotation, divided out
    calibrate: Literal["none", "prior"] = "none"
    calibrate_share: float = 0.05
    # training rows' options permuted per row and epoch (seeded), the label following its option
    shuffle_options: int = 0
    folds: int = 0  # K > 1: K adapters on K folds grouped by image content (out-of-fold scores)
    fold: int | None = None  # with FOLDS: train or predict only this fold (0..K-1)
    runs: str = ""  # make ensemble: the runs' artifact folders, comma-separated
    # planning for a card other than the one at hand (preflight's peak-VRAM model)
    target_gpu: str = ""  # a name from vqa/planning/gpus.json, e.g. A10G, L4, T4, A100-40GB
    target_gpu_memory: str = ""  # e.g. 24GiB; wins over TARGET_GPU
    # e.g. 6h, 30min, 1h30min: preflight picks the largest MAX_PIXELS whose predicted train and
    # submit fit it on the card planned for (vqa/planning/budget.py)
    time_budget: str = ""
    # the embedded default
    data_train_rows: int = 3000  # 0 = all of easy-vqa's share for the demo
    data_test_rows: int = 1000  # 0 = all 9,673
    base_pretrain_steps: int = 2000  # full fine-tuning steps that pretrain the tiny base model
    # housekeeping
    nproc: int = 1  # processes (GPUs) for train and submit; >1 runs them under torchrun
    # several hosts: NNODES of them, this one NODE_RANK (0 = the master, which MASTER_ADDR names)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 29500
    rendezvous_timeout: int = 300  # seconds the nodes wait for each other
    num_threads: int | None = None  # CPU threads for torch; None = torch's default
    # processes that load images and run the processor while the GPU works; None = auto
    dataloader_workers: int | None = None
    # 1 = Liger Kernel's fused RMSNorm, rope and SiLU-mul on a GPU (vqa/kernels.py); 0 = stock
    fused_kernels: int = 1

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
    def time_budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None

    @property
    def world_size(self) -> int:
        """Ranks in all: NPROC on each of NNODES hosts."""
        return self.nproc * self.nnodes

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
_SECONDS = {"d": 86400, "day": 86400, "days": 86400, "h": 3600, "hr": 3600, "hour": 3600,
            "hours": 3600, "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60, "s": 1,
            "sec": 1, "second": 1, "seconds": 1}


def parse_duration(raw: str) -> float:
    """6h, 30min, 1h30min, 90m, 2.5h as seconds; ValueError naming TIME_BUDGET otherwise."""
    text = raw.strip().lower()
    part = r"(\d+(?:\.\d+)?)\s*([a-z]+)\s*"  # a number and its unit
    parts = re.findall(part, text)
    if not re.fullmatch(f"(?:{part})+", text) or any(unit not in _SECONDS for _, unit in parts):
        raise ValueError(f"TIME_BUDGET={raw!r}: expected e.g. 6h, 30min or 1h30min")
    seconds = sum(float(number) * _SECONDS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"TIME_BUDGET={raw!r}: must be more than no time")
    return seconds


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
             "min_pixels", "max_pixels", "num_threads", "nproc", "nnodes",
             "rendezvous_timeout", "base_pretrain_steps"}
_FRACTIONS = {"lora_dropout", "warmup_ratio"}


def _check(config: Config) -> None:
    for name in _POSITIVE:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{knob_name(name)}={value}: must be positive")
    for name in _FRACTIONS:
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{knob_name(name)}={value}: must lie in [0, 1)")
    if not 0 < config.val_fraction < 1:
        raise ConfigError(f"VAL_FRACTION={config.val_fraction}: must lie in (0, 1): early "
                          f"stopping and the best checkpoint are chosen on validation rows")
    for name in ("uncheckpointed_layers", "uncheckpointed_attention"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"{knob_name(name)}={value}: must be 0 or more")
    if config.dataloader_workers is not None and config.dataloader_workers < 0:
        raise ConfigError(f"DATALOADER_WORKERS={config.dataloader_workers}: must be 0 or more")
    if config.lr <= 0:
        raise ConfigError(f"LR={config.lr}: must be positive")
    if config.tta == "rotate" and config.infer_mode != "score":
        raise ConfigError("TTA=rotate averages letter probabilities: it needs INFER_MODE=score")
    if config.calibrate == "prior" and config.infer_mode != "score":
        raise ConfigError("CALIBRATE=prior divides letter probabilities: it needs "
                          "INFER_MODE=score")
    if not 0 < config.calibrate_share <= 1:
        raise ConfigError(f"CALIBRATE_SHARE={config.calibrate_share}: must lie in (0, 1]")
    if config.shuffle_options not in (0, 1):
        raise ConfigError(f"SHUFFLE_OPTIONS={config.shuffle_options}: must be 0 or 1")
    if config.fused_kernels not in (0, 1):
        raise ConfigError(f"FUSED_KERNELS={config.fused_kernels}: must be 0 or 1")
    if config.folds < 0 or config.folds == 1:
        raise ConfigError(f"FOLDS={config.folds}: must be 0 (no folds) or 2 or more")
    if config.fold is not None and not 0 <= config.fold < max(config.folds, 1):
        raise ConfigError(f"FOLD={config.fold}: needs FOLDS=K and must lie in 0..K-1")
    try:
        target_card(config.target_gpu, config.target_gpu_memory)
        if config.time_budget:
            parse_duration(config.time_budget)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.time_budget and config.max_pixels:
        raise ConfigError(f"TIME_BUDGET={config.time_budget} chooses MAX_PIXELS: set one of "
                          f"them, not both (MAX_PIXELS={config.max_pixels})")
    if config.min_pixels and config.max_pixels and config.min_pixels > config.max_pixels:
        raise ConfigError(f"MIN_PIXELS={config.min_pixels} exceeds MAX_PIXELS={config.max_pixels}")
    if not 0 <= config.node_rank < config.nnodes:
        raise ConfigError(f"NODE_RANK={config.node_rank}: must lie in 0..NNODES-1 "
                          f"(NNODES={config.nnodes})")
    if config.nnodes > 1 and not config.master_addr:
        raise ConfigError(f"NNODES={config.nnodes} needs MASTER_ADDR: the address of node 0, "
                          f"reachable from every node")
    if not 1 <= config.master_port <= 65535:
        raise ConfigError(f"MASTER_PORT={config.master_port}: must lie in 1..65535")
    if config.per_device_batch and config.effective_batch_size % (config.per_device_batch
                                                                    * config.world_size):
        nodes = f" x NNODES={config.nnodes}" if config.nnodes > 1 else ""
        raise ConfigError(
            f"EFFECTIVE_BATCH_SIZE={config.effective_batch_size} is not a multiple of "
            f"PER_DEVICE_BATCH={config.per_device_batch} x NPROC={config.nproc}{nodes}")


def _load(cls, knobs: dict[str, str], argv: list[str] | None, environ: dict | None,
          others: frozenset[str]):
    """`cls` from its defaults, then the environment, then `KEY=value` arguments; arguments
    named in `others` belong to another settings class and are passed over."""
    environ = dict(os.environ if environ is None else environ)
    # An empty variable means unset: docker compose passes `${KNOB:-}` through as "".
    overrides: dict[str, str] = {k: environ[k] for k in knobs if environ.get(k, "").strip()}
    for arg in argv or []:
        if "=" not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: settings are KEY=value")
        key, raw = arg.split("=", 1)
        key = key.strip().upper()
        if key in others:
            continue
        if key not in knobs:
            near = difflib.get_close_matches(key, [*knobs, *others], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown setting {key}{hint}; `make help` lists them")
        overrides[key] = raw
    hints = get_type_hints(cls)
    values = {knobs[k]: _parse_value(k, raw, hints[knobs[k]]) for k, raw in overrides.items()}
    return dataclasses.replace(cls(), **values)


def load_config(argv: list[str] | None = None, environ: dict | None = None, *,
                bench: bool = False) -> Config:
    """The config from defaults, then the environment, then `KEY=value` arguments. `bench`:
    a benchmark's command line, where the BENCH_* settings (BenchConfig) may appear too."""
    config = _load(Config, KNOBS, argv, environ, frozenset(BENCH_KNOBS) if bench else frozenset())
    _check(config)
    return config


@dataclass
class BenchConfig:
    """The benchmarks' own settings (`make bench`, `make bench-memory`, `make bench-gpus`), set
    like the run's: environment or KEY=value. Empty = the benchmark's whole grid."""

    bench_models: str = "7B,3B"  # real sizes to build, e.g. 7B or 3B,7B
    bench_images: str = ""  # image settings by name, e.g. 448x448,1024x768
    bench_work: str = ""  # bench: predict,rotate,train; bench-memory: train,score,generate
    bench_batches: str = ""  # bench-memory's batches, e.g. "score=8,24 train=2,4"
    bench_rows: int = 2048  # bench-memory: rows per image size
    bench_train_steps: int | None = None  # bench: optimizer steps per training row (5)
    bench_predict_rows: int | None = None  # bench: test rows per prediction row (768)
    bench_profile: int = 0  # 1 = torch-profiler tables of one step of each of vqa's phases
    bench_other_casts: int = 0  # bench: 1 = also train with the other FP32_CASTS choice
    bench_uncheckpointed: str = ""  # bench-memory: e.g. 0,7,0+14 (layers kept + blocks)
    bench_step_times: int = 1  # bench-memory: 0 = do not time the planned training step
    bench_levers: int = 1  # bench: 0 = skip the rows that add one lever at a time
    bench_cap: str = ""  # emulate a card of this size, e.g. 24GiB (make bench CAP=24GiB)
    bench_scratch: Path | None = None  # built models and synthetic data
    bench_model: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # bench-gpus
    bench_train_rows: int = 256  # bench-gpus
    bench_test_rows: int = 256  # bench-gpus

    def listed(self, name: str, default: str) -> list[str]:
        """A comma-separated setting as a list; `default` when it is empty."""
        return [x.strip() for x in (getattr(self, name) or default).split(",") if x.strip()]


BENCH_KNOBS = {knob_name(f.name): f.name for f in fields(BenchConfig)}


def load_bench_config(argv: list[str] | None = None, environ: dict | None = None) -> BenchConfig:
    """The benchmark settings; the run's own settings on the same command line are left to
    load_config(..., bench=True)."""
    bench = _load(BenchConfig, BENCH_KNOBS, argv, environ, frozenset(KNOBS))
    if bench.bench_cap:
        try:
            parse_memory(bench.bench_cap)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("TARGET_GPU_MEMORY", "BENCH_CAP")) from None
    return bench
