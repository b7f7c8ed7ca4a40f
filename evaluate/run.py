"""Evaluate SAEs on held-out tokens: reconstruction metrics and spliced-in cross-entropy."""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows, Split, heldout_sequences
from batchtopk.core.errors import PipelineError
from batchtopk.core.pipelines import DATA_DIR
from batchtopk.harvest import models
from batchtopk.train.archs import L1_ARCHS
from batchtopk.train.executor import autocast
from batchtopk.train.sae import SAE, SWAPPABLE, load_sae, with_activation
from batchtopk.train.settings import TrainSettings
from batchtopk.train.theta import estimate_theta

from .metrics import CE, DEFINITIONS, Recon, token_ce, token_kl
from .settings import EvalSettings
from .splice import Splicer

METRICS_FILE = "metrics.json"
# x [n, d] -> (x_hat [n, d], active latents per token [n], firings per latent [m])
Reconstructor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def sae_reconstructor(sae: SAE, mode: str) -> Reconstructor:
    def run(x: torch.Tensor):
        x_hat, code = sae.reconstruct(x, mode)
        return x_hat, code.counts, code.fired()
    return run


def swapped(sae: SAE, arch: str, cache: Cache, md: dict, device: str) -> tuple[SAE, dict]:
    """The SAE with `arch`'s activation (--encode-as), and what was set for it: a TopK SAE encoded as
    BatchTopK gets the θ its own weights imply, estimated as the trainer estimates BatchTopK's (`unseen`:
    the pooled estimate over its calibration sequences, at its training batch size)."""
    alt = with_activation(sae, arch).to(device)
    if arch != "batchtopk":
        return alt, {}
    rows = Rows.from_metadata(cache, md)
    if not rows.split.calibrate:
        raise PipelineError(f"--encode-as batchtopk estimates a θ for a {sae.cfg.arch} SAE on its calibration "
                            f"sequences, and the run of {md.get('pipeline')}/{sae.cfg.name} set none aside (train "
                            "with --theta-estimator unseen and a held-out part)")
    xs = [x.to(device) for x in rows.take(TrainSettings.theta_tokens, "calibration").split(int(md["batch_size"]))]
    with torch.no_grad(), autocast(device):
        theta = estimate_theta(xs, lambda x: alt.pre(alt.normalize(x)[0]), alt.cfg.k)["pooled"]
    alt.theta.fill_(theta)
    return alt, {"theta": theta, "theta_estimator": "unseen", "theta_rows": sum(len(x) for x in xs)}


def swapped_modes(arch: str, alt: SAE) -> dict[str, str]:
    """metrics.json's name of each mode of an SAE encoded as `arch` -> the mode SAE.code takes."""
    return {"topk": "threshold"} if arch == "topk" else {m: m for m in alt.modes}


@torch.inference_mode()
def evaluate_site(model, site: str, batches: Iterable[torch.Tensor], recons: dict[str, tuple[Reconstructor, int]],
                  mean: torch.Tensor, bos_id: int | None, progress: bool = True,
                  max_norm: float | None = None) -> dict[str, dict]:
    """Metrics for each reconstructor on the given token batches.

    recons: name -> (reconstructor, d_sae). Positions holding bos_id (when not None), and those
    whose activation norm exceeds max_norm (when not None), keep their clean activation and are
    left out of the reconstruction metrics.
    """
    sp = Splicer(model, site)
    clean_ce, zero_ce, mean_ce = CE(), CE(), CE()
    stats = {name: Recon(d_sae) for name, (_, d_sae) in recons.items()}
    batches = list(batches)
    excluded_outliers = 0
    bar = tqdm(batches, desc=f"eval {site}", unit="batch", file=sys.stderr, disable=None if progress else True)
    try:
        for ids in bar:
            logits, act = sp.clean(ids)
            clean_ce.add(token_ce(logits, ids))
            mask = (ids != bos_id) if bos_id is not None else torch.ones_like(ids, dtype=torch.bool)
            if max_norm is not None:
                excluded_outliers += int((mask & (act.float().norm(dim=-1) > max_norm)).sum())
                mask &= act.float().norm(dim=-1) <= max_norm

            def put(values: torch.Tensor):
                def fn(h: torch.Tensor) -> torch.Tensor:
                    h = h.clone()
                    h[mask] = values.to(h.dtype)
                    return h
                return fn

            n_sel = int(mask.sum())
            zero_ce.add(token_ce(sp.spliced(ids, put(torch.zeros(n_sel, act.shape[-1]))), ids))
            mean_ce.add(token_ce(sp.spliced(ids, put(mean.expand(n_sel, -1))), ids))
            x = act[mask].float()
            for name, (rec, _) in recons.items():
                x_hat, counts, fired = rec(x)
                st = stats[name]
                st.add(x, x_hat, counts, fired)
                spliced = sp.spliced(ids, put(x_hat))
                st.ce.add(token_ce(spliced, ids))
                st.kl.add(token_kl(logits[:, :-1], spliced[:, :-1]))
    finally:
        sp.close()
    extra = {"excluded_outlier_positions": excluded_outliers}
    return {name: st.result(clean_ce.mean, zero_ce.mean, mean_ce.mean) | extra
            for name, st in stats.items()}


def common_heldout(metas: list[tuple[str, dict]]) -> tuple[np.ndarray, str]:
    """The sequences every SAE of a group held out (sorted), and the SAE that holds out fewest."""
    ids, fewest = None, ("", 0)
    for name, md in metas:
        r = heldout_sequences(md)
        if not len(r):
            raise PipelineError(f"SAE {name} records no held-out sequences (trained with val_fraction 0); "
                                "evaluate it on a corpus (--dataset)")
        own = np.arange(r.start, r.stop, r.step)
        ids = own if ids is None else np.intersect1d(ids, own)
        if not fewest[0] or len(own) < fewest[1]:
            fewest = (name, len(own))
    return ids, fewest[0]


def eval_tokens(cache: Cache, seqs: np.ndarray, n_tokens: int, batch_seqs: int, limited_by: str = "",
                exact: bool = True) -> list[torch.Tensor]:
    """Batches of the first held-out sequences (`seqs`, sorted) covering n_tokens tokens (with `exact`
    False, at most that many: all of `seqs` when they hold fewer)."""
    n_seq = math.ceil(n_tokens / cache.ctx_len)
    if not exact and 0 < len(seqs) < n_seq:
        print(f"evaluate: the held-out part has {len(seqs) * cache.ctx_len} tokens, fewer than the pipeline's "
              f"{n_tokens}: evaluating on all of them", file=sys.stderr)
        n_seq = len(seqs)
    if len(seqs) < n_seq or not n_seq:
        who = f" (the part none of the SAEs trained on; {limited_by} holds out least)" if limited_by else ""
        raise PipelineError(f"the held-out part of {cache.location} has only {len(seqs) * cache.ctx_len} tokens{who}, "
                            f"fewer than the {n_tokens} asked for evaluation; ask for fewer (--tokens) or harvest more")
    use = np.asarray(seqs[:n_seq], dtype=np.int64)
    span = np.asarray(cache.tokens[int(use[0]):int(use[-1]) + 1])  # one contiguous read
    return list(torch.from_numpy(span[use - use[0]].astype(np.int64)).split(batch_seqs))


def _source(seqs: np.ndarray) -> dict:
    """The evaluated sequences as range(start, stop, step) where they are one (always, for SAEs of one
    split), else listed."""
    steps = np.unique(np.diff(seqs))
    if len(steps) <= 1:
        step = int(steps[0]) if len(steps) else 1
        return {"heldout_sequences": [int(seqs[0]), int(seqs[-1]) + 1], "heldout_every": step}
    return {"heldout_sequence_ids": seqs.tolist()}


def corpus_tokens(dataset: str, spec: models.ModelSpec, ctx_len: int, n_tokens: int,
                  batch_seqs: int) -> list[torch.Tensor]:
    from batchtopk.core.pipelines import resolve_path
    from batchtopk.harvest.corpus import iter_contexts, iter_texts, resolve_corpus

    corpus = resolve_corpus(resolve_path(dataset))
    tok = models.load_tokenizer(spec)
    n_seq = math.ceil(n_tokens / ctx_len)
    seqs = []
    for ctx in iter_contexts(iter_texts(corpus), tok, ctx_len, corpus.separator_kind()):
        seqs.append(ctx)
        if len(seqs) == n_seq:
            break
    if len(seqs) < n_seq:
        raise PipelineError(f"eval corpus {dataset} holds only {len(seqs) * ctx_len} tokens in contexts of {ctx_len}, "
                            f"fewer than the {n_tokens} asked for")
    return list(torch.from_numpy(np.stack(seqs).astype(np.int64)).split(batch_seqs))


def evaluate(s: EvalSettings) -> list[Path]:
    """Evaluate every SAE directory; one model load per cache, one clean pass per batch for all its SAEs."""
    if s.tokens < 1:
        raise PipelineError(f"eval tokens must be positive, not {s.tokens}")
    device = s.device or models.default_device()
    loaded = []
    for d in s.saes:
        sae, meta = load_sae(d, device)
        loaded.append((Path(d), sae, meta))
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for item in loaded:
        md = item[2]["metadata"]
        groups[(md["cache"], md["hook_name"])].append(item)
    written = []
    loaded_for, config, model = None, None, None
    for (cache_loc, site), items in sorted(groups.items()):  # one model load per cache
        cache = Cache.open(cache_loc)
        spec = models.resolve_model(cache.attrs["model"], cache.attrs["settings"]["model"].get("revision"))
        if loaded_for != cache_loc:
            model = None  # free the previous model first
            config = models.load_config(spec)
            model = models.load_model(spec, device, models.resolve_dtype(cache.attrs.get("model_dtype"), device))
            loaded_for = cache_loc
        models.check_sites([site], config)
        width = models.d_model(config)
        for d, sae, _ in items:
            if sae.cfg.d_in != width:
                raise PipelineError(f"SAE {d} has d_in={sae.cfg.d_in} but {site} of {spec.name} has width {width}")
        if s.dataset:
            batches = corpus_tokens(s.dataset, spec, cache.ctx_len, s.tokens, s.batch_seqs)
            source = {"dataset": s.dataset}
        else:
            # only sequences that no SAE of the group trained on
            held, limiting = common_heldout([(str(d), m["metadata"]) for d, _, m in items])
            batches = eval_tokens(cache, held, s.tokens, s.batch_seqs, limiting if len(items) > 1 else "",
                                  s.exact_tokens)
            source = _source(held[:sum(len(b) for b in batches)]) | {"cache_id": cache.attrs["cache_id"],
                                                                     "cache": cache.location}
        rows = Rows(cache, site, Split.of(cache, 0.0), s.include_bos, s.include_outliers)  # which positions count
        mean = torch.as_tensor(cache.train_stats(site, s.include_bos)["mean"], dtype=torch.float32)
        recons = {(str(d), mode): (sae_reconstructor(sae, mode), sae.cfg.d_sae)
                  for d, sae, _ in items for mode in sae.modes}
        encoded_as: dict[str, dict] = defaultdict(dict)  # SAE dir -> arch -> (what was set, mode names)
        for d, sae, meta in items:
            for arch in s.encode_as:
                if arch == sae.cfg.arch or sae.cfg.arch not in SWAPPABLE:
                    continue
                alt, info = swapped(sae, arch, cache, meta["metadata"], device)
                names = swapped_modes(arch, alt)
                encoded_as[str(d)][arch] = (info, list(names))
                for name, mode in names.items():
                    recons[(str(d), f"as {arch} {name}")] = (sae_reconstructor(alt, mode), sae.cfg.d_sae)
        results = evaluate_site(model, site, [b.to(device) for b in batches], recons, mean.to(device),
                                rows.drop_token, max_norm=rows.max_norm)
        for d, sae, meta in items:
            md = meta["metadata"]
            modes = {mode: results[(str(d), mode)] for mode in sae.modes}
            main = sae.modes[0]
            cfg = sae.cfg
            out = {"architecture": cfg.arch, "k": cfg.k, "d_sae": cfg.d_sae,
                   "l0_coeff": cfg.l0_coeff if cfg.arch == "jumprelu" else None,
                   "target_l0": cfg.target_l0 if cfg.arch == "jumprelu" else None,
                   "l1_coeff": cfg.l1_coeff if cfg.arch in L1_ARCHS else None,
                   # the SAE's settings without its replicate: replicates of one config share it
                   "config": replace(cfg, replicate=0).name, "replicate": cfg.replicate,
                   "recipe": cfg.changed(),  # the settings beyond the name's that differ from the defaults
                   "theta_estimator": md.get("theta_estimator"), "theta_estimates": md.get("theta_estimates"),
                   "heldout_l0": md.get("heldout_l0"),
                   "cache_id": cache.attrs["cache_id"],
                   "pipeline": md.get("pipeline"), "model": spec.name, "site": site, "mode": main,
                   **modes[main], "modes": modes, "include_bos": s.include_bos,
                   "include_outliers": s.include_outliers, "outlier_norm_above": rows.max_norm,
                   "eval_tokens": sum(b.numel() for b in batches), "eval_source": source,
                   "training_tokens": md.get("training_tokens"), "lr": md.get("lr"), "definitions": DEFINITIONS}
            if encoded_as.get(str(d)):  # scored with another architecture's activation (--encode-as)
                out["encoded_as"] = {arch: info | {"modes": {name: results[(str(d), f"as {arch} {name}")]
                                                             for name in names}}
                                     for arch, (info, names) in encoded_as[str(d)].items()}
            (d / METRICS_FILE).write_text(json.dumps(out, indent=2))
            written.append(d / METRICS_FILE)
    return written


def discover(pipeline: str) -> list[str]:
    root = DATA_DIR / "saes" / pipeline
    dirs = sorted(str(p.parent) for p in root.glob("*/*/cfg.json"))
    if not dirs:
        raise PipelineError(f"no trained SAEs for pipeline {pipeline!r} under {root}; run `make train` first")
    return dirs
