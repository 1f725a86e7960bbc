"""Several GPUs, of one host or several, through torch's own launcher (torchrun) and DDP.

`NPROC=2 make train` (or `make submit`) relaunches the same script under
`python -m torch.distributed.run --standalone --nproc_per_node 2`; torchrun sets RANK,
LOCAL_RANK and WORLD_SIZE. Training is the HF Trainer's DDP; prediction gives each rank whole
batches of the single-process plan. On a machine without CUDA the same code runs with the gloo
backend (that is how the CPU tests exercise it).

Several hosts: the same command on each, with `NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0's
address> MASTER_PORT=29500`, goes through torchrun's static rendezvous at that address (node 0
serves it). A node that cannot reach it within RENDEZVOUS_TIMEOUT stops with one line naming
the address and port. Every node must see the same ARTIFACTS_DIR (shared storage: NFS or the
like), because rank 0 alone writes checkpoints, the adapter, the plan and the reports, and the
other nodes read them back: `check_shared` stops a run whose nodes do not.
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


def torchrun_args(config) -> list[str]:
    """torchrun's options for the config: one host (its own rendezvous), or NNODES hosts
    meeting at MASTER_ADDR:MASTER_PORT."""
    if config.nnodes == 1:
        return ["--standalone", f"--nproc_per_node={config.nproc}"]
    return [f"--nnodes={config.nnodes}", f"--node_rank={config.node_rank}",
            f"--nproc_per_node={config.nproc}", f"--master_addr={config.master_addr}",
            f"--master_port={config.master_port}", "--rdzv_backend=static",
            f"--rdzv_conf=timeout={config.rendezvous_timeout}"]


def wait_for_master(address: str, port: int, timeout: float) -> None:
    """Returns once a TCP connection to the master's rendezvous succeeds; ConnectionError with
    one line naming the address and port when it does not within `timeout` seconds."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"cannot reach the master node at {address}:{port} within {timeout:.0f} s "
                    f"({exc.strerror or exc}): start node 0 first, check MASTER_ADDR and that "
                    f"the port is open between the hosts") from None
            time.sleep(1)


def launch(name: str, config, argv: list[str]) -> int:
    """Runs `argv` (a script and its settings) on this host's NPROC ranks through torchrun's
    own API, as one of NNODES hosts when there are several.

    Returns the exit code. Each rank reports its own errors; a failed rank, or a rendezvous that
    does not complete, ends the launch with one line here instead of torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    options = torchrun_args(config)
    print(f"vqa {name}: NPROC={config.nproc}"
          + (f" on node {config.node_rank} of {config.nnodes}" if config.nnodes > 1 else "")
          + f": torchrun {' '.join(options)} {' '.join(argv)}", flush=True)
    where = f"{config.master_addr}:{config.master_port}"
    try:
        if config.nnodes > 1 and config.node_rank > 0:
            wait_for_master(config.master_addr, config.master_port, config.rendezvous_timeout)
        run(parse_args([*options, *argv]))
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        print(f"vqa {name}: {len(exc.failures)} of {config.nproc} ranks failed (exit code "
              f"{', '.join(map(str, codes))}); their messages are above", file=sys.stderr)
        return max(codes) if max(codes) > 0 else 1
    except ConnectionError as exc:
        print(f"vqa {name}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the rendezvous' own errors (timeouts, a refused store)
        if config.nnodes == 1:
            raise
        print(f"vqa {name}: error: the {config.nnodes} nodes did not meet at {where} within "
              f"{config.rendezvous_timeout} s ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})", file=sys.stderr)
        return 2
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


def check_shared(folder) -> None:
    """Stops (one line) a run of several hosts whose ranks do not see one ARTIFACTS_DIR: rank 0
    writes a token there, every rank looks for it."""
    import uuid
    from pathlib import Path

    here = world()
    if here.size == 1 or not torch.distributed.is_initialized():
        return
    token = [uuid.uuid4().hex if here.is_main else None]
    torch.distributed.broadcast_object_list(token, src=0)
    path = Path(folder) / f".ranks-see-this-{token[0]}"
    if here.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token[0])
    barrier()
    seen = path.is_file() and path.read_text() == token[0]
    missing = [None] * here.size
    torch.distributed.all_gather_object(missing, None if seen else here.rank)
    barrier()
    if here.is_main:
        path.unlink(missing_ok=True)
    blind = [r for r in missing if r is not None]
    if blind:
        from vqa.config import ConfigError

        raise ConfigError(f"rank(s) {', '.join(map(str, blind))} do not see ARTIFACTS_DIR="
                          f"{folder} as rank 0 wrote it: every node needs the same folder on "
                          f"shared storage (NFS or the like)")


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
