"""The training stream: every kept row once per epoch, resume by index, memory maps equal the codec path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchtopk.cache.format import Cache, compute_chunk_counts, synthetic_tokens, write_cache
from batchtopk.cache.split import Rows, Split, keep_mask
from batchtopk.core.errors import PipelineError
from batchtopk.train.stream import ActivationStream, BufferPool

SITE = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    rng = np.random.default_rng(0)
    n_seq, ctx, d = 40, 32, 8
    tokens = rng.integers(2, 50, (n_seq, ctx)).astype(np.int32)
    tokens[:, 0] = 0
    tokens[3, 10] = tokens[17, 5] = 0  # BOS inside contexts too (document boundaries)
    x = rng.standard_normal((n_seq * ctx, d)).astype(np.float32)
    x[:, 0] = np.arange(n_seq * ctx)  # each row carries its own id
    x[[77, 500]] *= 1000.0  # massive rows
    return write_cache(str(tmp_path_factory.mktemp("c") / "cache"), tokens, {SITE: x}, dtype="float32", chunk_seqs=6)


def stream(cache, split: Split | None = None, **kw) -> ActivationStream:
    """The stream of the default rows (BOS, token 0, and the outlier rows left out)."""
    args = dict(seed=3, shuffle_mb=0.01) | kw
    return ActivationStream(Rows(cache, SITE, split or Split.of(cache, 0.0)), 64, 1.0, **args)


def every_row(cache, split: Split) -> Rows:
    """Every row of the split's training part, BOS and outliers included."""
    return Rows(cache, SITE, split, include_bos=True, include_outliers=True)


def ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0]]


def test_chunk_counts_match_brute_force(cache, tmp_path, monkeypatch):
    counts = cache.chunk_counts()
    toks = cache.tokens[:]
    rows, _ = cache.outliers(SITE)
    assert rows.tolist() == [77, 500]
    for c in range(cache.n_chunks):
        s0, s1 = cache.seq_range(c)
        r0, r1 = cache.row_range(c)
        assert counts[c, 0] == (toks[s0:s1] == 0).sum()
        assert counts[c, 1] == ((rows >= r0) & (rows < r1)).sum()
        assert r1 - r0 - counts[c].sum() == keep_mask(cache, c, 0, rows).sum()
    # a cache written before chunk_counts existed: computed once, kept in a local index
    import shutil

    import batchtopk.core.pipelines as pipelines
    old = tmp_path / "old"
    shutil.copytree(cache.location, old)
    shutil.rmtree(old / "chunk_counts")
    monkeypatch.setattr(pipelines, "DATA_DIR", tmp_path / "data")
    legacy = Cache.open(str(old))
    np.testing.assert_array_equal(legacy.chunk_counts(), counts)
    assert (tmp_path / "data" / "cache-index" / f"{legacy.attrs['cache_id']}.chunk_counts.npy").exists()
    # the tokens are read a block of chunks at a time, never whole: any block size gives the same counts
    for block in (1, 2, cache.n_chunks - 1):
        np.testing.assert_array_equal(compute_chunk_counts(cache.tokens, cache.chunk_seqs, [rows], block), counts)


def test_ls_reads_sizes_from_the_manifest_not_the_objects(cache, monkeypatch):
    """`harvest ls` lists no object of a cache (at the paper's scale, millions): its size comes from the arrays'
    metadata, and equals the bytes of the chunk objects (uncompressed; no chunk padded here)."""
    import os

    import fsspec.implementations.local as local

    from batchtopk.cache.share import list_caches

    def refuse(*a, **k):
        raise AssertionError("ls walked the cache's objects")
    monkeypatch.setattr(local.LocalFileSystem, "du", refuse)
    [row] = [r for r in list_caches(os.path.dirname(cache.location)) if r["location"] == cache.location]
    chunks = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache.location) for f in fs
                 if f != "zarr.json")
    assert row["size"] == cache.nbytes == chunks and row["complete"]


def test_every_kept_row_once_per_epoch(cache):
    s = stream(cache)
    it = s.batches(0)
    epoch = ids(next(it) for _ in range(s.batches_per_epoch))
    it.close()
    kept = [r for c in Split.of(cache, 0.0).train_chunks
            for r in (cache.row_range(c)[0] + np.flatnonzero(keep_mask(cache, c, 0, cache.outliers(SITE)[0])))]
    assert len(epoch) == len(set(epoch)) == s.batches_per_epoch * 64
    assert set(epoch) <= set(kept) and len(kept) - len(epoch) < 64  # only the last partial batch is left out
    assert sum(s.rows_in.values()) == len(kept)
    assert epoch != sorted(epoch)  # shuffled


def test_resume_by_index_and_memory_maps_equal_the_codec_path(cache, monkeypatch):
    s = stream(cache)
    it = s.batches(0)
    ref = [next(it) for _ in range(2 * s.batches_per_epoch + 3)]  # across epochs and windows
    it.close()
    it = s.batches(s.batches_per_epoch + 1)
    resumed = [next(it) for _ in range(s.batches_per_epoch + 2)]
    it.close()
    for a, b in zip(ref[s.batches_per_epoch + 1:], resumed):
        assert torch.equal(a, b)
    assert cache.chunk_file(SITE, 0) is not None  # a local cache is read through memory maps ...
    monkeypatch.setattr(Cache, "chunk_file", lambda self, site, c: None)  # ... or through zarr's codecs
    it = stream(cache).batches(0)
    for a in ref:
        assert torch.equal(a, next(it))
    it.close()


def test_bfloat16_and_float16_decode(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24 * 16, 4)).astype(np.float32)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        c = write_cache(str(tmp_path / dtype), np.ones((24, 16), dtype=np.int32), {SITE: x}, dtype=dtype, chunk_seqs=4)
        s = ActivationStream(every_row(c, Split.of(c, 0.0)), 32, 2.0, shuffle_mb=1)
        it = s.batches(0)
        got = torch.cat([next(it) for _ in range(s.batches_per_epoch)])
        it.close()
        want = torch.from_numpy(x).to(torch_dtype).float() * 2
        assert len(got) == len(want)  # 384 rows, 12 batches: the whole epoch, in the shuffle's order
        key = lambda t: t[np.lexsort(t.numpy().T[::-1])]  # noqa: E731  (rows in lexicographic order)
        torch.testing.assert_close(key(got), key(want), rtol=0, atol=0)


def test_caches_hashed_with_blake2b_still_verify_and_stream(tmp_path):
    """Caches written before `checksum_algorithm` existed hold blake2b-64 sums: they still verify and
    train, a flipped byte is still caught, and an algorithm this version does not know is one line."""
    import zarr

    from batchtopk.cache.format import LEGACY_CHECKSUM, PipelineError, chunk_hash

    rng = np.random.default_rng(1)
    tokens = rng.integers(2, 50, (12, 16)).astype(np.int32)
    x = rng.standard_normal((12 * 16, 4)).astype(np.float32)
    loc = str(tmp_path / "old")
    new = write_cache(loc, tokens, {SITE: x}, dtype="float16", chunk_seqs=4)
    assert new.checksum_algorithm == "xxh3-64"
    g = zarr.open_group(loc, mode="a")
    attrs = dict(g.attrs)
    del attrs["checksum_algorithm"]
    g.attrs.put(attrs)
    sums = np.zeros(g["checksums"].shape, dtype=np.uint64)
    for i in range(3):
        sums[i, 0] = chunk_hash(tokens[4 * i:4 * i + 4], LEGACY_CHECKSUM)
        sums[i, 1] = chunk_hash(g[f"activations/{SITE}"][64 * i:64 * i + 64], LEGACY_CHECKSUM)
    assert (sums != new.checksums[:]).all()  # the two algorithms disagree, so the test can tell them apart
    g["checksums"][:] = sums
    old = Cache.open(loc)
    assert old.checksum_algorithm == LEGACY_CHECKSUM and old.verify() == []
    it = ActivationStream(every_row(old, Split((0, 1, 2), ())), 32, 1.0).batches(0)
    np.testing.assert_allclose(np.sort(np.concatenate([next(it).numpy() for _ in range(6)]).ravel()),
                               np.sort(x.astype(np.float16).astype(np.float32).ravel()))
    it.close()
    path = old.chunk_file(SITE, 1)
    raw = bytearray(open(path, "rb").read())
    raw[100] ^= 0x10
    open(path, "wb").write(bytes(raw))
    assert Cache.open(loc).verify() == [f"chunk 1 of {SITE}: checksum mismatch (rows 64..127)"]
    attrs["checksum_algorithm"] = "md5"
    g.attrs.put(attrs)
    with pytest.raises(PipelineError, match="checksum algorithm 'md5'; this version knows xxh3-64, blake2b-64"):
        Cache.open(loc).verify()


def test_buffer_pool_lends_a_buffer_again_only_when_nothing_uses_it():
    pool, f32 = BufferPool(2), np.dtype(np.float32)
    a, b = pool.take((3, 4), f32), pool.take((3, 4), f32)
    kept = torch.from_numpy(a[1:].view(np.int32))  # a view of a view: numpy points it at the owner
    del a
    c = pool.take((3, 4), f32)  # both lent: fresh memory, not kept by the pool
    assert not any(np.shares_memory(c, s) for s in pool.slots)
    del b
    assert np.shares_memory(pool.take((3, 4), f32), pool.slots[1])  # b's buffer, free again
    kept[0, 0] = 7
    assert not np.shares_memory(pool.take((3, 4), f32), kept.numpy())  # still in use: not lent
    del kept
    assert np.shares_memory(pool.take((3, 4), f32), pool.slots[0])
    assert pool.take((5,), f32).shape == (5,)  # another shape takes a free slot's place
    assert len(pool.slots) == 2


def test_kept_batches_are_never_overwritten(cache):
    """A consumer that keeps every batch (of two epochs) sees each exactly as a fresh stream yields it."""
    it = stream(cache).batches(0)
    kept = [next(it) for _ in range(12)]
    it.close()
    it = stream(cache).batches(0)
    for b in kept:
        assert torch.equal(b, next(it).clone())
    it.close()


def test_closing_a_stream_stops_its_threads_before_returning(tmp_path):
    """After close, no background read or gather still touches a chunk's memory map (a file rewritten
    then, as the checksum test does, would otherwise kill the process with SIGBUS)."""
    import threading

    x = np.random.default_rng(2).standard_normal((16 * 64, 8)).astype(np.float32)
    c = write_cache(str(tmp_path / "c"), synthetic_tokens(64, 16), {SITE: x}, dtype="float16", chunk_seqs=4)
    before = set(threading.enumerate())
    for _ in range(5):
        it = ActivationStream(every_row(c, Split.of(c, 0.0)), 32, 1.0, prefetch=8).batches(0)
        next(it)
        it.close()
        assert set(threading.enumerate()) <= before


def test_interleaved_split_holds_out_one_sequence_in_every_n_across_the_cache(cache):
    from batchtopk.cache.split import heldout_sequences
    from batchtopk.core.errors import PipelineError

    split = Split.of(cache, 0.25, "interleaved")  # 40 sequences in chunks of 6: sequences 3, 7, ..., 39
    assert split.every == 4 and split.train_chunks == split.heldout_chunks == tuple(range(cache.n_chunks))
    md = split.metadata(cache)
    assert md == {"heldout_layout": "interleaved", "heldout_sequences": [3, 40], "heldout_every": 4,
                  "calibration_sequences": None, "calibration_every": None}
    assert list(heldout_sequences(md)) == list(range(3, 40, 4))
    assert Split.from_metadata(cache, md) == split
    tail = Split.of(cache, 0.25)
    assert Split.from_metadata(cache, tail.metadata(cache)) == tail and tail.every == 0
    held = {int(v) for x in Rows(cache, SITE, split).chunks() for v in x[:, 0]}
    toks = cache.tokens[:].reshape(-1)
    expect = {r for s in range(3, 40, 4) for r in range(s * 32, s * 32 + 32) if toks[r] != 0 and r not in (77, 500)}
    assert held == expect
    s = stream(cache, split)
    it = s.batches(0)
    epoch = ids(next(it) for _ in range(s.batches_per_epoch))
    it.close()
    kept = {r for r in range(40 * 32) if toks[r] != 0 and r not in (77, 500)}
    assert set(epoch) <= kept - held and sum(s.rows_in.values()) == len(kept - held)
    assert len(kept - held) - len(epoch) < 64 and len(epoch) == len(set(epoch))
    with pytest.raises(PipelineError, match="not one of: tail, interleaved"):
        Split.of(cache, 0.25, "random")


@pytest.mark.parametrize("layout", ["tail", "interleaved"])
def test_calibration_takes_every_other_heldout_sequence_and_never_trains(cache, layout):
    from batchtopk.cache.split import heldout_sequences

    plain, split = Split.of(cache, 0.25, layout), Split.of(cache, 0.25, layout, calibrate=True)
    held = list(plain.sequences(cache, "heldout"))  # tail: chunks 5, 6 of 7 (sequences 30..39); else 3, 7, ...
    assert held == (list(range(30, 40)) if layout == "tail" else list(range(3, 40, 4)))
    assert list(split.sequences(cache, "calibration")) == held[0::2]
    assert list(split.sequences(cache, "heldout")) == held[1::2]
    md = split.metadata(cache)
    assert list(heldout_sequences(md)) == held[1::2] and Split.from_metadata(cache, md) == split
    assert list(range(md["calibration_sequences"][0], md["calibration_sequences"][1], md["calibration_every"])) == held[0::2]
    toks = cache.tokens[:].reshape(-1)

    def rows_of(seqs):
        return {r for s in seqs for r in range(s * 32, s * 32 + 32) if toks[r] != 0 and r not in (77, 500)}
    for part, seqs in (("calibration", held[0::2]), ("heldout", held[1::2])):
        got = [int(v) for x in Rows(cache, SITE, split).chunks(part) for v in x[:, 0]]
        assert sorted(got) == sorted(rows_of(seqs))
    s = stream(cache, split)  # the training stream is the plain split's: calibration rows never train
    it = s.batches(0)
    epoch = ids(next(it) for _ in range(s.batches_per_epoch))
    it.close()
    assert not set(epoch) & rows_of(held) and sum(s.rows_in.values()) == len(rows_of(range(40)) - rows_of(held))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_device_window_loader_equals_the_host_loader(tmp_path, dtype):
    """The GPU's loader (whole chunks copied once per window into a device buffer, batches gathered there
    by index), run here with the CPU as its device: the same batches, in the same order, as the host
    loader, across windows, epochs and data parts, and from a resumed index."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40 * 32, 8)).astype(np.float32)
    x[:, 0] = np.arange(len(x))
    c = write_cache(str(tmp_path / dtype), synthetic_tokens(40, 32), {SITE: x}, dtype=dtype, chunk_seqs=3)
    s = ActivationStream(Rows(c, SITE, Split.of(c, 0.25)), 64, 2.0, seed=1, shuffle_mb=0.005, parts=2, my_parts=(0, 1))
    assert s.window < len(s.chunks) // 2  # several windows per part and epoch
    for start in (0, s.batches_per_epoch + 3):
        host, dev = s.host_batches(start), s.device_batches(start)
        for _ in range(2 * s.batches_per_epoch):
            assert torch.equal(next(host), next(dev))
        host.close()
        dev.close()


def test_device_window_loader_catches_a_corrupt_chunk(tmp_path):
    x = np.random.default_rng(5).standard_normal((24 * 16, 4)).astype(np.float32)
    c = write_cache(str(tmp_path / "c"), synthetic_tokens(24, 16), {SITE: x}, dtype="float32", chunk_seqs=4)
    path = c.chunk_file(SITE, 2)
    raw = bytearray(open(path, "rb").read())
    raw[40] ^= 0x01
    open(path, "wb").write(bytes(raw))
    it = ActivationStream(every_row(Cache.open(c.location), Split.of(c, 0.0)), 32, 1.0).device_batches(0)
    with pytest.raises(PipelineError, match="chunk 2 of .* fails its checksum"):
        for _ in range(20):
            next(it)
    it.close()
