"""Sharing caches: list a root, copy a cache between roots (push/pull) with checksums verified on arrival."""
from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

from batchtopk.core.errors import PipelineError

from . import store
from .format import FORMAT, Cache


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def list_caches(root: str) -> list[dict]:
    """Every cache directly under ROOT, with its model, sites, tokens, size and completeness: a few metadata reads
    per cache, whatever its number of chunks."""
    root = store.normalize(root)
    fs, path = store.filesystem(root)
    with store.remote_errors(root):
        if not fs.exists(path):
            raise PipelineError(f"cache root {root} does not exist")
        entries = sorted(fs.ls(path, detail=False))
        rows = []
        for e in entries:
            meta_path = f"{e.rstrip('/')}/zarr.json"
            if not fs.exists(meta_path):
                continue
            attrs = json.loads(fs.cat_file(meta_path)).get("attributes", {})
            if attrs.get("format") != FORMAT:
                continue
            name = posixpath.basename(e.rstrip("/"))
            size = Cache.open(store.join(root, name), need_complete=False).nbytes  # from the metadata, not a walk
            rows.append({"location": store.join(root, name), "model": attrs.get("model", "?"),
                         "sites": attrs.get("sites", []), "n_tokens": int(attrs.get("n_tokens", 0)),
                         "complete": bool(attrs.get("complete")), "size": size, "size_h": _human(size),
                         "cache_id": attrs.get("cache_id")})
    return rows


def copy_cache(src: str, dst_root: str, workers: int = 8) -> str:
    """Copy a complete cache into DST_ROOT under the same name; return its new location.

    Objects are copied first, then a manifest marked incomplete; every checksum is verified
    at the destination, and only then is the real manifest (complete: true) written. A
    destination that already holds this complete cache is left alone; one holding another
    cache under the name is refused.
    """
    src = store.normalize(src)
    c = Cache.open(src)
    name = posixpath.basename(src.rstrip("/"))
    dst = store.join(dst_root, name)
    if store.normalize(dst) == src:
        raise PipelineError(f"source and destination are the same location: {src}")
    if store.exists(dst):
        d = Cache.open(dst, need_complete=False)
        if d.attrs.get("cache_id") != c.attrs.get("cache_id") or d.attrs.get("settings") != c.attrs.get("settings"):
            raise PipelineError(f"{dst} holds a different cache (id {d.attrs.get('cache_id')}, not "
                                f"{c.attrs.get('cache_id')}); refusing to overwrite it")
        if d.complete:
            return dst
    sfs, spath = store.filesystem(src)
    dfs, dpath = store.filesystem(dst)
    with store.remote_errors(src), store.remote_errors(dst):
        files = [f for f in sfs.find(spath) if not store.is_lock_file(f)]
        rel = [posixpath.relpath(f, spath) for f in files]
        body = [(f, r) for f, r in zip(files, rel) if r != "zarr.json"]
        existing = {posixpath.relpath(f, dpath): s for f, s in
                    ((f, i["size"]) for f, i in dfs.find(dpath, detail=True).items())} if dfs.exists(dpath) else {}
        sizes = {f: i["size"] for f, i in sfs.find(spath, detail=True).items()}
        todo = [(f, r) for f, r in body if existing.get(r) != sizes[f]]

        def copy_one(item: tuple[str, str]) -> None:
            f, r = item
            target = f"{dpath}/{r}"
            if not store.is_url(dst):
                import os
                os.makedirs(posixpath.dirname(target), exist_ok=True)
            dfs.pipe_file(target, sfs.cat_file(f))

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(copy_one, todo))
        root_meta = json.loads(sfs.cat_file(f"{spath}/zarr.json"))
        staged = json.loads(json.dumps(root_meta))
        staged["attributes"]["complete"] = False
        dfs.pipe_file(f"{dpath}/zarr.json", json.dumps(staged, indent=2).encode())
    problems = Cache.open(dst, need_complete=False).verify()
    if problems:
        raise PipelineError(f"copy to {dst} failed verification ({len(problems)} problems, first: {problems[0]}); "
                            "it stays marked incomplete; run the copy again")
    with store.remote_errors(dst):
        dfs.pipe_file(f"{dpath}/zarr.json", json.dumps(root_meta, indent=2).encode())
    return dst
