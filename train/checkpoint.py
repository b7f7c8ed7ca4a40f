"""Training checkpoints that cannot be silently wrong: atomic writes and a digest of their contents.

torch.load reads a file whose tensor bytes were altered without complaint, so the state carries a
blake2b digest of everything in it, checked on load. The file is written beside the old one and
renamed over it, so a failed write (a full disk) leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchtopk.core.errors import PipelineError

DIGEST_KEY = "blake2b"


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D")
        for k, v in obj.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)))
    else:
        h.update(repr(obj).encode())


def digest(state: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state | {DIGEST_KEY: digest(state)}, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def load(path: Path, device: str = "cpu") -> dict[str, Any]:
    """The checkpoint's state, or a one-line error naming the file and what to do."""
    fix = "delete it to train this run again from step 0, or restore it from a copy"
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        ok = isinstance(state, dict) and state.get(DIGEST_KEY) == digest(state)
    except Exception as e:  # truncated, or not a checkpoint at all
        raise PipelineError(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); {fix}") from None
    if not ok:
        raise PipelineError(f"checkpoint {path} is corrupt (its contents do not match the digest written with "
                            f"them); {fix}")
    return state
