"""Several GPUs of one host through torch's own launcher (torchrun) and DDP.

`NPROC=2 make train` (or `make submit`) relaunches the same script under
`python -m torch.distributed.run --standalone --nproc_per_node 2`; torchrun sets RANK,
LOCAL_RANK and WORLD_SIZE. Training is the HF Trainer's DDP; prediction gives each rank whole
batches of the single-process plan. On a machine without CUDA the same code runs with the gloo
backend (that is how the CPU tests exercise it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the ranks torchrun started (one rank when not launched)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def launched() -> bool:
    return "LOCAL_RANK" in os.environ


def launch(name: str, nproc: int, argv: list[str]) -> int:
    """Runs `argv` (a script and its settings) on `nproc` ranks through torchrun's own API.

    Returns the exit code. Each rank reports its own errors; a failed rank ends the launch with
    one line here instead of torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    print(f"vqa {name}: NPROC={nproc}: torchrun --standalone --nproc_per_node={nproc} "
          f"{' '.join(argv)}", flush=True)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", *argv]))
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        print(f"vqa {name}: {len(exc.failures)} of {nproc} ranks failed (exit code "
              f"{', '.join(map(str, codes))}); their messages are above", file=sys.stderr)
        return max(codes) if max(codes) > 0 else 1
    return 0


def init() -> World:
    """Joins the process group (NCCL on CUDA, gloo otherwise) when there are several ranks."""
    here = world()
    if here.size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", here.local_rank)
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return here


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
