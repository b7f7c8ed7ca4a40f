"""A latent browser built straight from the cache: a static site per SAE (opens from disk, no server).

One streaming pass over cached activations (the held-out part by default) gives every latent's
statistics, top rows and a sample of its firings (evaluate.latents); one more read encodes just the
rows their context windows need, so each token of a context is shaded by the latent's activation.
The output tokens a latent's decoder direction promotes and suppresses come from the model's
unembedding (weights only: no forward pass). Per-latent data are small JS files loaded on demand.
"""
from __future__ import annotations

import html
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows, Split, heldout_sequences
from batchtopk.core.errors import PipelineError
from batchtopk.core.pipelines import DATA_DIR
from batchtopk.harvest import models
from batchtopk.train.archs import THETA_ARCHS
from batchtopk.train.sae import SAE, load_sae

from .latents import LatentStats
from .settings import BrowseSettings

SITE_ASSETS = Path(__file__).resolve().parent / "site"
WINDOW = (15, 4)        # tokens shown before and after a context's token
QUANTILE_BANDS = 4      # lower-activation samples: this many bands of the sampled firings ...
PER_BAND = 3            # ... with this many contexts each
TOP_LOGITS = 12


def _held_out(cache: Cache, site: str, meta: dict, s: BrowseSettings) -> tuple[Rows, str, int]:
    """The rows to scan, their part ("heldout" evaluation reads, or "train" of a split with nothing held
    out: the whole cache) and the first sequence scanned."""
    if s.whole_cache:
        return Rows(cache, site, Split.of(cache, 0.0), s.include_bos, s.include_outliers), "train", 0
    md = meta["metadata"]
    seqs = heldout_sequences(md)
    if not len(seqs):
        raise PipelineError(f"SAE {s.sae} records no held-out sequences; browse the whole cache (--whole-cache)")
    return Rows(cache, site, Split.from_metadata(cache, md), s.include_bos, s.include_outliers), "heldout", seqs.start


def _batches(rows: Rows, part: str, s: BrowseSettings):
    """(row ids, float32 rows) of the kept rows of a part, in batches of about batch_tokens, up to s.tokens."""
    cache, site = rows.cache, rows.site
    done = 0
    buf_ids, buf_x = [], []
    for c in (rows.split.heldout_chunks if part == "heldout" else rows.split.train_chunks):
        r0, r1 = cache.row_range(c)
        keep = rows.mask(c, part)
        ids = r0 + np.flatnonzero(keep)
        x = cache.read_rows(site, r0, r1)[keep]
        if s.tokens is not None:
            x, ids = x[: s.tokens - done], ids[: s.tokens - done]
        buf_ids.append(ids)
        buf_x.append(x)
        done += len(ids)
        while sum(len(i) for i in buf_ids) >= s.batch_tokens:
            ids_all, x_all = np.concatenate(buf_ids), np.concatenate(buf_x)
            yield torch.from_numpy(ids_all[: s.batch_tokens]), torch.from_numpy(x_all[: s.batch_tokens])
            buf_ids, buf_x = [ids_all[s.batch_tokens:]], [x_all[s.batch_tokens:]]
        if s.tokens is not None and done >= s.tokens:
            break
    ids_all = np.concatenate(buf_ids) if buf_ids else np.empty(0, dtype=np.int64)
    if len(ids_all):
        yield torch.from_numpy(ids_all), torch.from_numpy(np.concatenate(buf_x))


def scan(sae: SAE, rows: Rows, part: str, s: BrowseSettings) -> LatentStats:
    """The streaming pass: every latent's statistics over the chosen tokens."""
    stats = LatentStats(sae.cfg.d_sae)
    bar = tqdm(desc="browse: scan", unit="tok", unit_scale=True, file=sys.stderr, disable=None)
    with torch.inference_mode():
        for ids, x in _batches(rows, part, s):
            _, code = sae.reconstruct(x.to(s.device), "threshold")  # BatchTopK: its inference mode
            stats.add(ids, *(t.cpu() for t in code.active()))
            bar.update(len(ids))
    bar.close()
    if stats.n_tokens == 0:
        raise PipelineError(f"no tokens to scan in {rows.cache.location} for {s.sae} (the held-out part is empty?)")
    return stats


def window_rows(row: int, ctx_len: int) -> tuple[int, int]:
    """[first, last) rows of the window shown around a row, inside its own sequence."""
    seq0 = row - row % ctx_len
    return max(seq0, row - WINDOW[0]), min(seq0 + ctx_len, row + WINDOW[1] + 1)


def contexts(stats: LatentStats, latent: int) -> tuple[list[tuple[float, int]], list[list[tuple[float, int]]]]:
    """A latent's top rows, and samples of its firings in QUANTILE_BANDS bands of activation (lowest first)."""
    sample = stats.samples_of(latent)
    bands = []
    for b in range(QUANTILE_BANDS):
        part = sample[len(sample) * b // QUANTILE_BANDS: len(sample) * (b + 1) // QUANTILE_BANDS]
        idx = np.linspace(0, len(part) - 1, min(PER_BAND, len(part))).round().astype(int) if part else []
        bands.append([part[i] for i in idx])
    return stats.top_of(latent), bands


def window_values(sae: SAE, cache: Cache, site: str, rows: np.ndarray, lats: np.ndarray, device: str,
                  batch: int = 2048) -> np.ndarray:
    """Activation of latent lats[j] at row rows[j], for every j: each distinct row is read and encoded once."""
    uniq, inv = np.unique(rows, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(0, len(uniq) + batch, batch))
    out = np.zeros(len(rows), dtype=np.float32)
    with torch.inference_mode():
        for b in range(0, len(uniq), batch):
            x = torch.from_numpy(cache.gather_rows(site, uniq[b:b + batch]))
            f = sae.encode(x.to(device), "threshold").cpu().numpy()
            sel = order[bounds[b // batch]:bounds[b // batch + 1]]
            out[sel] = f[inv[sel] - b, lats[sel]]
    return out


def logit_effects(sae: SAE, model, top: int = TOP_LOGITS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each decoder direction times the unembedding (after the final norm's scale): the token ids and
    logit values it promotes most (top) and suppresses most (bottom), per latent."""
    W_U = model.get_output_embeddings().weight.detach().float()  # [vocab, d]
    scale = final_norm_scale(model)
    dirs = sae.W_dec.detach().float() * scale  # [m, d]
    ups, up_v, downs, down_v = [], [], [], []
    for blk in dirs.split(256):
        logits = blk @ W_U.T
        v, i = logits.topk(top, dim=1)
        ups.append(i)
        up_v.append(v)
        v, i = (-logits).topk(top, dim=1)
        downs.append(i)
        down_v.append(-v)
    return torch.cat(ups), torch.cat(up_v), torch.cat(downs), torch.cat(down_v)


def final_norm_scale(model) -> torch.Tensor:
    """The elementwise scale of the model's final norm (Gemma's RMSNorm multiplies by 1 + weight)."""
    norm = models.submodule(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                                    "model.decoder.final_layer_norm"))
    if norm is None:
        return torch.ones(model.get_output_embeddings().weight.shape[1])
    w = norm.weight.detach().float()
    return 1.0 + w if "gemma" in type(norm).__name__.lower() else w


class Vocab:
    """Token id -> display text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: dict[int, int] = {}
        self.text: list[str] = []

    def __call__(self, token_id: int) -> int:
        if token_id not in self.ids:
            self.ids[token_id] = len(self.text)
            self.text.append(self.tok.decode([token_id]))
        return self.ids[token_id]


_MODELS: dict[str, tuple] = {}


def _model(spec: models.ModelSpec) -> tuple:
    """(tokenizer, model on CPU) of a cache's model, loaded once per process (its weights only are used)."""
    key = json.dumps(spec.identity(), sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = (models.load_tokenizer(spec), models.load_model(spec, "cpu", torch.float32))
    return _MODELS[key]


def write_overview(sites: list[Path], out: Path, pipeline: str) -> Path:
    """One page linking the sites of several SAEs (name, architecture, size, latents that fired)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in sites:
        summary = json.loads((index.parent / "data" / "summary.json").read_text())
        rel = index.relative_to(out) if index.is_relative_to(out) else index
        rows.append(f"<tr><td><a href=\"{rel.as_posix()}\">{html.escape(summary['sae'])}</a></td>"
                    f"<td>{summary['architecture']}</td><td>{summary['k'] or '–'}</td><td>{summary['latents']}</td>"
                    f"<td>{summary['alive']}</td><td>{summary['tokens']:,}</td></tr>")
    page = out / "index.html"
    name = html.escape(pipeline)
    page.write_text(f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Latent browsers: {name}</title><link rel="icon" href="data:,">
<style>body{{font:14px system-ui,sans-serif;margin:16px}}td,th{{padding:3px 10px;text-align:left}}</style>
</head><body><h1>Latent browsers: pipeline {name}</h1><table><thead><tr><th>SAE</th><th>arch</th><th>k</th>
<th>latents</th><th>fired</th><th>tokens scanned</th></tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>
""")
    return page


def _r(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits}g}") if v and math.isfinite(v) else 0.0


def build(s: BrowseSettings) -> Path:
    """Write the site for one SAE; return the path of its index.html."""
    t0 = time.perf_counter()
    sae, meta = load_sae(s.sae, s.device)
    md = meta["metadata"]
    cache = Cache.open(md["cache"], need_complete=False)
    if not cache.complete:
        raise PipelineError(f"the cache of SAE {s.sae} at {cache.location} is incomplete (its harvest was "
                            "interrupted); rerun the same `make harvest` to finish it")
    site = md["hook_name"]
    if site not in cache.sites:
        raise PipelineError(f"SAE {s.sae} reads {site}, which cache {cache.location} does not hold "
                            f"(it holds: {', '.join(cache.sites)})")
    rows, part, start_seq = _held_out(cache, site, meta, s)
    stats = scan(sae, rows, part, s)
    t_scan = time.perf_counter() - t0

    m = sae.cfg.d_sae
    alive = [i for i in range(m) if stats.fired[i] > 0]
    picks = {i: contexts(stats, i) for i in alive}
    # every (row, latent) a context window shows, latent by latent, context by context
    windows = {i: [window_rows(r, cache.ctx_len) for _, r in top + [x for b in bands for x in b]]
               for i, (top, bands) in picks.items()}
    ent_rows = np.concatenate([np.arange(a, b) for i in alive for a, b in windows[i]] or [np.empty(0, np.int64)])
    ent_lats = np.concatenate([np.full(b - a, i) for i in alive for a, b in windows[i]] or [np.empty(0, np.int64)])
    values = window_values(sae, cache, site, ent_rows, ent_lats, s.device)
    seq0 = start_seq
    tokens = np.asarray(cache.tokens[seq0:]).reshape(-1)  # the scanned sequences (contexts stay inside them)

    spec = models.resolve_model(cache.attrs["model"], cache.attrs["settings"]["model"].get("revision"))
    tokenizer, model = _model(spec)
    vocab = Vocab(tokenizer)
    up, up_v, down, down_v = logit_effects(sae, model)

    pipeline = s.pipeline or md.get("pipeline") or "default"
    out = Path(s.out) if s.out else DATA_DIR / "browse" / pipeline / Path(s.sae).name
    if out.exists():
        shutil.rmtree(out / "data", ignore_errors=True)
    (out / "data" / "latents").mkdir(parents=True, exist_ok=True)
    for f in ("index.html", "app.js", "style.css"):
        shutil.copy(SITE_ASSETS / f, out / f)

    pos = 0

    def ctx(row: int) -> dict:
        nonlocal pos
        a, b = window_rows(row, cache.ctx_len)
        vals = values[pos:pos + b - a]
        pos += b - a
        return {"t": [vocab(int(tokens[r - seq0 * cache.ctx_len])) for r in range(a, b)],
                "a": [_r(float(v)) for v in vals], "at": row - a, "row": row}

    search: dict[int, set[int]] = {}
    top_tokens: list[list[int]] = [[] for _ in range(m)]
    sizes = []
    edges = stats.hist_edges.tolist()
    for i in alive:
        top, bands = picks[i]
        top_ctx = [ctx(r) for _, r in top]
        seen: list[int] = []
        for c in top_ctx:
            tid = c["t"][c["at"]]
            if tid not in seen:
                seen.append(tid)
            for t in c["t"]:
                search.setdefault(t, set()).add(i)
        top_tokens[i] = seen[:3]
        h = stats.hist[i].tolist()
        nz = [j for j, v in enumerate(h) if v]
        data = {"id": i, "freq": _r(float(stats.fired[i]) / stats.n_tokens, 4), "fired": int(stats.fired[i]),
                "mean": _r(float(stats.total[i]) / float(stats.fired[i])), "max": _r(float(stats.max[i])),
                "top": top_ctx,
                "bands": [{"lo": _r(b[0][0]) if b else 0, "hi": _r(b[-1][0]) if b else 0,
                           "ctx": [ctx(r) for _, r in b]} for b in bands],
                "hist": {"edges": [_r(e) for e in edges[nz[0]:nz[-1] + 2]], "counts": h[nz[0]:nz[-1] + 1]},
                "up": [[vocab(int(t)), _r(float(v))] for t, v in zip(up[i], up_v[i])],
                "down": [[vocab(int(t)), _r(float(v))] for t, v in zip(down[i], down_v[i])]}
        path = out / "data" / "latents" / f"{i}.js"
        path.write_text(f"window.latentLoaded({json.dumps(data, separators=(',', ':'))});\n")
        sizes.append(path.stat().st_size)

    fired = stats.fired.tolist()
    index = {
        "sae": Path(s.sae).name, "architecture": sae.cfg.arch, "k": sae.cfg.k, "d_sae": m,
        "model": cache.attrs["model"], "site": site, "cache_id": cache.attrs["cache_id"],
        "tokens": stats.n_tokens, "mode": "threshold (θ)" if sae.cfg.arch in THETA_ARCHS else sae.cfg.arch,
        "bos": "included" if s.include_bos else "left out", "part": "whole cache" if s.whole_cache else "held-out",
        "freq": [_r(f / stats.n_tokens, 4) for f in fired],
        "mean": [_r(float(stats.total[i]) / fired[i], 4) if fired[i] else 0 for i in range(m)],
        "max": [_r(float(stats.max[i]), 4) for i in range(m)],
        "toptok": top_tokens, "vocab": vocab.text,
    }
    (out / "data" / "index.js").write_text("window.BROWSER_INDEX = " + json.dumps(index, separators=(",", ":"))
                                           + ";\n")
    postings = {str(t): sorted(v) for t, v in search.items()}
    (out / "data" / "search.js").write_text("window.searchLoaded(" + json.dumps(postings, separators=(",", ":"))
                                            + ");\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = {"sae": Path(s.sae).name, "architecture": sae.cfg.arch, "k": sae.cfg.k,
               "tokens": stats.n_tokens, "latents": m, "alive": len(alive), "seconds": time.perf_counter() - t0,
               "scan_seconds": t_scan, "tokens_per_s": stats.n_tokens / t_scan, "site_bytes": total,
               "mean_latent_file_bytes": (sum(sizes) / len(sizes)) if sizes else 0}
    (out / "data" / "summary.json").write_text(json.dumps(summary, indent=2))
    return out / "index.html"
