"""Named settings from pipelines.yaml; one place that resolves a pipeline by name."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError
from .options import check_keys

ROOT = Path(__file__).resolve().parent.parent
# Overridable for tests and for users who keep settings or data elsewhere.
PIPELINES_FILE = Path(os.environ.get("BATCHTOPK_PIPELINES", ROOT / "pipelines.yaml"))
DATA_DIR = Path(os.environ.get("BATCHTOPK_DATA", ROOT / "data"))
SECTIONS = ("harvest", "train", "eval")  # a pipeline's sections, one per command that reads settings


def load_all(path: Path | None = None) -> dict[str, Any]:
    with open(path or PIPELINES_FILE) as f:
        return yaml.safe_load(f)


def default_name(path: Path | None = None) -> str:
    return load_all(path)["default"]


def get(name: str | None, path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """Return (name, settings) for a pipeline; None means the default one."""
    spec = load_all(path)
    name = name or spec["default"]
    pipes = spec["pipelines"]
    if name not in pipes:
        raise PipelineError(f"unknown pipeline {name!r}; pipelines.yaml has: {', '.join(sorted(pipes))}")
    p = copy.deepcopy(pipes[name])
    check_keys(p, SECTIONS, f"pipelines.yaml, pipeline {name}")
    for section in SECTIONS:
        p.setdefault(section, {})
    return name, p


def resolve_path(value: str) -> str:
    """Paths in pipelines.yaml are relative to the repository root; URLs and hub ids pass through."""
    if "://" in value:
        return value
    p = Path(value)
    if not p.is_absolute() and (value.startswith(".") or (ROOT / p).exists()):
        return str((ROOT / p).resolve())
    return value
