"""A training run's directory: what it holds, and the one way to write and read it.

    <run>/run.json            identity, settings, the step's program, and once finished: complete, saes
    <run>/state.pt            the training state (train/checkpoint.py), replaced whole at each checkpoint
    <run>/tensorboard/        scalars of every SAE, where tensorboard is installed
    <run>/<sae>/              one per SAE (SAEConfig.name):
        cfg.json, sae_weights.safetensors   the SAE in SAELens's format (train/sae.py: save_sae)
        train_log.jsonl                     one record per log step: losses, nmse, l0, dead, compiles, ...
        metrics.json                        evaluation's, written beside it by `make eval`

Evaluation, the report and the benchmarks read a run through these functions, not the trainer's internals.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from batchtopk.core.errors import PipelineError

RUN_FILE = "run.json"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
TENSORBOARD = "tensorboard"


class RunDir:
    """The directory of one training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    def sae_dir(self, name: str) -> Path:
        return self.path / name

    def read_run(self) -> dict[str, Any] | None:
        """run.json, or None where there is none; an unreadable one is a clear error."""
        if not self.run_file.exists():
            return None
        try:
            return json.loads(self.run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{self.run_file} is unreadable ({type(e).__name__}): restore it, or delete "
                                f"{self.path} to train this run again") from None

    def start(self, identity: dict[str, Any], settings: dict[str, Any], executor: str) -> None:
        """A new run.json: this run, not complete yet."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_file.write_text(json.dumps({"identity": identity, "complete": False, "settings": settings,
                                             "executor": executor}, indent=2))

    def mark_complete(self, sae_dirs: list[Path]) -> None:
        """Record that the run finished, and which SAE directories it wrote."""
        run = json.loads(self.run_file.read_text())
        self.run_file.write_text(json.dumps(run | {"complete": True, "saes": [str(d) for d in sae_dirs]}, indent=2))

    def open_log(self, name: str) -> IO[str]:
        """SAE `name`'s training log, opened to append (a resumed run goes on writing it)."""
        return open(self.sae_dir(name) / LOG_FILE, "a")


def write_log_record(log: IO[str], record: dict[str, Any]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def read_log(sae_dir: str | Path) -> list[dict[str, Any]] | None:
    """An SAE directory's training log records, oldest first (None where it has no log)."""
    p = Path(sae_dir) / LOG_FILE
    if not p.exists():
        return None
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
