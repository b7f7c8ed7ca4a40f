"""The activation cache: one Zarr v3 group per harvest (layout in README and CONTRACT).

    tokens                   int32  [n_sequences, ctx_len]
    activations/<site>       f16|f32|u16(bf16 bits) [n_sequences*ctx_len, d_model]
    checksums                uint64 [n_chunks, 1 + n_sites]  xxh3-64 of each chunk's bytes (blake2b-64
                                    in caches whose manifest names no `checksum_algorithm`)
                                    (column 0 tokens, then one per site; 0 = not written yet)

Chunks run along tokens and hold `chunk_seqs` whole sequences, so chunk i of every array
covers sequences [i*chunk_seqs, (i+1)*chunk_seqs). A checksum row is written after its
chunks, so it doubles as the "done" mark that resume relies on; `complete: true` in the
group attributes is written last of all.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from batchtopk.core.errors import PipelineError

from . import store

FORMAT = "batchtopk-activation-cache"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
OUTLIER_RATIO = 10.0      # a non-BOS row whose norm exceeds this many times the mean norm is an outlier
MAX_OUTLIERS = 1_000_000  # listed in the manifest up to this many
CHECKSUM = "xxh3-64"             # what new caches hash their chunks with (manifest: checksum_algorithm)
LEGACY_CHECKSUM = "blake2b-64"   # what caches made before that key existed used
_HASHES = {
    "xxh3-64": xxhash.xxh3_64_intdigest,
    "blake2b-64": lambda data: int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"),
}


def chunk_hash(block: np.ndarray, algorithm: str = CHECKSUM) -> int:
    """The 64-bit hash of a chunk's C-order bytes, never 0 (0 marks an unwritten chunk). Hashes the
    array's own buffer (a memory map's pages are read once, no copy). xxh3 runs at memory speed
    (~25 GB/s a core here, against 0.56 GB/s for blake2b), so checking a chunk costs little more
    than reading it. `algorithm` is one of _HASHES (Cache.checksum_algorithm checks a manifest's)."""
    data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    return _HASHES[algorithm](data) or 1


def to_float32(block: np.ndarray, dtype: str) -> np.ndarray:
    """Decode stored activations to float32 (bfloat16 is stored as its uint16 bits)."""
    if dtype == "bfloat16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32, copy=False)


def to_storage(t, dtype: str) -> np.ndarray:
    """Encode a torch tensor for storage: float16, float32, or bfloat16 as its uint16 bits."""
    import torch

    t = t.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]).cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def _as_arrays(d: dict[str, Any]) -> dict[str, Any]:
    """Statistics from the manifest with their per-dimension lists as float64 arrays."""
    return {k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v) for k, v in d.items()}


def storage_numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype({"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[dtype])


@dataclass
class Cache:
    """A cache opened for reading (or by the harvester for writing)."""

    location: str
    group: Any  # zarr.Group
    local_dir: Path | None = None  # where its objects are files: the cache itself, or its local copy
    _layouts: dict[str, Any] = field(default_factory=dict, repr=False)  # array name -> raw-chunk metadata

    @classmethod
    def open(cls, location: str, mode: str = "r", need_complete: bool = True, local_copy: str | None = None) -> Cache:
        """Open a cache; `local_copy` keeps a read-through copy of what is read from a URL there."""
        location = store.normalize(location)
        if not store.exists(location):
            raise PipelineError(f"no cache at {location} (run `make harvest` first, or check the path/URL)")
        local = (Path(location) if not store.is_url(location)
                 else store.local_copy_dir(location, local_copy) if local_copy else None)
        c = cls(location, store.open_group(location, mode, local_copy=local_copy), local)
        if c.attrs.get("format") != FORMAT:
            raise PipelineError(f"{location} is a Zarr group but not an activation cache (no '{FORMAT}' manifest)")
        if need_complete and not c.complete:
            raise PipelineError(f"cache {location} is incomplete (its harvest was interrupted); "
                                "rerun the same `make harvest` to finish it")
        return c

    # ------------------------------------------------------------ manifest
    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def checksum_algorithm(self) -> str:
        algorithm = self.attrs.get("checksum_algorithm", LEGACY_CHECKSUM)
        if algorithm not in _HASHES:
            raise PipelineError(f"{self.location} names checksum algorithm {algorithm!r}; this version knows "
                                f"{', '.join(_HASHES)} (upgrade to read it)")
        return algorithm

    def chunk_hash(self, block: np.ndarray) -> int:
        """A chunk's hash with the algorithm this cache's checksums were written with."""
        return chunk_hash(block, self.checksum_algorithm)

    @property
    def sites(self) -> list[str]:
        return list(self.attrs["sites"])

    @property
    def ctx_len(self) -> int:
        return int(self.attrs["ctx_len"])

    @property
    def n_sequences(self) -> int:
        return int(self.attrs["n_sequences"])

    @property
    def chunk_seqs(self) -> int:
        return int(self.attrs["chunk_seqs"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_sequences // self.chunk_seqs)

    @property
    def dtype(self) -> str:
        return self.attrs["dtype"]

    @property
    def nbytes(self) -> int:
        """The bytes of every array's chunk objects (stored uncompressed, an edge chunk whole: the cache's size on
        disk but for its metadata files; a partial cache's once complete), from the arrays' metadata alone: no
        object is listed."""
        names = ["tokens", "checksums", "chunk_counts", *(f"activations/{s}" for s in self.sites)]
        arrays = [self.group[n] for n in names if n in self.group]  # (a partial cache: the arrays made so far)
        return int(sum(a.nchunks * math.prod(a.chunks) * a.dtype.itemsize for a in arrays))

    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    def stats(self, site: str) -> dict[str, np.ndarray | float]:
        s = self.attrs.get("stats", {}).get(site)
        if s is None:
            raise PipelineError(f"cache {self.location} has no statistics for {site} (incomplete harvest?)")
        return _as_arrays(s)

    def train_stats(self, site: str, include_bos: bool) -> dict[str, Any]:
        """Statistics of the tokens an SAE sees: all, or non-BOS positions only."""
        st = self.stats(site)
        if include_bos or "non_bos" not in st:
            return st
        return _as_arrays(st["non_bos"])

    def outliers(self, site: str) -> tuple[np.ndarray, float | None]:
        """(sorted row indices of massive-activation rows, their norm threshold) of a site."""
        o = self.attrs.get("stats", {}).get(site, {}).get("outliers")
        if not o:
            return np.empty(0, dtype=np.int64), None
        return np.asarray(o["rows"], dtype=np.int64), float(o["norm_above"])

    def check_site(self, site: str) -> None:
        if site not in self.sites:
            raise PipelineError(f"cache {self.location} has no site {site}; it holds: {', '.join(self.sites)}")

    # ------------------------------------------------------------ arrays
    @property
    def tokens(self):
        return self.group["tokens"]

    def activations(self, site: str):
        self.check_site(site)
        return self.group[f"activations/{site}"]

    @property
    def checksums(self):
        return self.group["checksums"]

    def seq_range(self, chunk: int) -> tuple[int, int]:
        s0 = chunk * self.chunk_seqs
        return s0, min(s0 + self.chunk_seqs, self.n_sequences)

    def row_range(self, chunk: int) -> tuple[int, int]:
        s0, s1 = self.seq_range(chunk)
        return s0 * self.ctx_len, s1 * self.ctx_len

    def read_rows(self, site: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a site as float32."""
        return to_float32(self.activations(site)[r0:r1], self.dtype)

    def array_chunk_file(self, name: str, chunk: int) -> Path | None:
        """The file holding chunk `chunk` (along the first axis) of array `name` (`tokens`, `checksums`,
        `activations/<site>`) as raw little-endian values of the full chunk shape, when there is one on
        this machine: a local cache's, or one already in the read-through local copy."""
        if self.local_dir is None:
            return None
        if name not in self._layouts:  # reading an array's metadata costs a file read: once per array
            meta = self.group[name].metadata
            raw = [c.to_dict()["name"] for c in meta.codecs] == ["bytes"] and (
                meta.data_type.to_native_dtype().itemsize == 1 or meta.codecs[0].endian is None
                or meta.codecs[0].endian.value == "little")
            self._layouts[name] = meta if raw else None  # compressed or big-endian: the codec pipeline
        meta = self._layouts[name]
        if meta is None:
            return None
        p = self.local_dir / name / meta.encode_chunk_key((chunk,) + (0,) * (len(meta.shape) - 1))
        return p if p.is_file() else None

    def chunk_file(self, site: str, chunk: int) -> Path | None:
        """The file of a chunk of a site's activations (see array_chunk_file)."""
        self.check_site(site)
        return self.array_chunk_file(f"activations/{site}", chunk)

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Chunk `chunk` of array `name` in its stored dtype, cut to the array's extent: memory-mapped
        from its file when there is one on this machine (no copy; pages are read when touched),
        through Zarr's codecs otherwise."""
        path = self.array_chunk_file(name, chunk)
        if path is None:
            arr = self.group[name]
            c0 = arr.chunks[0]
            return arr[chunk * c0:(chunk + 1) * c0]
        meta = self._layouts[name]
        c0, shape = meta.chunk_grid.chunk_shape[0], meta.chunk_grid.chunk_shape
        dtype = meta.data_type.to_native_dtype().newbyteorder("<")
        with open(path, "rb") as f:  # the map outlives the file object
            size, want = os.fstat(f.fileno()).st_size, int(np.prod(shape)) * dtype.itemsize
            if size != want:
                raise PipelineError(f"chunk {chunk} of {name} in {self.location} is {size} bytes, not the "
                                    f"{want} its shape needs (corrupt cache); "
                                    "run `python -m harvest verify` on it")
            block = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype).reshape(shape)
        return block[:max(0, min(c0, meta.shape[0] - chunk * c0))]

    def gather_rows(self, site: str, ids: np.ndarray) -> np.ndarray:
        """Rows of a site by (sorted) global row id, as float32: from memory-mapped chunk files where
        there are some, through Zarr otherwise."""
        arr = self.activations(site)
        per = self.chunk_seqs * self.ctx_len
        out = np.empty((len(ids), arr.shape[1]), dtype=np.float32)
        chunk = ids // per
        starts = np.flatnonzero(np.r_[True, np.diff(chunk) != 0]) if len(ids) else []
        for a, b in zip(starts, list(starts[1:]) + [len(ids)]):
            c = int(chunk[a])
            if self.chunk_file(site, c) is not None:
                out[a:b] = to_float32(self.read_chunk(f"activations/{site}", c)[ids[a:b] - c * per], self.dtype)
            else:
                out[a:b] = to_float32(arr.get_orthogonal_selection((ids[a:b], slice(None))), self.dtype)
        return out

    def chunk_counts(self) -> np.ndarray:
        """[n_chunks, 1 + n_sites] int64: per chunk, the BOS positions and each site's massive-activation
        rows (Cache.outliers), so a reader knows how many rows it keeps without reading any chunk.

        Written by the harvest; for caches made before that, computed once from the tokens and kept
        in a local index beside the data directory (the cache itself is never written by readers).
        """
        if "chunk_counts" in self.group:
            return np.asarray(self.group["chunk_counts"][:], dtype=np.int64)
        from batchtopk.core.pipelines import DATA_DIR

        path = DATA_DIR / "cache-index" / f"{self.attrs['cache_id']}.chunk_counts.npy"
        if path.exists():
            return np.load(path)
        counts = compute_chunk_counts(self.tokens, self.chunk_seqs,
                                      [self.outliers(s)[0] for s in self.sites])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, counts)
        tmp.replace(path)
        return counts

    def done_chunks(self) -> np.ndarray:
        """Boolean mask of chunks whose every array is written (their checksum row is full)."""
        return np.all(self.checksums[:] != 0, axis=1)

    # ------------------------------------------------------------ integrity
    def verify(self, workers: int = 4) -> list[str]:
        """Re-hash every chunk; return one line per problem (empty list: all good)."""
        sums = self.checksums[:]
        algorithm = self.checksum_algorithm  # one this version does not know is one error, not one per chunk
        arrays = [("tokens", self.tokens, False)] + [(s, self.activations(s), True) for s in self.sites]

        def check(i: int) -> list[str]:
            problems = []
            for col, (name, arr, is_act) in enumerate(arrays):
                expect = int(sums[i, col])
                if expect == 0:
                    problems.append(f"chunk {i} of {name}: never written")
                    continue
                r0, r1 = self.row_range(i) if is_act else self.seq_range(i)
                try:
                    got = chunk_hash(arr[r0:r1], algorithm)
                except Exception as e:  # undecodable chunk bytes
                    problems.append(f"chunk {i} of {name}: unreadable ({type(e).__name__})")
                    continue
                if got != expect:
                    problems.append(f"chunk {i} of {name}: checksum mismatch (rows {r0}..{r1 - 1})")
            return problems

        with ThreadPoolExecutor(workers) as pool:
            return [p for ps in pool.map(check, range(self.n_chunks)) for p in ps]


def compute_stats(arr, dtype: str, tokens=None) -> dict[str, Any]:
    """Out-of-core statistics of one site with dask: mean, E[x^2], max |x| per dimension, mean norm.

    With `tokens` (the cache's token array), the same statistics over non-BOS positions go
    under "non_bos" (BOS = tokens[0, 0]; its residual is often huge and constant).
    """
    import dask
    import dask.array as da

    x = da.from_zarr(arr).map_blocks(to_float32, dtype, dtype=np.float32).astype(np.float64)
    sq = (x ** 2).sum(axis=1)
    todo = {"sum": x.sum(axis=0), "sum_sq": (x ** 2).sum(axis=0), "abs_max": abs(x).max(axis=0),
            "sum_norm": da.sqrt(sq).sum(), "sum_sq_norm": sq.sum()}
    if tokens is not None:
        bos = int(tokens[0, 0])
        w = (da.from_zarr(tokens).reshape(-1).rechunk(x.chunks[0]) != bos).astype(np.float64)
        todo.update(nb_n=w.sum(), nb_sum=(x * w[:, None]).sum(axis=0), nb_sum_sq=((x ** 2) * w[:, None]).sum(axis=0),
                    nb_sum_norm=(da.sqrt(sq) * w).sum(), nb_sum_sq_norm=(sq * w).sum())
    with dask.config.set(scheduler="threads"):
        r = dict(zip(todo, dask.compute(*todo.values())))

    def summary(n, s, s2, snorm, s2norm) -> dict[str, Any]:
        mean = s / n
        return {"n": int(n), "mean": mean.tolist(), "mean_sq": (s2 / n).tolist(), "mean_norm": float(snorm / n),
                # E||x - mean||^2: the NMSE denominator per token
                "mean_centered_sq_norm": float(s2norm / n - float((mean ** 2).sum()))}

    out = summary(arr.shape[0], r["sum"], r["sum_sq"], r["sum_norm"], r["sum_sq_norm"])
    out["abs_max"] = r["abs_max"].tolist()
    if tokens is not None and r["nb_n"] > 0:
        out["non_bos"] = summary(r["nb_n"], r["nb_sum"], r["nb_sum_sq"], r["nb_sum_norm"], r["nb_sum_sq_norm"])
        out["bos_token"] = bos
        # "Massive activations" (attention-sink tokens): rare non-BOS rows far above the typical norm.
        threshold = OUTLIER_RATIO * out["non_bos"]["mean_norm"]
        with dask.config.set(scheduler="threads"):
            rows = da.flatnonzero((da.sqrt(sq) > threshold) & (w > 0)).compute()
        out["outliers"] = {"ratio": OUTLIER_RATIO, "norm_above": threshold, "rows": rows[:MAX_OUTLIERS].tolist()}
    return out


COUNT_BLOCK_CHUNKS = 4096  # compute_chunk_counts reads the tokens this many chunks at a time (bounded memory)


def compute_chunk_counts(tokens, chunk_seqs: int, outlier_rows: list[np.ndarray],
                         block_chunks: int = COUNT_BLOCK_CHUNKS) -> np.ndarray:
    """Per chunk: positions holding the BOS token (tokens[0, 0]), then each site's outlier rows. tokens: the
    [n_seq, ctx] array (numpy or zarr), read block_chunks chunks at a time, never whole."""
    n_seq, ctx = tokens.shape
    n_chunks = -(-n_seq // chunk_seqs)
    counts = np.zeros((n_chunks, 1 + len(outlier_rows)), dtype=np.int64)
    if n_seq:
        bos = np.asarray(tokens[0, 0])
        step = chunk_seqs * block_chunks
        for a in range(0, n_seq, step):
            per_seq = (np.asarray(tokens[a:a + step]) == bos).sum(1)
            first = a // chunk_seqs
            sums = np.add.reduceat(per_seq, np.arange(0, len(per_seq), chunk_seqs))
            counts[first:first + len(sums), 0] = sums
    rows_per_chunk = chunk_seqs * ctx
    for j, rows in enumerate(outlier_rows):
        counts[:, 1 + j] = np.bincount(np.asarray(rows, dtype=np.int64) // rows_per_chunk, minlength=n_chunks)
    return counts


def write_chunk_counts(group, counts: np.ndarray) -> None:
    """The `chunk_counts` array of a cache (see Cache.chunk_counts)."""
    if "chunk_counts" in group:
        del group["chunk_counts"]
    rows = max(1, min(len(counts), 65536))
    a = group.create_array("chunk_counts", shape=counts.shape, chunks=(rows, counts.shape[1]),
                           dtype="int64", compressors=None, fill_value=0)
    a[:] = counts


def synthetic_tokens(n_seq: int, ctx_len: int = 128, bos: int = 0) -> np.ndarray:
    """Token ids for synthetic caches: BOS at position 0, an ordinary id elsewhere."""
    t = np.ones((n_seq, ctx_len), dtype=np.int32)
    t[:, 0] = bos
    return t


def write_cache(location: str, tokens: np.ndarray, activations: dict[str, np.ndarray], dtype: str = "float32",
                chunk_seqs: int = 16, **manifest: Any) -> Cache:
    """Write a complete cache from in-memory arrays (activations computed elsewhere, synthetic data).

    tokens [n_seq, ctx_len]; activations {site: [n_seq*ctx_len, d]} float32. `manifest` adds or
    overrides attributes (model, dataset, ...). Harvests use harvest.run instead, which streams.
    """
    import json as _json

    from . import store as _store

    n_seq, ctx_len = tokens.shape
    sites = list(activations)
    d = next(iter(activations.values())).shape[1]
    settings = {"imported": True, "sites": sites, "ctx_len": ctx_len, "n_sequences": n_seq, "dtype": dtype,
                **{k: v for k, v in manifest.items() if isinstance(v, (str, int, float))}}
    cache_id = hashlib.sha256(_json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    group = _store.open_group(location, mode="w")
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "cache_id": cache_id, "settings": settings,
             "model": "imported", "dataset": {"dataset": "imported"}, "sites": sites, "layers": [],
             "d_model": d, "ctx_len": ctx_len, "dtype": dtype, "chunk_seqs": chunk_seqs, "n_sequences": n_seq,
             "n_tokens": n_seq * ctx_len, "checksum_algorithm": CHECKSUM, "complete": False, "tokens_complete": True,
             **manifest}
    group.attrs.put(attrs)
    t = group.create_array("tokens", shape=tokens.shape, chunks=(chunk_seqs, ctx_len), dtype="int32",
                           compressors=None, fill_value=0)
    t[:] = tokens.astype(np.int32)
    n_chunks = -(-n_seq // chunk_seqs)
    sums = np.zeros((n_chunks, 1 + len(sites)), dtype=np.uint64)
    rows = chunk_seqs * ctx_len
    for j, site in enumerate(sites):
        import torch

        stored = to_storage(torch.from_numpy(np.ascontiguousarray(activations[site], dtype=np.float32)), dtype)
        a = group.create_array(f"activations/{site}", shape=stored.shape, chunks=(rows, d),
                               dtype=storage_numpy_dtype(dtype), compressors=None, fill_value=0,
                               attributes={"dtype": dtype, "site": site})
        a[:] = stored
        for i in range(n_chunks):
            sums[i, 1 + j] = chunk_hash(stored[i * rows:(i + 1) * rows])
    for i in range(n_chunks):
        sums[i, 0] = chunk_hash(tokens[i * chunk_seqs:(i + 1) * chunk_seqs].astype(np.int32))
    s = group.create_array("checksums", shape=sums.shape, chunks=(1, sums.shape[1]), dtype="uint64",
                           compressors=None, fill_value=0)
    s[:] = sums
    stats = {site: compute_stats(group[f"activations/{site}"], dtype, group["tokens"]) for site in sites}
    outliers = [np.asarray(stats[s].get("outliers", {}).get("rows", []), dtype=np.int64) for s in sites]
    write_chunk_counts(group, compute_chunk_counts(tokens.astype(np.int32), chunk_seqs, outliers))
    group.attrs.update({"stats": stats, "complete": True})
    return Cache.open(location)
