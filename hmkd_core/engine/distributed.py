"""torch.distributed plumbing: one process per GPU (NCCL) or N CPU processes (gloo).

Processes are started with `spawn`, never `fork`: CUDA initialised in a parent breaks forked
children, so CUDA is first touched inside each training process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device is cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(
    rank: int,
    world_size: int,
    device_kind: str,
    init_method: str,
    local_rank: int | None = None,
) -> DistContext:
    """Join the process group (`init_method`: tcp://host:port for processes this library
    started, env:// under torchrun); `local_rank` picks the GPU on a node of several."""
    device = pick_device(device_kind, rank if local_rank is None else local_rank)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run `fn(rank, world_size, port, *args)` in `nproc` processes (in-process when 1)."""
    port = free_port()
    if nproc == 1:
        fn(0, 1, port, *args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    mp.start_processes(fn, args=(nproc, port, *args), nprocs=nproc, join=True, start_method="spawn")


def any_true(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is true on any; lets one rank's decision stop all in step."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, on every rank (list of length world_size)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
