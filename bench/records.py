"""Benchmark records: every figure is a ratio against a baseline measured in the same run."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchtopk.core.pipelines import DATA_DIR


@dataclass
class Record:
    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    device: str
    settings: dict[str, Any] = field(default_factory=dict)
    ratio: float = 0.0

    def __post_init__(self) -> None:
        self.ratio = self.value / self.baseline_value if self.baseline_value else float("nan")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import os
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def timed(fn: Callable[[], Any], repeat: int = 1, warmup: int = 1, device: str = "cpu") -> float:
    """Best-of wall time of fn() in seconds (after warm-up), synchronising CUDA."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def write(part: str, records: list[Record], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or DATA_DIR / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{part}.json"
    path.write_text(json.dumps([asdict(r) for r in records], indent=2))
    return path


def table(records: list[Record]) -> str:
    rows = [f"{'benchmark':<44} {'value':>12} {'unit':<8} {'baseline':<34} {'ratio':>7}"]
    for r in records:
        rows.append(f"{r.name:<44} {r.value:>12.4g} {r.unit:<8} {r.baseline:<34} {r.ratio:>7.3f}")
    return "\n".join(rows)
