"""Batches from a cache: random chunk order, an in-memory shuffle window, background reads.

The stream is a pure function of (seed, epoch, part), so resuming needs only the number
of batches already consumed. With several data parts (one per rank under torchrun), part
p of every epoch reads chunks perm[p::parts]; a global batch is the concatenation of the
parts' local batches, which a single process can also build (parts > 1, all parts local).
"""
from __future__ import annotations

import math
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from harvest.cache import Cache, chunk_hash, to_float32
from harvest.errors import PipelineError


@dataclass(frozen=True)
class Split:
    """Which chunks train and which are held out (the last ones, for validation and evaluation)."""

    train_chunks: tuple[int, ...]
    heldout_chunks: tuple[int, ...]

    @classmethod
    def of(cls, cache: Cache, val_fraction: float) -> "Split":
        n = cache.n_chunks
        held = max(1, math.ceil(n * val_fraction)) if val_fraction > 0 else 0  # at least the fraction
        if n - held < 1:
            raise PipelineError(f"cache {cache.location} has only {n} chunk(s): too small to hold out "
                                f"{val_fraction:.0%} for validation; harvest more tokens")
        return cls(tuple(range(n - held)), tuple(range(n - held, n)))


def keep_mask(cache: Cache, chunk: int, drop_token: int | None, skip_rows: np.ndarray | None) -> np.ndarray:
    """Which rows of a chunk an SAE sees: not at drop_token (BOS) positions, not in skip_rows
    (sorted row indices, as Cache.outliers gives them)."""
    r0, r1 = cache.row_range(chunk)
    keep = np.ones(r1 - r0, dtype=bool)
    if drop_token is not None:
        keep &= (cache.tokens[slice(*cache.seq_range(chunk))] != drop_token).reshape(-1)
    if skip_rows is not None:
        lo, hi = np.searchsorted(skip_rows, [r0, r1])
        keep[skip_rows[lo:hi] - r0] = False
    return keep


class ActivationStream:
    """An endless, deterministic stream of normalised float32 batches [batch, d] for some parts."""

    def __init__(self, cache: Cache, site: str, chunks: tuple[int, ...], batch_size: int, scale: float,
                 seed: int = 0, parts: int = 1, my_parts: tuple[int, ...] = (0,), shuffle_mb: float = 512,
                 read_threads: int = 4, device: str = "cpu", prefetch: int = 4, drop_token: int | None = None,
                 skip_rows: np.ndarray | None = None):
        if batch_size % parts:
            raise PipelineError(f"batch size {batch_size} is not divisible by the {parts} data parts (ranks)")
        self.cache, self.site, self.chunks = cache, site, tuple(chunks)
        self.arr = cache.activations(site)
        self.sums = cache.checksums[:]  # every chunk read is checked against its checksum
        self.verified: set[int] = set()
        self.col = 1 + cache.sites.index(site)
        self.local = batch_size // parts
        self.scale, self.seed, self.parts, self.my_parts = scale, seed, parts, tuple(my_parts)
        self.device, self.prefetch, self.read_threads = device, prefetch, read_threads
        self.drop_token = drop_token
        self.skip_rows = skip_rows
        # rows each chunk contributes: positions holding drop_token (BOS) and skip_rows are left out
        self.rows_in = {c: int(self._keep(c).sum()) for c in self.chunks}
        d = cache.d_model()
        chunk_rows = cache.chunk_seqs * cache.ctx_len
        self.window = max(1, int(shuffle_mb * 2**20 // (chunk_rows * d * self.arr.dtype.itemsize)))
        rows = [self._rows_of_part(p, 0) for p in range(parts)]
        self.batches_per_epoch = min(r // self.local for r in rows)
        if self.batches_per_epoch < 1:
            raise PipelineError(f"the training part of {cache.location} ({min(rows)} tokens per part) is smaller "
                                f"than one batch of {self.local}; harvest more tokens or lower the batch size")

    def _keep(self, c: int) -> np.ndarray:
        return keep_mask(self.cache, c, self.drop_token, self.skip_rows)

    def _epoch_chunks(self, epoch: int, part: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(np.array(self.chunks))
        return [int(c) for c in perm[part::self.parts]]

    def _rows_of_part(self, part: int, epoch: int) -> int:
        return sum(self.rows_in[c] for c in self._epoch_chunks(epoch, part))

    @property
    def epoch_tokens(self) -> int:
        return self.batches_per_epoch * self.local * self.parts

    def _read_window(self, chunks: list[int], pool: ThreadPoolExecutor) -> np.ndarray:
        def read(c: int) -> np.ndarray:
            r0, r1 = self.cache.row_range(c)
            block = self.arr[r0:r1]
            if c not in self.verified:  # each chunk is checked once per process
                if chunk_hash(block) != int(self.sums[c, self.col]):
                    raise PipelineError(f"chunk {c} of {self.site} in {self.cache.location} fails its checksum "
                                        "(corrupt cache); run `python -m harvest verify` on it")
                self.verified.add(c)
            return block[self._keep(c)]
        return np.concatenate(list(pool.map(read, chunks)))  # still in the storage dtype

    def _part_batches(self, part: int, start: int, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
        """Local batches of one part from global batch index `start` on, forever."""
        epoch, j = divmod(start, self.batches_per_epoch)
        while True:
            chunks = self._epoch_chunks(epoch, part)
            windows = [chunks[i:i + self.window] for i in range(0, len(chunks), self.window)]
            skip = j * self.local  # rows of this epoch already consumed
            carry = np.empty((0, self.arr.shape[1]), dtype=self.arr.dtype)
            emitted = j
            for w, wchunks in enumerate(windows):
                n_rows = sum(self.rows_in[c] for c in wchunks)
                if skip >= n_rows:  # whole window already consumed: don't read it
                    skip -= n_rows
                    continue
                rows = self._read_window(wchunks, pool)
                rows = rows[np.random.default_rng([self.seed, epoch, part, w]).permutation(len(rows))]
                rows, skip = rows[skip:], 0
                carry = np.concatenate([carry, rows]) if len(carry) else rows
                while len(carry) >= self.local and emitted < self.batches_per_epoch:
                    yield carry[:self.local]
                    carry = carry[self.local:]
                    emitted += 1
                if emitted >= self.batches_per_epoch:
                    break
            epoch, j = epoch + 1, 0

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Global-batch index `start` onward; reading, decoding and pinning run in a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.read_threads) as pool:
                    streams = [self._part_batches(p, start, pool) for p in self.my_parts]
                    while not stop.is_set():
                        x = np.concatenate([next(s) for s in streams]) if len(streams) > 1 else next(streams[0])
                        t = torch.from_numpy(to_float32(np.ascontiguousarray(x), self.cache.dtype)).mul_(self.scale)
                        if self.device.startswith("cuda"):
                            t = t.pin_memory()
                        q.put(t)
            except BaseException as e:  # surface reader errors in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while not q.empty():
                q.get_nowait()


def warn_epochs(tokens: int, epoch_tokens: int) -> None:
    if tokens > epoch_tokens:
        warnings.warn(f"the cache's training part holds {epoch_tokens:,} tokens per epoch; training on "
                      f"{tokens:,} tokens repeats it {tokens / epoch_tokens:.1f} times", stacklevel=2)


def heldout_rows(cache: Cache, site: str, split: Split, max_rows: int, scale: float = 1.0,
                 drop_token: int | None = None, skip_rows: np.ndarray | None = None) -> torch.Tensor:
    """Up to max_rows rows of the held-out chunks (float32, times scale), with the stream's exclusions."""
    if not split.heldout_chunks:
        raise PipelineError("no held-out chunks (val_fraction is 0)")
    parts, n = [], 0
    for c in split.heldout_chunks:  # read only as many chunks as max_rows needs
        rows = cache.read_rows(site, *cache.row_range(c))[keep_mask(cache, c, drop_token, skip_rows)]
        parts.append(rows)
        n += len(rows)
        if n >= max_rows:
            break
    x = np.concatenate(parts)[:max_rows]
    return torch.from_numpy(np.ascontiguousarray(x)).mul_(scale)
