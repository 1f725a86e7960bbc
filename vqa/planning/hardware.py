"""The machine and the card to plan for: NVML, RAM and disk probes, the card table, the budget.

The budget is what PyTorch may hold on one GPU: the card's total memory less the CUDA context.
It is the same number before and after a model is loaded, in every stage and on every rank, so
the plan made by `make preflight` is the plan `make train` and `make submit` run. (The memory NVML
reports free changes as soon as weights are loaded; planning from it counted the weights twice.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

GIB = 2**30
# The CUDA context and kernels outside PyTorch's allocator; subtracted from the card's memory.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)


@dataclass
class GPUInfo:
    index: int  # NVML's index (PCI bus order)
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str
    bf16: bool
    other_processes_bytes: int
    uuid: str = ""


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
    except (ImportError, OSError) as exc:
        machine.nvml_error = f"{type(exc).__name__}: {exc}"
        return machine
    except pynvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded: no NVIDIA GPU here
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
                other_processes_bytes=others, uuid=_text(pynvml.nvmlDeviceGetUUID(handle))))
    finally:
        pynvml.nvmlShutdown()
    return machine


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_gpus(machine: Machine, environ: dict | None = None) -> list[GPUInfo]:
    """The GPUs this process's CUDA sees, in CUDA's order: all of NVML's when
    CUDA_VISIBLE_DEVICES is unset, else those it names by index or UUID (as CUDA reads it: up
    to the first entry it cannot match, none when it is empty). Indices follow NVML's PCI order,
    which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID and on hosts of one kind of card."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return list(machine.gpus)
    chosen = []
    for entry in environ["CUDA_VISIBLE_DEVICES"].split(","):
        entry = entry.strip()
        if entry.isdigit():
            match = next((g for g in machine.gpus if g.index == int(entry)), None)
        else:
            match = next((g for g in machine.gpus if entry and g.uuid.startswith(entry)), None)
        if match is None or match in chosen:
            break  # CUDA ignores an invalid entry and every entry after it
        chosen.append(match)
    return chosen


def gpu_table() -> dict[str, dict]:
    """Target cards for planning a run on a card other than the one at hand (gpus.json)."""
    text = resources.files(__package__).joinpath("gpus.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def parse_memory(text: str) -> int:
    """'24GiB', '24GB', '24000MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"TARGET_GPU_MEMORY={text!r}: expected e.g. 24GiB, 24GB or 23028MiB")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    return int(value * scale)


def target_card(target_gpu: str, target_gpu_memory: str) -> tuple[str, int] | None:
    """(name, total bytes) of the card named by TARGET_GPU_MEMORY or TARGET_GPU, else None;
    ValueError for a size that does not parse or a card not in the table."""
    if target_gpu_memory:
        return f"TARGET_GPU_MEMORY={target_gpu_memory}", parse_memory(target_gpu_memory)
    if target_gpu:
        table = gpu_table()
        key = next((k for k in table if k.lower() == target_gpu.lower()), None)
        if key is None:
            raise ValueError(f"TARGET_GPU={target_gpu!r}: not in the table; known: "
                             f"{', '.join(table)} (or set TARGET_GPU_MEMORY=24GiB)")
        total = table[key]["memory_mib"] * 2**20
        return f"TARGET_GPU={key} ({total / GIB:.1f} GiB)", total
    return None


@dataclass(frozen=True)
class Budget:
    name: str
    usable_bytes: int  # memory PyTorch may reserve: the card's total less the CUDA context


def budget_for(target_gpu: str, target_gpu_memory: str, machine: Machine | None,
               nproc: int = 1) -> Budget | None:
    """The memory to plan for: a target card when one is named, else the smallest of the GPUs
    the run uses (the first NPROC that CUDA sees), else None (a CPU run)."""
    target = target_card(target_gpu, target_gpu_memory)
    if target is not None:
        name, total = target
        return Budget(name, total - CUDA_CONTEXT_BYTES)
    used = visible_gpus(machine)[:max(1, nproc)] if machine is not None else []
    if not used:
        return None
    gpu = min(used, key=lambda g: g.total_bytes)
    return Budget(f"GPU {gpu.index} {gpu.name} ({gpu.total_bytes / GIB:.1f} GiB)",
                  gpu.total_bytes - CUDA_CONTEXT_BYTES)


def card_identity(target_gpu: str, target_gpu_memory: str, machine: Machine | None,
                  nproc: int = 1) -> dict:
    """What the plan's memory depends on about the card, for the plan's fingerprint: the budget
    (name and usable bytes), not what is free at the moment."""
    budget = budget_for(target_gpu, target_gpu_memory, machine, nproc)
    if budget is None:
        return {"card": "cpu"}
    return {"card": budget.name, "usable_bytes": budget.usable_bytes}
