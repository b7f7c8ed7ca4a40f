"""The harvest itself: settings -> cache id -> tokens -> activations -> statistics -> complete."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from batchtopk.cache import store
from batchtopk.cache.format import (
    CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    Cache,
    chunk_hash,
    compute_chunk_counts,
    compute_stats,
    storage_numpy_dtype,
    to_float32,
    to_storage,
    write_chunk_counts,
)
from batchtopk.core import distributed
from batchtopk.core.errors import PipelineError
from batchtopk.core.pipelines import DATA_DIR

from . import __version__, models
from .corpus import CorpusSpec, iter_contexts, iter_texts, resolve_corpus
from .settings import HarvestSettings

WAIT_POLL_S = 3.0


@dataclass
class Plan:
    """Everything resolved from the settings, before any heavy work."""

    settings: HarvestSettings
    model: models.ModelSpec
    corpus: CorpusSpec
    config: Any
    sites: list[str]
    torch_dtype: torch.dtype
    device: str
    identity: dict[str, Any]
    cache_id: str
    location: str


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s.split("/")[-1]).strip("-").lower()


def plan(s: HarvestSettings) -> Plan:
    if s.dtype not in STORAGE_DTYPES:
        raise PipelineError(f"unknown storage dtype {s.dtype!r}; allowed: {', '.join(STORAGE_DTYPES)}")
    if s.tokens is not None and s.tokens < s.ctx_len:
        raise PipelineError(f"tokens={s.tokens} is less than one context of ctx_len={s.ctx_len}; "
                            "ask for at least ctx_len tokens, or 'all'")
    if s.ctx_len < 2:
        raise PipelineError(f"ctx_len={s.ctx_len} is too short; use at least 2 (BOS + one token)")
    if s.batch_size < 1:
        raise PipelineError(f"batch_size={s.batch_size}; use a positive number of sequences")
    spec = models.resolve_model(s.model, s.model_revision)
    corpus = resolve_corpus(s.dataset, s.dataset_config, s.split, s.text_column, s.dataset_revision,
                            s.separator, s.dataset_fallback)
    config = models.load_config(spec)
    if s.sites:
        sites = list(s.sites)
        models.check_sites(sites, config)
    else:
        layers = s.layers if s.layers is not None else [spec.default_layer if spec.default_layer is not None
                                                        else models.n_layers(config) // 2]
        sites = models.build_sites(layers, s.site_kinds, config)
    maxpos = models.max_positions(config)
    if maxpos and s.ctx_len > maxpos:
        raise PipelineError(f"ctx_len={s.ctx_len} exceeds the model's maximum context of {maxpos} tokens")
    device = s.device or distributed.init_from_env()[2]  # torchrun: the process group is up before this
    torch_dtype = models.resolve_dtype(s.model_dtype, device)
    identity = {
        "format_version": FORMAT_VERSION,
        "model": spec.identity(),
        "model_dtype": str(torch_dtype).removeprefix("torch."),
        "sites": sites,
        "dataset": corpus.identity(),
        "ctx_len": s.ctx_len,
        "tokens": s.tokens if s.tokens is not None else "all",
        "dtype": s.dtype,
    }
    cache_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    layers_tag = "-".join(sorted({f"L{models.parse_site(x)[0]}" for x in sites}))
    name = f"{_slug(spec.name)}-{layers_tag}-{_slug(corpus.name)}-{cache_id}"
    location = store.normalize(s.out) if s.out else store.join(s.cache_root, name)
    return Plan(s, spec, corpus, config, sites, torch_dtype, device, identity, cache_id, location)


def _code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=DATA_DIR.parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ entry point
def harvest(s: HarvestSettings) -> str:
    """Make sure the cache for these settings exists and is complete; return its location.

    Under torchrun each rank computes chunks i with i % world == rank; rank 0 tokenises,
    holds the writer lock and completes the manifest once every rank is done.
    """
    distributed.init_from_env()
    p = plan(s)
    rank, world = distributed.world()
    decision = None
    lock = None
    if rank == 0:
        decision, lock = _claim(p)
    decision = distributed.broadcast(decision)
    if decision == "complete":
        return p.location
    try:
        if rank == 0:
            prepare_tokens(p)
        distributed.barrier()
        cache = Cache.open(p.location, mode="r+", need_complete=False)
        harvest_activations(p, cache, rank, world, lock)
        distributed.barrier()
        if rank == 0:
            _finish(p, cache)
        distributed.barrier()
    finally:
        if lock is not None:
            lock.release()
    return p.location


def _existing(p: Plan, strict: bool = True) -> Cache | None:
    """The cache already at the location (complete or not), or None; with `strict`, a location holding
    something that is not a cache is refused (without it, that may be another writer's first files)."""
    if not store.exists(p.location):
        if not strict:
            return None
        fs, path = store.filesystem(p.location)
        with store.remote_errors(p.location):
            others = [x for x in (fs.ls(path, detail=False) if fs.isdir(path) else [])
                      if not store.is_lock_file(x)]
        if others:
            raise PipelineError(f"{p.location} exists and is not a cache; refusing to write into it: "
                                "choose an empty or new location")
        return None
    try:
        c = Cache.open(p.location, mode="r", need_complete=False)
    except PipelineError:
        if strict:
            raise
        return None  # a group whose metadata another writer has not written yet
    if not strict and c.attrs.get("settings") is None:
        return None
    if c.attrs.get("settings") != p.identity:
        raise PipelineError(f"{p.location} already holds a cache with different settings (id "
                            f"{c.attrs.get('cache_id')}, not {p.cache_id}); refusing to overwrite it: "
                            "choose another location or remove it yourself")
    return c


def _claim(p: Plan) -> tuple[str, store.WriterLock | None]:
    """Return ('complete', None) when there is nothing to do, else ('write', lock) holding the lock."""
    waited = False
    while True:
        # before the lock, files without a cache's metadata may be another writer's first ones: not an error yet
        c = _existing(p, strict=False)
        if c is not None and c.complete:
            if waited:
                log(f"another writer finished {p.location}; reusing it")
            return "complete", None
        lock = store.WriterLock(p.location)
        if lock.try_acquire():
            try:
                c = _existing(p)  # it may have completed between our check and the lock
            except BaseException:
                lock.release()
                raise
            if c is not None and c.complete:
                lock.release()
                return "complete", None
            return "write", lock
        if not p.settings.wait:
            raise PipelineError(f"another process is writing {p.location} (lock {store.LOCK_NAME}); "
                                "wait for it or rerun later")
        if not waited:
            info = lock.read() or {}
            log(f"another process (host {info.get('host')}, pid {info.get('pid')}) is writing this cache; waiting")
            waited = True
        time.sleep(WAIT_POLL_S)


# ------------------------------------------------------------------ phase 1: tokens
def prepare_tokens(p: Plan) -> None:
    """Create the group and write `tokens` (phase 1); a half-done phase 1 is simply redone."""
    if store.exists(p.location):
        c = Cache.open(p.location, mode="r", need_complete=False)
        if c.attrs.get("tokens_complete"):
            return
    s = p.settings
    d = models.d_model(p.config)
    itemsize = storage_numpy_dtype(s.dtype).itemsize
    chunk_seqs = max(1, round(s.chunk_mb * 2**20 / (s.ctx_len * d * itemsize)))
    if s.tokens is not None:
        chunk_seqs = min(chunk_seqs, s.tokens // s.ctx_len)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "cache_id": p.cache_id, "settings": p.identity,
        "model": p.model.name, "model_identity": p.model.identity(), "model_dtype": p.identity["model_dtype"],
        "dataset": p.corpus.identity() | {"config": p.corpus.config, "split": p.corpus.split},
        "sites": p.sites, "layers": sorted({models.parse_site(x)[0] for x in p.sites}),
        "d_model": d, "ctx_len": s.ctx_len, "dtype": s.dtype, "chunk_seqs": chunk_seqs,
        "tokens_requested": s.tokens if s.tokens is not None else "all",
        "checksum_algorithm": CHECKSUM,
        "checksum": f"{CHECKSUM} of each chunk's C-order bytes; checksums[i, 0] tokens, [i, 1+j] sites[j]",
        "code_version": _code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False, "tokens_complete": False,
    }
    group = store.open_group(p.location, mode="a")
    for name in ("tokens", "activations", "checksums"):  # (re)start phase 1 from scratch
        if name in group:
            del group[name]
    group.attrs.put(manifest)
    tok = models.load_tokenizer(p.model)
    target = s.tokens // s.ctx_len if s.tokens is not None else None
    tokens = group.create_array("tokens", shape=(0, s.ctx_len), chunks=(chunk_seqs, s.ctx_len), dtype="int32",
                                compressors=None, fill_value=0)
    contexts = iter_contexts(iter_texts(p.corpus), tok, s.ctx_len, p.corpus.separator_kind())
    hashes: list[int] = []
    n = 0
    for block in _blocks(contexts, chunk_seqs, target):
        tokens.append(block)
        hashes.append(chunk_hash(block))
        n += len(block)
    if n == 0:
        raise PipelineError(f"dataset {p.corpus.name!r} is empty: column {p.corpus.text_column!r} yields not one "
                            f"context of {s.ctx_len} tokens")
    if target is not None and n < target:
        raise PipelineError(f"dataset {p.corpus.name!r} holds only {n * s.ctx_len} tokens in contexts of {s.ctx_len}, "
                            f"fewer than the {s.tokens} asked for; ask for at most that or TOKENS=all")
    n_chunks = len(hashes)
    dt = storage_numpy_dtype(s.dtype)
    for site in p.sites:
        group.create_array(f"activations/{site}", shape=(n * s.ctx_len, d), chunks=(chunk_seqs * s.ctx_len, d),
                           dtype=dt, compressors=None, fill_value=0,
                           attributes={"dtype": s.dtype, "site": site})
    sums = group.create_array("checksums", shape=(n_chunks, 1 + len(p.sites)), chunks=(1, 1 + len(p.sites)),
                              dtype="uint64", compressors=None, fill_value=0)
    init = np.zeros((n_chunks, 1 + len(p.sites)), dtype=np.uint64)
    init[:, 0] = hashes
    sums[:] = init
    group.attrs.update({"n_sequences": n, "n_tokens": n * s.ctx_len, "tokens_complete": True})
    log(f"packed {n * s.ctx_len:,} tokens into {n} contexts of {s.ctx_len}")


def _blocks(contexts: Iterator[np.ndarray], size: int, limit: int | None) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    n = 0
    for ctx in contexts:
        if limit is not None and n >= limit:
            break
        buf.append(ctx)
        n += 1
        if len(buf) == size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


# ------------------------------------------------------------------ phase 2: activations
def _to_storage(h: torch.Tensor, dtype: str, site: str) -> np.ndarray:
    """Rows of a site in the storage dtype; non-finite values (e.g. float16 overflow) are refused."""
    stored = to_storage(h.reshape(-1, h.shape[-1]), dtype)
    finite = np.isfinite(to_float32(stored, dtype) if dtype == "bfloat16" else stored).all()
    if not finite:
        hint = " (float16 overflow: harvest with --dtype float32 or bfloat16)" if dtype == "float16" else ""
        raise PipelineError(f"non-finite activations (NaN or inf) at site {site}{hint}")
    return stored


def harvest_activations(p: Plan, cache: Cache, rank: int, world: int, lock, model=None) -> None:
    """Compute and write every chunk this rank owns that is not yet done."""
    s = p.settings
    done = cache.done_chunks()
    mine = [i for i in range(cache.n_chunks) if i % world == rank and not done[i]]
    if not mine:
        return
    if model is None:
        model = models.load_model(p.model, p.device, p.torch_dtype)
    sums = cache.checksums
    ctx = cache.ctx_len
    total_tok = sum(cache.seq_range(i)[1] - cache.seq_range(i)[0] for i in mine) * ctx
    bar = tqdm(total=total_tok, unit="tok", unit_scale=True, desc=f"harvest{f' rank {rank}' if world > 1 else ''}",
               file=sys.stderr, disable=None, smoothing=0.1)
    writer = ThreadPoolExecutor(1)
    pending: list[Future] = []

    def write_chunk(i: int, blocks: dict[str, np.ndarray]) -> None:
        r0, r1 = cache.row_range(i)
        row = np.array(sums[i], dtype=np.uint64).reshape(-1)
        for j, site in enumerate(p.sites):
            cache.activations(site)[r0:r1] = blocks[site]
            row[1 + j] = chunk_hash(blocks[site], cache.checksum_algorithm)
        sums[i] = row  # written last: marks the chunk done
        if lock is not None:
            lock.heartbeat()

    try:
        with models.SiteCapture(model, p.sites) as cap, torch.inference_mode():
            for i, blocks in _chunk_activations(cache, mine, cap, p, s.batch_size):
                while len(pending) >= 2:  # bounded memory: at most two chunks in flight
                    pending.pop(0).result()
                pending.append(writer.submit(write_chunk, i, blocks))
                s0, s1 = cache.seq_range(i)
                bar.update((s1 - s0) * ctx)
            for f in pending:
                f.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()


def _chunk_activations(cache: Cache, chunks: list[int], cap: models.SiteCapture, p: Plan,
                       batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (chunk, {site: rows}) for each chunk; forward batches may straddle chunk boundaries."""
    s = p.settings
    queue: list[tuple[int, int]] = []  # (chunk, sequence) in order
    for i in chunks:
        s0, s1 = cache.seq_range(i)
        queue += [(i, q) for q in range(s0, s1)]
    tokens = cache.tokens
    parts: dict[int, dict[str, list[np.ndarray]]] = {}
    remaining = {i: cache.seq_range(i)[1] - cache.seq_range(i)[0] for i in chunks}
    for b0 in range(0, len(queue), batch_size):
        batch = queue[b0:b0 + batch_size]
        seqs = [q for _, q in batch]
        # consecutive in each chunk: read as ranges
        ids = np.concatenate([tokens[a:b] for a, b in _ranges(seqs)])
        cap(torch.from_numpy(ids.astype(np.int64)).to(p.device))
        out = {site: _to_storage(cap.acts[site], s.dtype, site) for site in p.sites}
        pos = 0
        for i, n in _runs([c for c, _ in batch]):
            d = parts.setdefault(i, {site: [] for site in p.sites})
            for site in p.sites:
                d[site].append(out[site][pos * cache.ctx_len:(pos + n) * cache.ctx_len])
            pos += n
            remaining[i] -= n
            if remaining[i] == 0:
                d = parts.pop(i)
                yield i, {site: np.concatenate(d[site]) for site in p.sites}


def _ranges(xs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in xs:
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


def _runs(xs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in xs:
        if out and out[-1][0] == x:
            out[-1] = (x, out[-1][1] + 1)
        else:
            out.append((x, 1))
    return out


# ------------------------------------------------------------------ finish
def _finish(p: Plan, cache: Cache) -> None:
    missing = int((~cache.done_chunks()).sum())
    if missing:
        raise PipelineError(f"{missing} chunks of {p.location} are still missing after the harvest; rerun it")
    stats = {site: compute_stats(cache.activations(site), cache.dtype, cache.tokens) for site in p.sites}
    outliers = [np.asarray(stats[s].get("outliers", {}).get("rows", []), dtype=np.int64) for s in p.sites]
    write_chunk_counts(cache.group, compute_chunk_counts(cache.tokens, cache.chunk_seqs, outliers))
    # One metadata write: statistics and `complete: true` together, last of all.
    cache.group.attrs.update({"stats": stats, "complete": True,
                              "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
