"""Which rows of a cache are held out, and which rows an SAE or an evaluation reads.

The held-out split is part of the data contract between training and everything that evaluates an SAE:
it is recorded in each SAE's cfg.json (`Split.metadata`) and read back from it (`Split.from_metadata`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchtopk.core.errors import PipelineError

from .format import Cache

HELDOUT_LAYOUTS = ("tail", "interleaved")
PARTS = ("train", "heldout", "calibration")


@dataclass(frozen=True)
class Split:
    """Which sequences train, which are held out for evaluation, and (optionally) which calibrate the
    thresholds set after training.

    Layouts of the held-out part: `tail`, the last chunks whole (cheap to read; on a small corpus they
    are its last few documents, and a held-out metric then measures those); `interleaved`, one sequence
    in every `every` (sequences s with s % every == every - 1) in every chunk, so the held-out text is
    spread over the whole corpus like the training text; the training stream leaves those rows out.
    With `calibrate`, every other held-out sequence is set aside to calibrate BatchTopK's θ and
    JumpReLU's target factor on text the SAE never trained on, and evaluation reads the others: odd
    sequences in both layouts (interleaved: s % (2·every) == 2·every - 1; tail: the odd ones), so SAEs
    of either layout share evaluation rows.
    """

    train_chunks: tuple[int, ...]
    heldout_chunks: tuple[int, ...]
    every: int = 0  # interleaved: one held-out sequence in every `every`; 0: the tail layout
    calibrate: bool = False
    first_heldout: int = 0  # tail: the first held-out sequence

    @classmethod
    def of(cls, cache: Cache, val_fraction: float, layout: str = "tail", calibrate: bool = False) -> Split:
        if layout not in HELDOUT_LAYOUTS:
            raise PipelineError(f"held-out layout {layout!r} is not one of: {', '.join(HELDOUT_LAYOUTS)}")
        n = cache.n_chunks
        calibrate = calibrate and val_fraction > 0
        if layout == "interleaved" and val_fraction > 0:
            every = max(2, round(1 / val_fraction))
            if cache.n_sequences < every * (2 if calibrate else 1):
                raise PipelineError(f"cache {cache.location} has only {cache.n_sequences} sequence(s): too few to "
                                    f"hold out one in {every} for validation; harvest more tokens")
            held = [c for c in range(n) if _held_seqs(*cache.seq_range(c), every).size]
            return cls(tuple(range(n)), tuple(held), every, calibrate)
        held = max(1, math.ceil(n * val_fraction)) if val_fraction > 0 else 0  # at least the fraction
        if n - held < 1:
            raise PipelineError(f"cache {cache.location} has only {n} chunk(s): too small to hold out "
                                f"{val_fraction:.0%} for validation; harvest more tokens")
        first = cache.seq_range(n - held)[0] if held else 0
        return cls(tuple(range(n - held)), tuple(range(n - held, n)), 0, calibrate, first)

    @classmethod
    def from_metadata(cls, cache: Cache, md: dict) -> Split:
        """The split an SAE was trained with, from its metadata (`heldout_sequences` [start, stop] and
        `heldout_every`, as Python's range, likewise `calibration_sequences` and `calibration_every`)."""
        held, cal = md.get("heldout_sequences"), md.get("calibration_sequences")
        if not held:
            return cls(tuple(range(cache.n_chunks)), ())
        every = int(md.get("heldout_every") or 1)
        layout = md.get("heldout_layout") or ("interleaved" if every > 1 else "tail")
        if layout == "interleaved":
            return cls.of(cache, 1 / (every // 2 if cal else every), "interleaved", bool(cal))
        first = min(int(held[0]), int(cal[0])) if cal else int(held[0])
        chunk = first // cache.chunk_seqs
        return cls(tuple(range(chunk)), tuple(range(chunk, cache.n_chunks)), 0, bool(cal), first)

    def sequences(self, cache: Cache, part: str) -> range:
        """The sequences of a held-out part ("heldout": what evaluation reads, or "calibration"), as a
        range."""
        n = cache.n_sequences
        if not self.heldout_chunks or (part == "calibration" and not self.calibrate):
            return range(0)
        start, step = (self.every - 1, self.every) if self.every else (self.first_heldout, 1)
        if not self.calibrate:
            return range(start, n, step)
        if self.every:  # interleaved: the first, third, ... held-out sequences calibrate
            return range(start + (step if part == "heldout" else 0), n, 2 * step)
        odd = start % 2  # tail: the even sequences calibrate
        return range(start + (1 - odd if part == "heldout" else odd), n, 2)

    def roles(self, cache: Cache, chunk: int) -> np.ndarray:
        """The part (an index into PARTS) of each sequence of a chunk."""
        s0, s1 = cache.seq_range(chunk)
        out = np.zeros(s1 - s0, dtype=np.int8)
        for p in (1, 2):
            r = self.sequences(cache, PARTS[p])
            if len(r):
                first = max(r.start, s0 + (r.start - s0) % r.step)
                out[np.arange(first, s1, r.step) - s0] = p
        return out

    def metadata(self, cache: Cache) -> dict[str, Any]:
        """`heldout_sequences` [start, stop] and `heldout_every` (the step): range(start, stop, every)
        are the held-out sequences evaluation reads; `calibration_sequences` and `calibration_every`
        likewise those that calibrated the thresholds (None if training tokens did)."""
        if not self.heldout_chunks:
            return {"heldout_sequences": None, "heldout_every": None}
        held, cal = self.sequences(cache, "heldout"), self.sequences(cache, "calibration")
        return {"heldout_layout": "interleaved" if self.every else "tail",
                "heldout_sequences": [held.start, held.stop], "heldout_every": held.step,
                "calibration_sequences": [cal.start, cal.stop] if self.calibrate else None,
                "calibration_every": cal.step if self.calibrate else None}


def _held_seqs(s0: int, s1: int, every: int) -> np.ndarray:
    """The held-out sequences of the interleaved layout in [s0, s1)."""
    first = s0 + (every - 1 - s0) % every
    return np.arange(first, s1, every)


def heldout_sequences(md: dict) -> range:
    """The held-out sequences an SAE's metadata names for evaluation (empty if none)."""
    held = md.get("heldout_sequences")
    return range(int(held[0]), int(held[1]), int(md.get("heldout_every") or 1)) if held else range(0)


def keep_mask(cache: Cache, chunk: int, drop_token: int | None, skip_rows: np.ndarray | None,
              split: Split | None = None, part: str = "train") -> np.ndarray:
    """Which rows of a chunk an SAE sees: not at drop_token (BOS) positions, not in skip_rows
    (sorted row indices, as Cache.outliers gives them); with a split, only the rows of its `part`."""
    r0, r1 = cache.row_range(chunk)
    keep = np.ones(r1 - r0, dtype=bool)
    if drop_token is not None:
        keep &= (cache.read_chunk("tokens", chunk) != drop_token).reshape(-1)
    if skip_rows is not None:
        lo, hi = np.searchsorted(skip_rows, [r0, r1])
        keep[skip_rows[lo:hi] - r0] = False
    if split is not None:
        keep &= np.repeat(split.roles(cache, chunk) == PARTS.index(part), cache.ctx_len)
    return keep


@dataclass(frozen=True)
class Rows:
    """Which rows of a cache site an SAE trains on, or an evaluation reads: a part of the split ("train",
    "heldout" for evaluation, "calibration" for thresholds set after training), less the BOS positions
    (BOS is cache.tokens[0, 0]; its residual is huge and constant) and the massive-activation rows the
    cache lists (Cache.outliers), unless those are included.

    Recorded in an SAE's cfg.json (`metadata`) and read back from it (`from_metadata`), so everything that
    evaluates an SAE reads the rows its training left out.
    """

    cache: Cache
    site: str
    split: Split
    include_bos: bool = False
    include_outliers: bool = False

    @classmethod
    def from_metadata(cls, cache: Cache, md: dict[str, Any]) -> Rows:
        """The rows of the SAE whose cfg.json metadata is `md` (metadata older than `include_outliers`
        records how many outlier rows it excluded: none means they were kept, or there were none)."""
        outliers = md.get("include_outliers", not md.get("excluded_outlier_rows"))
        return cls(cache, md["hook_name"], Split.from_metadata(cache, md), bool(md.get("include_bos", False)),
                   bool(outliers))

    @functools.cached_property
    def drop_token(self) -> int | None:
        """The token whose positions are left out (BOS), or None."""
        return None if self.include_bos else int(self.cache.tokens[0, 0])

    @functools.cached_property
    def skip_rows(self) -> np.ndarray | None:
        """Sorted indices of the rows left out as massive activations, or None."""
        return None if self.include_outliers else self.cache.outliers(self.site)[0]

    @property
    def max_norm(self) -> float | None:
        """The norm above which a position counts as a massive activation (None: none are left out)."""
        return None if self.include_outliers else self.cache.outliers(self.site)[1]

    def mask(self, chunk: int, part: str = "train") -> np.ndarray:
        """Which rows of a chunk belong to `part` and are not left out."""
        return keep_mask(self.cache, chunk, self.drop_token, self.skip_rows, self.split, part)

    def chunks(self, part: str = "heldout") -> Iterator[torch.Tensor]:
        """Each held-out chunk's rows of `part` ("heldout" or "calibration") in turn (float32)."""
        if not self.split.heldout_chunks:
            raise PipelineError("no held-out chunks (val_fraction is 0)")
        drop, skip = self.drop_token, self.skip_rows
        for c in self.split.heldout_chunks:
            keep = keep_mask(self.cache, c, drop, skip, self.split, part)
            rows = self.cache.read_rows(self.site, *self.cache.row_range(c))[keep]
            yield torch.from_numpy(np.ascontiguousarray(rows))

    def take(self, max_rows: int, part: str = "heldout", scale: float = 1.0) -> torch.Tensor:
        """Up to max_rows rows of a held-out part (float32, times scale), reading only the chunks needed."""
        parts, n = [], 0
        for rows in self.chunks(part):
            parts.append(rows)
            n += len(rows)
            if n >= max_rows:
                break
        return torch.cat(parts)[:max_rows].mul_(scale)

    def metadata(self) -> dict[str, Any]:
        """What cfg.json records of these rows (read back by from_metadata)."""
        skip = self.skip_rows
        return {**self.split.metadata(self.cache), "include_bos": self.include_bos,
                "include_outliers": self.include_outliers,
                "excluded_outlier_rows": 0 if skip is None else int(len(skip))}
