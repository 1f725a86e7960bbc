"""Machine probes (NVML, RAM, disk), the visual-token rule, and batch-size planning.

The planner here is deliberately coarse: on CPU memory is no constraint for the embedded model, and
on a GPU it keeps the reference's proven micro-batch until the calibrated peak-VRAM model lands
(issue 3). Every choice carries the reason that is printed in the preflight report.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from vqa.config import Config

GIB = 2**30


@dataclass
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str
    bf16: bool
    other_processes_bytes: int


@dataclass
class Machine:
    gpus: list[GPUInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_error: str | None = None
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    disk_free_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def probe_machine(artifacts_dir: Path) -> Machine:
    """GPUs through NVML (name, memory, versions, bf16, other processes), RAM and free disk."""
    import psutil

    machine = Machine()
    vm = psutil.virtual_memory()
    machine.ram_total_bytes, machine.ram_available_bytes = vm.total, vm.available
    artifacts_dir = Path(artifacts_dir)
    probe = artifacts_dir if artifacts_dir.exists() else Path(".")
    machine.disk_free_bytes = shutil.disk_usage(probe).free
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA GPU here
        machine.nvml_error = f"{type(exc).__name__}: {exc}"
        return machine
    try:
        machine.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        machine.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                others = sum(p.usedGpuMemory or 0 for p in procs)
            except pynvml.NVMLError:
                others = 0
            machine.gpus.append(GPUInfo(
                index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                total_bytes=mem.total, free_bytes=mem.free,
                compute_capability=f"{major}.{minor}", bf16=major >= 8,
                other_processes_bytes=others))
    finally:
        pynvml.nvmlShutdown()
    return machine


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_table() -> dict[str, dict]:
    """Target cards for planning a run on a card other than the one at hand."""
    text = resources.files("vqa").joinpath("gpus.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (as in transformers' image processor), for planning without pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_tokens_for(height: int, width: int, *, min_pixels: int, max_pixels: int,
                      patch_size: int = 14, merge_size: int = 2) -> int:
    """<|image_pad|> tokens one image costs in the language model."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


@dataclass
class Plan:
    per_device_batch: int
    gradient_accumulation: int
    pred_batch_size: int
    reasons: list[str]


def _pick(knob: str, user_value: int | None, default: int, why: str,
          reasons: list[str]) -> int:
    if user_value:
        reasons.append(f"{knob}={user_value} set by the user")
        return user_value
    reasons.append(f"{knob}={default}: {why}")
    return default


def plan_batch_sizes(config: Config, machine: Machine | None = None) -> Plan:
    """Batch sizes for train and predict: the user's when set, else a choice with its reason."""
    import torch

    reasons: list[str] = []
    effective = config.effective_batch_size
    if torch.cuda.is_available():
        per_device = _pick("PER_DEVICE_BATCH", config.per_device_batch, min(2, effective),
                           "the reference micro-batch on a GPU", reasons)
        pred = _pick("PRED_BATCH_SIZE", config.pred_batch_size, 8,
                     "a conservative GPU batch for one-pass scoring", reasons)
    else:
        # The largest divisor of the effective batch up to 16, so accumulation keeps it exact.
        cpu_batch = max(d for d in range(1, min(effective, 16) + 1) if effective % d == 0)
        per_device = _pick("PER_DEVICE_BATCH", config.per_device_batch, cpu_batch,
                           "CPU run, RAM is no constraint for it", reasons)
        pred = _pick("PRED_BATCH_SIZE", config.pred_batch_size, 32, "CPU run", reasons)
    ranks = config.nproc
    accumulation = max(1, math.ceil(effective / (per_device * ranks)))
    if machine is not None and machine.gpus:
        reasons.append(f"{len(machine.gpus)} GPU(s) found; the plan is per GPU")
        if ranks > len(machine.gpus):
            reasons.append(f"NPROC={ranks} exceeds the {len(machine.gpus)} GPU(s) found: "
                           f"set NPROC={len(machine.gpus)} or fewer")
    if ranks > 1:
        reasons.append(f"NPROC={ranks}: micro-batch {per_device} x accumulation {accumulation} "
                       f"x {ranks} ranks = {per_device * accumulation * ranks} per optimizer "
                       f"step; each rank predicts every {ranks}th batch")
    if per_device * accumulation * ranks != effective:
        reasons.append(f"EFFECTIVE_BATCH_SIZE={effective} is not a multiple of micro-batch x "
                       f"ranks: {per_device * accumulation * ranks} is used")
    return Plan(per_device, accumulation, pred, reasons)
