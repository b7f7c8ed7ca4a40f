"""torch.distributed helpers shared by harvest and train (torchrun sets the environment)."""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int, str]:
    """Initialise the process group when launched by torchrun: NCCL on GPUs, gloo on CPU.

    Returns (rank, world size, device).
    """
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    rank, size = world()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, size, f"cuda:{local}"
    return rank, size, "cpu"


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from src to every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (same shape on all ranks), concatenated along dim 0 in rank order."""
    if world()[1] == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of a tensor from src."""
    if world()[1] > 1:
        dist.broadcast(t, src=src)
    return t


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
