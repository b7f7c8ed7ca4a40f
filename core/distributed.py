"""torch.distributed helpers shared by harvest and train (torchrun sets the environment).

A rank that fails tells the others through the process group's key-value store, and a watchdog
thread in every rank exits (within seconds, with the failing rank's one-line error) when any rank
reports a failure, stops beating, or the store itself goes away. Collectives alone would wait for
the process group's timeout (hours), and torchrun's agent only stops the ranks of its own machine.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
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
        _start_watchdog()
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


# ---------------------------------------------------------------- failure propagation
FAILED_KEY = "batchtopk/failed"
BEAT_S = 2.0    # how often each rank beats and looks for failures
STALE_S = 45.0  # a rank whose beat has not changed for this long is gone (killed, hung machine)


_reported = threading.Event()
_stopping = threading.Event()  # this rank is leaving cleanly
_watchdog: threading.Thread | None = None


def _store():
    return dist.distributed_c10d._get_default_store()


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _start_watchdog() -> None:
    store, rank, size = _store(), dist.get_rank(), dist.get_world_size()

    def watch() -> None:
        seen: dict[int, tuple[bytes, float]] = {}
        beat = 0
        while not _reported.is_set() and not _stopping.is_set():  # a failed or finished rank is on its way out
            try:
                beat += 1
                store.set(f"batchtopk/beat/{rank}", str(beat))
                if store.check([FAILED_KEY]) and not _reported.is_set():
                    message = store.get(FAILED_KEY).decode()
                    store.set(f"batchtopk/ack/{rank}", "1")
                    _die(message)
                now = time.monotonic()
                for r in range(size):
                    key = f"batchtopk/beat/{r}"
                    if r == rank or not store.check([key]) or store.check([f"batchtopk/done/{r}"]):
                        continue
                    value = store.get(key)
                    if r not in seen or seen[r][0] != value:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > STALE_S:
                        _die(f"rank {r} stopped responding (killed, or its machine hung); stopping rank {rank} too; "
                             "what was completed is kept: run the same command to resume")
            except Exception as e:  # the store's host (rank 0 or the launcher) is gone
                if _reported.is_set() or _stopping.is_set():
                    return
                _die(f"rank {rank} lost contact with the other ranks ({type(e).__name__}); stopping; "
                     "what was completed is kept: run the same command to resume")
            _stopping.wait(BEAT_S)

    global _watchdog
    _watchdog = threading.Thread(target=watch, name="rank-watchdog", daemon=True)
    _watchdog.start()
    atexit.register(_leave, store, rank)


def _leave(store, rank: int) -> None:
    """At a clean exit: mark this rank done (the others stop watching its beat), stop the watchdog
    before the interpreter tears down (a store call still in flight then aborts the process), and
    release the process group."""
    _stopping.set()
    if _watchdog is not None:
        _watchdog.join(timeout=3 * BEAT_S)
    try:
        store.set(f"batchtopk/done/{rank}", "1")
        dist.destroy_process_group()
    except Exception:
        pass


def report_failure(message: str) -> None:
    """Tell every rank that this one failed (they exit with this message); no-op outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    rank, size = dist.get_rank(), dist.get_world_size()
    _reported.set()  # this rank's own watchdog must not echo it
    try:
        store = _store()
        store.set(FAILED_KEY, f"rank {rank} failed: {message}")
        # the store may live in this very process (rank 0): stay until the others have read it
        others = [f"batchtopk/ack/{r}" for r in range(size) if r != rank]
        deadline = time.monotonic() + 3 * BEAT_S
        while time.monotonic() < deadline and not store.check(others):
            time.sleep(0.1)
    except Exception:
        pass  # the store is gone: the others notice that by themselves


def exit_now(code: int) -> None:
    """Leave without waiting for the process group's teardown (which can block on failed peers)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

