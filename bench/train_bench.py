"""Training throughput per architecture against a plain dense PyTorch implementation of the same math."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from harvest.cache import Cache, synthetic_tokens, write_cache
from train.data import ActivationStream, Split
from train.sae import SAE, SAEConfig
from train.sparsity import batch_topk_indices, jumprelu, step

from .records import Record, device_name, timed

ARCHS = ("batchtopk", "topk", "jumprelu", "relu")


def dense_losses(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook implementation of the same losses: dense codes, dense decoder (and dense
    auxiliary loss), flat top-k over the whole batch."""
    cfg = sae.cfg
    pre = x @ sae.W_enc + sae.b_enc
    if cfg.arch == "batchtopk":
        acts = pre.relu()
        flat = acts.flatten()
        idx = flat.topk(x.shape[0] * cfg.k).indices
        f = torch.zeros_like(flat).scatter(0, idx, flat[idx]).view_as(acts)
    elif cfg.arch == "topk":
        v, i = pre.relu().topk(cfg.k, dim=1)
        f = torch.zeros_like(pre).scatter(1, i, v)
    elif cfg.arch == "jumprelu":
        f = jumprelu(pre, sae.threshold, sae.eps)
    else:
        f = pre.relu()
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).mean()
    if cfg.arch == "relu":
        loss = loss + cfg.l1_coeff * f.abs().sum(-1).mean()
    if cfg.arch == "jumprelu":
        loss = loss + cfg.l0_coeff * step(pre, sae.threshold, sae.eps).sum(-1).mean()
    if cfg.arch in ("batchtopk", "topk") and dead is not None and bool(dead.any()):
        a = pre[:, dead].relu()
        v, i = a.topk(min(cfg.aux_k, int(dead.sum())), dim=1)
        aux = torch.zeros_like(a).scatter(1, i, v) @ sae.W_dec[dead]
        loss = loss + cfg.aux_coeff * (aux - (x - x_hat).detach()).pow(2).mean()
    return loss


def step_time(arch: str, impl: str, d: int, m: int, k: int, batch: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch, d_in=d, d_sae=m, k=k if arch in ("batchtopk", "topk") else None,
                        jumprelu_init_l0=k)).to(device)
    x = torch.randn(batch, d, device=device)
    sae.init_from_data(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[: m // 4] = True  # exercise the aux loss too

    def one():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = sae.losses(x, dead)[0]["loss"] if impl == "ours" else dense_losses(sae, x, dead)
        loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: [one() for _ in range(steps)], repeat=1, warmup=1, device=device) / steps
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        # this process's own peak resident memory (ru_maxrss would include the parent's, kept across exec)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return {"tokens_per_s": batch / t, "peak_mib": peak}


def _isolated(arch: str, impl: str, d: int, m: int, k: int, batch: int, steps: int, device: str) -> dict:
    """Each measurement in a fresh process, so the CPU peak memory is its own."""
    code = (f"import json, bench.train_bench as b; print(json.dumps(b.step_time({arch!r}, {impl!r}, {d}, {m}, {k}, "
            f"{batch}, {steps}, {device!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parent.parent)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(d: int = 576, m: int = 4608, k: int = 32, batch: int = 4096, steps: int = 5,
        device: str | None = None) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    settings = {"d_in": d, "d_sae": m, "k": k, "batch": batch, "steps": steps}
    recs = []
    for arch in ARCHS:
        ours = _isolated(arch, "ours", d, m, k, batch, steps, device)
        dense = _isolated(arch, "dense", d, m, k, batch, steps, device)
        recs.append(Record(f"train step {arch}", ours["tokens_per_s"], "tok/s", "dense PyTorch, same math",
                           dense["tokens_per_s"], dev, settings | {"peak_mib": round(ours["peak_mib"]),
                                                                   "baseline_peak_mib": round(dense["peak_mib"])}))
    # the batch-level top-k itself
    acts = torch.randn(batch, m, device=device).relu()
    t_ours = timed(lambda: batch_topk_indices(acts, k), repeat=3, device=device)
    t_flat = timed(lambda: acts.flatten().topk(batch * k, sorted=False).indices.sort(), repeat=3, device=device)
    recs.append(Record("batch top-(n*k) selection", batch / t_ours, "tok/s", "flat topk over n*m", batch / t_flat,
                       dev, settings))
    recs.append(loader_record(d, batch, dev))
    return recs


def loader_record(d: int, batch: int, dev: str, tokens: int = 262144) -> Record:
    """The loader on its own (read, checksum, decode, shuffle, batch) against reading the array raw."""
    rng = np.random.default_rng(0)
    n_seq = tokens // 128
    with tempfile.TemporaryDirectory() as tmp:
        x = rng.standard_normal((tokens, d)).astype(np.float32)
        cache = write_cache(f"{tmp}/c", synthetic_tokens(n_seq), {"s": x}, dtype="float16",
                            chunk_seqs=28)
        cache = Cache.open(f"{tmp}/c")
        split = Split.of(cache, 0.0)
        stream = ActivationStream(cache, "s", split.train_chunks, batch, 1.0, shuffle_mb=128)
        n_batches = stream.batches_per_epoch

        def load():
            it = stream.batches(0)
            for _ in range(n_batches):
                next(it)
            it.close()

        def raw():
            arr = cache.activations("s")
            for c in range(cache.n_chunks):
                arr[slice(*cache.row_range(c))]

        t_load = timed(load, repeat=2)
        t_raw = timed(raw, repeat=2)
    return Record("loader (checksum, shuffle, batch)", n_batches * batch / t_load, "tok/s",
                  "raw sequential chunk reads", n_seq * 128 / t_raw, dev,
                  {"d_in": d, "batch": batch, "dtype": "float16", "tokens": tokens})
