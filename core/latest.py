"""What the latest `make harvest` and `make train` of each pipeline produced, so the next command in the
user's flow picks it up: `make harvest MODEL=...` then `make train` trains on that cache, and
`make eval` / `make browse` take the SAEs of that training run.

One small JSON file per pipeline and stage under data/latest/<pipeline>/; each is written to a fresh
temporary file and renamed over the old one, so two commands running at once never leave a torn
file (the later one wins) and a reader sees either the old pointer or the new one.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import pipelines

STAGES = ("harvest", "train")


def _path(pipeline: str, stage: str) -> Path:
    return pipelines.DATA_DIR / "latest" / pipeline / f"{stage}.json"


def record(pipeline: str, stage: str, **fields: Any) -> Path:
    """Remember what `stage` of `pipeline` just produced (atomically)."""
    assert stage in STAGES, stage
    path = _path(pipeline, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"pipeline": pipeline, "at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **fields}
    fd, tmp = tempfile.mkstemp(prefix=f".{stage}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(pipeline: str, stage: str) -> dict[str, Any] | None:
    """The pointer `stage` of `pipeline` left, or None when that stage never ran here (or its file is
    unreadable: then the command behaves as if it had not run, and says so)."""
    path = _path(pipeline, stage)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        note(f"ignoring {path} ({type(e).__name__}); delete it")
        return None


def note(message: str) -> None:
    """One line on stderr saying what a command picked (stdout's last line stays the command's result)."""
    print(message, file=sys.stderr, flush=True)
