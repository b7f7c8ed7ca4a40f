"""Batches from a cache: random chunk order, rows shuffled by index within a window, background reads.

Chunks that are files on this machine (a local cache, or chunks already in the read-through local
copy of a remote one) are memory-mapped: a batch gathers its rows straight from the page cache.
Other chunks go through Zarr's codec pipeline. Each chunk is checked against its checksum the first
time a process reads it (hashing the mapped pages is that read).

The stream is a pure function of (seed, epoch, part), so resuming needs only the number of batches
already consumed. With several data parts (one per rank under torchrun), part p of every epoch
reads chunks perm[p::parts]; a global batch is the concatenation of the parts' local batches, which
a single process can also build (parts > 1, all parts local).
"""
from __future__ import annotations

import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from batchtopk.cache.format import Cache, storage_numpy_dtype
from batchtopk.cache.split import Rows
from batchtopk.core.errors import PipelineError


class BufferPool:
    """Batch-sized arrays that are handed out again once nothing refers to them any more.

    A batch in fresh memory pays a page fault per 4 KiB page (a batch above glibc's 32 MiB mmap limit
    is fresh every time), which cost more than gathering and decoding together. A buffer is lent
    again only when no view of it is left: every numpy view (and every tensor made from one) holds a
    reference to the array that owns the memory, so its reference count says whether anything still
    uses it. A consumer may keep any batch it likes; it just gets new memory.
    """

    def __init__(self, size: int):
        self.size = size
        self.slots: list[np.ndarray] = []
        self.lock = threading.Lock()
        probe = [np.empty(0)]  # the count of a buffer only the pool holds, measured the way take() does
        self.idle = sys.getrefcount(probe[0])

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self.lock:
            free = [i for i in range(len(self.slots)) if sys.getrefcount(self.slots[i]) == self.idle]
            for i in free:
                if self.slots[i].shape == shape and self.slots[i].dtype == dtype:
                    return self.slots[i][...]
            base = np.empty(shape, dtype)
            if len(self.slots) < self.size:
                self.slots.append(base)
            elif free:  # a free buffer of another shape makes way
                self.slots[free[0]] = base
            return base[...]


def stage(x: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    """Stored rows as a tensor in their storage precision, on the device: on a GPU the (half-size)
    rows cross PCIe from pinned memory, asynchronously."""
    t = torch.from_numpy(x.view(np.int16) if dtype == "bfloat16" else x)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else t


def to_float(t: torch.Tensor, scale: float, pool: BufferPool) -> torch.Tensor:
    """float32 times scale, where the tensor is (on a GPU, decoded there; on the CPU into a buffer of
    `pool`)."""
    if t.device.type == "cpu":
        t = torch.from_numpy(pool.take(tuple(t.shape), np.dtype(np.float32))).copy_(t)
    else:
        t = t.float()
    return t.mul_(scale) if scale != 1.0 else t


class ChunkSource:
    """One site's chunks in their storage dtype, each verified against its checksum on first read."""

    def __init__(self, cache: Cache, site: str):
        self.cache, self.site = cache, site
        self.arr = cache.activations(site)
        self.col = 1 + cache.sites.index(site)
        self.rows_per_chunk = cache.chunk_seqs * cache.ctx_len
        self.dtype = storage_numpy_dtype(cache.dtype)
        self.verified: set[int] = set()

    def read(self, c: int) -> np.ndarray:
        block = self.cache.read_chunk(f"activations/{self.site}", c)
        if c not in self.verified:  # each chunk is checked once per process
            if self.cache.chunk_hash(block) != int(self.cache.read_chunk("checksums", c)[0, self.col]):
                raise PipelineError(f"chunk {c} of {self.site} in {self.cache.location} fails its checksum "
                                    "(corrupt cache); run `python -m harvest verify` on it")
            self.verified.add(c)
        return block


class ActivationStream:
    """An endless, deterministic stream of float32 batches [batch, d] (times `scale`) for some parts."""

    def __init__(self, rows: Rows, batch_size: int, scale: float,
                 seed: int = 0, parts: int = 1, my_parts: tuple[int, ...] = (0,), shuffle_mb: float = 512,
                 read_threads: int = 4, gather_threads: int = 2, device: str = "cpu", prefetch: int = 4):
        if batch_size % parts:
            raise PipelineError(f"batch size {batch_size} is not divisible by the {parts} data parts (ranks)")
        cache, site, split = rows.cache, rows.site, rows.split
        self.rows = rows
        self.cache, self.site, self.split, self.chunks = cache, site, split, split.train_chunks
        self.source = ChunkSource(cache, site)
        self.local = batch_size // parts
        self.scale, self.seed, self.parts, self.my_parts = scale, seed, parts, tuple(my_parts)
        self.device, self.prefetch = device, prefetch
        self.read_threads, self.gather_threads = read_threads, gather_threads
        # rows each chunk contributes (BOS positions and outlier rows left out), from the cache's counts;
        # an interleaved split's held-out rows overlap those, so its counts come from the masks
        counts = cache.chunk_counts()
        skip_col = 1 + cache.sites.index(site)
        self.rows_in = {}
        for c in self.chunks:
            r0, r1 = cache.row_range(c)
            self.rows_in[c] = (int(self._keep(c).sum()) if split.every else
                               r1 - r0 - (int(counts[c, 0]) if not rows.include_bos else 0)
                               - (int(counts[c, skip_col]) if not rows.include_outliers else 0))
        d = cache.d_model()
        self.window = max(1, int(shuffle_mb * 2**20 // (self.source.rows_per_chunk * d * self.source.dtype.itemsize)))
        rows = [self._rows_of_part(p, 0) for p in range(parts)]
        self.batches_per_epoch = min(r // self.local for r in rows)
        if self.batches_per_epoch < 1:
            raise PipelineError(f"the training part of {cache.location} ({min(rows)} tokens per part) is smaller "
                                f"than one batch of {self.local}; harvest more tokens or lower the batch size")

    def _keep(self, c: int) -> np.ndarray:
        return self.rows.mask(c, "train")

    def _epoch_chunks(self, epoch: int, part: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(np.array(self.chunks))
        return [int(c) for c in perm[part::self.parts]]

    def _rows_of_part(self, part: int, epoch: int) -> int:
        return sum(self.rows_in[c] for c in self._epoch_chunks(epoch, part))

    @property
    def epoch_tokens(self) -> int:
        return self.batches_per_epoch * self.local * self.parts

    def _open_window(self, chunks: list[int], pool: ThreadPoolExecutor, blocks: dict[int, np.ndarray]) -> np.ndarray:
        """Map (or read) a window's chunks into `blocks`; return the global ids of the rows it keeps."""
        def open_one(c: int) -> np.ndarray:
            blocks[c] = self.source.read(c)
            return self.cache.row_range(c)[0] + np.flatnonzero(self._keep(c))
        return np.concatenate(list(pool.map(open_one, chunks)))

    def _gather(self, ids: np.ndarray, blocks: dict[int, np.ndarray], out: np.ndarray) -> None:
        """The rows of a batch from the open chunks into `out` (in the storage dtype), in increasing id
        order: a batch is a set of rows, and taking each chunk's rows together, in file order, is what
        lets the gather run at memory speed."""
        ids = np.sort(ids)
        per = self.source.rows_per_chunk
        chunk = ids // per
        cuts = np.flatnonzero(np.diff(chunk)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
            c = int(chunk[a])
            # mode="clip": the indices are in range by construction, and the default ("raise") would
            # gather through a temporary copy, 3-4x slower
            np.take(blocks[c], ids[a:b] - c * per, axis=0, out=out[a:b], mode="clip")

    def _part_batches(self, part: int, start: int, pool: ThreadPoolExecutor
                      ) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
        """Local batches of one part from global batch index `start` on, forever: each as the row ids
        it takes and the open chunks they lie in (gathered later, in parallel)."""
        epoch, j = divmod(start, self.batches_per_epoch)
        while True:
            chunks = self._epoch_chunks(epoch, part)
            windows = [chunks[i:i + self.window] for i in range(0, len(chunks), self.window)]
            skip = j * self.local  # rows of this epoch already consumed
            carry = np.empty(0, dtype=np.int64)
            blocks: dict[int, np.ndarray] = {}
            emitted = j
            for w, wchunks in enumerate(windows):
                n_rows = sum(self.rows_in[c] for c in wchunks)
                if skip >= n_rows:  # whole window already consumed: don't read it
                    skip -= n_rows
                    continue
                live = set(np.unique(carry // self.source.rows_per_chunk).tolist())  # chunks the carry still needs
                blocks = {c: b for c, b in blocks.items() if c in live}
                ids = self._open_window(wchunks, pool, blocks)
                ids = ids[np.random.default_rng([self.seed, epoch, part, w]).permutation(len(ids))]
                ids, skip = ids[skip:], 0
                carry = np.concatenate([carry, ids])
                while len(carry) >= self.local and emitted < self.batches_per_epoch:
                    yield carry[:self.local], dict(blocks)
                    carry = carry[self.local:]
                    emitted += 1
                if emitted >= self.batches_per_epoch:
                    break
            epoch, j = epoch + 1, 0

    def device_batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """The same batches as `batches` (the same rows in the same order), gathered on the training device
        from whole chunks copied there once per window (DeviceWindow): what keeps a GPU fed. Chunks are
        opened `read_threads` at a time in the background, one window ahead."""
        dtype = self.cache.dtype

        def fill(put: Callable[[Any], None], stop: threading.Event) -> None:
            with ThreadPoolExecutor(self.read_threads) as pool:
                streams = [self._part_batches(p, start, pool) for p in self.my_parts]
                while not stop.is_set():
                    put([next(s) for s in streams])

        windows = [DeviceWindow(self.source, 2 * self.window + 1, self.device) for _ in self.my_parts]
        for item in _background(fill, self.prefetch):
            xs = []
            for w, (ids, blocks) in zip(windows, item):
                w.hold(blocks)
                xs.append(w.gather(np.sort(ids)))
            x = torch.cat(xs) if len(xs) > 1 else xs[0]
            if dtype == "bfloat16":
                x = x.view(torch.bfloat16)
            x = x.float()
            yield x.mul_(self.scale) if self.scale != 1.0 else x

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Global-batch index `start` onward, on the stream's device: gathered there on a GPU
        (`device_batches`), gathered on the host otherwise (`host_batches`); the same rows either way."""
        return self.device_batches(start) if self.device.startswith("cuda") else self.host_batches(start)

    def host_batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Global-batch index `start` onward. A background thread walks the chunks (opening and checking
        them with `read_threads`); `gather_threads` workers gather batches at once (and move them to
        the GPU); each is decoded to float32 as it is handed out, in order. Decoding in the consumer's
        thread keeps torch's CPU thread pool to one team: a team per worker would spin on the cores
        the training step needs."""
        dtype = self.cache.dtype
        shape = (self.local * len(self.my_parts), self.source.arr.shape[1])
        # stored rows: the queue, the workers' batches and one being decoded; float32: a few in use
        stored, decoded = BufferPool(self.prefetch + self.gather_threads + 2), BufferPool(4)

        def batch(parts: list[tuple[np.ndarray, dict[int, np.ndarray]]]) -> torch.Tensor:  # in a worker
            x = stored.take(shape, self.source.dtype)
            for i, p in enumerate(parts):
                self._gather(*p, out=x[i * self.local:(i + 1) * self.local])
            return stage(x, dtype, self.device)

        def fill(put: Callable[[Any], None], stop: threading.Event) -> None:
            with ThreadPoolExecutor(self.read_threads) as pool, ThreadPoolExecutor(self.gather_threads) as work:
                streams = [self._part_batches(p, start, pool) for p in self.my_parts]
                while not stop.is_set():
                    put(work.submit(batch, [next(s) for s in streams]))

        for item in _background(fill, self.prefetch):
            yield to_float(item.result(), self.scale, decoded)


def _background(fill: Callable[[Callable[[Any], None], threading.Event], None], prefetch: int) -> Iterator[Any]:
    """The items a producer thread puts (`fill(put, stop)`), in order, at most `prefetch` ahead; its error
    is raised here. On close the producer is stopped and waited for: no read or gather may touch a
    chunk's memory map after close."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def run() -> None:
        try:
            fill(q.put, stop)
        except BaseException as e:  # surface reader errors in the consumer
            q.put(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            while not q.empty():
                q.get_nowait()
            thread.join(timeout=0.01)


class DeviceWindow:
    """A part's open chunks, whole, in one buffer on the training device: each chunk is read once per
    window (verified by its checksum on its first read), staged through pinned memory and copied
    asynchronously into a free slot; a batch is then one gather by index on the device."""

    def __init__(self, source: ChunkSource, slots: int, device: str):
        self.source, self.device = source, torch.device(device)
        rpc, d = source.rows_per_chunk, source.arr.shape[1]
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(
            source.dtype, torch.int16)  # bfloat16 is stored as its bits
        self.buffer = torch.empty(slots * rpc, d, dtype=dtype, device=self.device)
        cuda = self.device.type == "cuda"
        self.staging = [torch.empty(rpc, d, dtype=dtype, pin_memory=cuda) for _ in range(slots)] if cuda else None
        self.copied = [None] * slots  # the CUDA event of each slot's last copy (its staging buffer is busy till then)
        self.slot_of: dict[int, int] = {}
        self.lookup = np.full(max(source.cache.n_chunks, 1), -1, dtype=np.int64)  # chunk -> slot

    def hold(self, blocks: dict[int, np.ndarray]) -> None:
        """Make these chunks resident, reusing the slots of chunks no longer needed."""
        for c in [c for c in self.slot_of if c not in blocks]:
            self.lookup[c] = -1
            del self.slot_of[c]
        free = sorted(set(range(len(self.copied))) - set(self.slot_of.values()))
        rpc = self.source.rows_per_chunk
        for c in blocks:
            if c in self.slot_of:
                continue
            slot = free.pop(0)
            block = blocks[c].view(np.int16) if blocks[c].dtype == np.uint16 else blocks[c]
            dst = self.buffer[slot * rpc:(slot + 1) * rpc]
            if self.staging is not None:
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()
                self.staging[slot].numpy()[: len(block)] = block  # into pinned memory, then across PCIe
                dst.copy_(self.staging[slot], non_blocking=True)
                self.copied[slot] = torch.cuda.Event()
                self.copied[slot].record()
            else:
                dst.numpy()[: len(block)] = block
            self.slot_of[c] = slot
            self.lookup[c] = slot

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """The rows `ids` (global row ids, in increasing order), as stored, on the device."""
        rpc = self.source.rows_per_chunk
        chunk = ids // rpc
        rows = self.lookup[chunk] * rpc + (ids - chunk * rpc)
        index = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return self.buffer.index_select(0, index)


def warn_epochs(tokens: int, epoch_tokens: int) -> None:
    if tokens > epoch_tokens:
        warnings.warn(f"the cache's training part holds {epoch_tokens:,} tokens per epoch; training on "
                      f"{tokens:,} tokens repeats it {tokens / epoch_tokens:.1f} times", stacklevel=2)


