"""Training throughput per architecture against a plain dense PyTorch implementation of the same math."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from batchtopk.cache.format import Cache, synthetic_tokens, write_cache
from batchtopk.cache.split import Rows, Split
from batchtopk.train.archs import K_ARCHS
from batchtopk.train.sae import SAE, SAEConfig
from batchtopk.train.sparsity import batch_topk, jumprelu, step
from batchtopk.train.stream import ActivationStream

from .ops import stack_trainer
from .records import Record, device_name, timed

ARCHS = ("batchtopk", "topk", "jumprelu", "relu")


def dense_losses(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook implementation of the same losses: dense codes, dense decoder (and dense
    auxiliary loss), flat top-k over the whole batch."""
    cfg = sae.cfg
    pre = sae.encoder_input(x) @ sae.W_enc + sae.b_enc  # x - b_dec for a centred encoder
    if cfg.arch in ("batchtopk", "matryoshka"):  # over the batch, or over each group of `span` tokens
        span = cfg.span or x.shape[0]
        acts = pre.relu().reshape(-1, span * pre.shape[1])
        idx = acts.topk(span * cfg.k, dim=1).indices
        f = torch.zeros_like(acts).scatter(1, idx, acts.gather(1, idx)).view_as(pre)
    elif cfg.arch == "quantile":  # above its threshold (the stack's, here the SAE's θ)
        f = pre.relu() * (pre > sae.theta)
    elif cfg.arch == "topk":
        v, i = pre.relu().topk(cfg.k, dim=1)
        f = torch.zeros_like(pre).scatter(1, i, v)
    elif cfg.arch == "jumprelu":
        f = jumprelu(pre, sae.threshold, sae.eps)
    elif cfg.arch == "gated":  # gate times magnitude: H(pre) relu(x W_enc exp(r_mag) + b_mag)
        xw = sae.encoder_input(x) @ sae.W_enc
        f = (pre > 0).float() * (xw * sae.r_mag.exp() + sae.b_mag).relu()
    else:
        f = pre.relu()
    x_hat = f @ sae.W_dec + sae.b_dec
    per_token = cfg.mse == "sum"  # summed over dimensions, or averaged over elements
    unit = x.shape[1] if per_token else 1

    def mse(err: torch.Tensor) -> torch.Tensor:
        return err.pow(2).sum(-1).mean() if per_token else err.pow(2).mean()

    loss = mse(x_hat - x)
    if cfg.arch == "matryoshka":  # every proper prefix of the dictionary reconstructs x as well
        for end in itertools.accumulate(cfg.group_sizes[:-1]):
            loss = loss + mse(f[:, :end] @ sae.W_dec[:end] + sae.b_dec - x)
    if cfg.arch == "relu":
        loss = loss + unit * cfg.l1_coeff * f.abs().sum(-1).mean()
    if cfg.arch == "gated":  # L1 on the gate, and the gate's reconstruction through the frozen decoder
        gate = pre.relu()
        loss = loss + unit * cfg.l1_coeff * gate.sum(-1).mean()
        loss = loss + mse(gate @ sae.W_dec.detach() + sae.b_dec.detach() - x)
    if cfg.arch == "jumprelu":
        l0 = step(pre, sae.threshold, sae.eps).sum(-1).mean()
        loss = loss + unit * cfg.l0_coeff * (l0 if cfg.target_l0 is None else (l0 / cfg.target_l0 - 1) ** 2)
        if cfg.preact_coeff:  # as the SAE does: the dense baseline's step pays for it only when it is on
            loss = loss + unit * cfg.preact_coeff * (sae.threshold - pre).relu().sum(-1).mean()
    if cfg.arch in K_ARCHS and dead is not None and bool(dead.any()):
        a = pre[:, dead].relu()
        if cfg.aux_batch:  # the batch's top n·aux_k
            flat = a.flatten()
            i = flat.topk(min(x.shape[0] * cfg.aux_k, flat.numel())).indices
            kept = torch.zeros_like(flat).scatter(0, i, flat[i]).view_as(a)
        else:
            v, i = a.topk(min(cfg.aux_k, int(dead.sum())), dim=1)
            kept = torch.zeros_like(a).scatter(1, i, v)
        aux = kept @ sae.W_dec[dead]
        residual = (x - x_hat).detach()
        scale = mse(residual - residual.mean(0)).clamp_min(1e-12) if cfg.aux_norm else 1.0
        loss = loss + cfg.aux_coeff * mse(aux - residual) / scale
    return loss


def _saelens_step(arch: str, d: int, m: int, k: int, x: torch.Tensor, dead: torch.Tensor, device: str):
    """SAELens's own training SAE and SAETrainer.step (its defaults: Adam 0.9/0.999, clipping at 1),
    with the same latents marked dead every step so its aux loss does the same work as ours."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    kw = dict(d_in=d, d_sae=m, device=device)
    sae = {"batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **kw)),
           "topk": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **kw)),
           "jumprelu": lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**kw)),
           "relu": lambda: StandardTrainingSAE(StandardTrainingSAEConfig(**kw))}[arch]()
    cfg = SAETrainerConfig(total_training_samples=10 ** 9, train_batch_size_samples=len(x), device=device,
                           autocast=device.startswith("cuda"))
    cfg.lr_end = cfg.lr / 10
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    idx = dead.nonzero().squeeze(1)

    def one():
        trainer.n_forward_passes_since_fired[idx] = cfg.dead_feature_window + 1
        trainer.step(x)
    return one


def step_time(arch: str, impl: str, d: int, m: int, k: int, batch: int, steps: int, device: str,
              dead_fraction: float = 0.25) -> dict:
    """Tokens per second of one implementation's training step (impl: ours, dense or saelens)."""
    torch.manual_seed(0)
    x = torch.randn(batch, d, device=device)
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[: int(m * dead_fraction)] = True  # exercise the aux loss too
    if impl == "saelens":
        one = _saelens_step(arch, d, m, k, x, dead, device)
    elif impl == "ours":  # the trainer's step: a stack of one SAE, clipping and Adam included
        st = stack_trainer(arch, 1, d, m, k, dead_fraction, device)
        st.stack.init_from_data(x)
        step_t = torch.zeros((), dtype=torch.long, device=device)

        def one():
            st.state.since_fired[:, : int(m * dead_fraction)] = 10 ** 9  # the same latents dead every step
            st.step(x, step_t)
    else:
        sae = SAE(SAEConfig(arch, d_in=d, d_sae=m, k=k if arch in ("batchtopk", "topk") else None,
                            jumprelu_init_l0=k)).to(device)
        sae.init_from_data(x)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99), fused=device.startswith("cuda") or None)

        def one():
            opt.zero_grad(set_to_none=True)
            ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                   else torch.autocast("cpu", enabled=False))
            with ctx:
                loss = dense_losses(sae, x, dead)
            loss.backward()
            with torch.no_grad():
                g = sae.W_dec.grad
                g -= (g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
            opt.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

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


def _isolated(arch: str, impl: str, d: int, m: int, k: int, batch: int, steps: int, device: str,
              dead_fraction: float) -> dict:
    """Each measurement in a fresh process, so the CPU peak memory is its own."""
    code = (f"import json, batchtopk.bench.train_bench as b; print(json.dumps(b.step_time({arch!r}, {impl!r}, "
            f"{d}, {m}, {k}, {batch}, {steps}, {device!r}, {dead_fraction!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parent.parent)
    return json.loads(r.stdout.strip().splitlines()[-1])


def matmul_rate(d: int, m: int, batch: int, device: str) -> float:
    """FLOP/s of the encoder's dense product [batch, d] x [d, m] in fp32 (bf16 on a GPU, as trained)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, m, device=device, dtype=dtype)
    t = timed(lambda: a @ b, repeat=5, warmup=2, device=device)
    return 2 * batch * d * m / t


def _best(arch: str, impls: tuple[str, ...], rounds: int, *args) -> dict[str, dict]:
    """Each implementation's fastest of `rounds` isolated runs (and its highest peak memory), the
    implementations taking turns, so a slow spell of a shared machine does not fall on one of them alone."""
    best: dict[str, dict] = {}
    peak: dict[str, float] = {}
    for _ in range(rounds):
        for impl in impls:
            r = _isolated(arch, impl, *args)
            peak[impl] = max(peak.get(impl, 0.0), r["peak_mib"])
            if impl not in best or r["tokens_per_s"] > best[impl]["tokens_per_s"]:
                best[impl] = r
    return {impl: r | {"peak_mib": peak[impl]} for impl, r in best.items()}


def run(d: int = 576, m: int = 4608, k: int = 32, batch: int = 4096, steps: int = 5,
        device: str | None = None, dead_fraction: float = 0.25, rounds: int = 3) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    settings = {"d_in": d, "d_sae": m, "k": k, "batch": batch, "steps": steps, "dead_fraction": dead_fraction,
                "rounds": rounds}
    recs = []
    rate = matmul_rate(d, m, batch, device)
    bound = rate / (2 * batch * d * m + 8 * batch * k * d) * batch  # tokens/s if the step cost only that
    for arch in ARCHS:
        runs = _best(arch, ("ours", "dense", "saelens"), rounds, d, m, k, batch, steps, device, dead_fraction)
        ours, dense, theirs = runs["ours"], runs["dense"], runs["saelens"]
        recs.append(Record(f"train step {arch}", ours["tokens_per_s"], "tok/s", "dense PyTorch, same math",
                           dense["tokens_per_s"], dev, settings | {"peak_mib": round(ours["peak_mib"]),
                                                                   "baseline_peak_mib": round(dense["peak_mib"])}))
        recs.append(Record(f"train step {arch}", ours["tokens_per_s"], "tok/s", "SAELens training SAE, its step",
                           theirs["tokens_per_s"], dev, settings | {"baseline_peak_mib": round(theirs["peak_mib"])}))
        if arch in ("batchtopk", "topk"):
            recs.append(Record(f"train step {arch}", ours["tokens_per_s"], "tok/s",
                               "FLOP bound: (2Bdm + 8Bkd) at matmul rate", bound, dev,
                               settings | {"matmul_flops_per_s": rate}))
    # the batch-level top-k itself
    pre = torch.randn(batch, m, device=device)
    t_ours = timed(lambda: batch_topk(pre[None], k), repeat=3, device=device)
    t_flat = timed(lambda: pre.flatten().topk(batch * k, sorted=False).indices.sort(), repeat=3, device=device)
    recs.append(Record("batch top-(n*k) selection", batch / t_ours, "tok/s", "flat topk over n*m", batch / t_flat,
                       dev, settings))
    for width in (d, 2304):
        recs.append(loader_record(width, batch, dev))
    recs.append(fed_training_record(d, m, k, batch, device, dev))
    return recs


def _synthetic_cache(root: str, d: int, tokens: int) -> Cache:
    """A float16 cache of random activations, chunks of about 4 MiB as the harvester writes them."""
    n_seq = tokens // 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    chunk_seqs = max(1, round(4 * 2**20 / (128 * d * 2)))
    return write_cache(root, synthetic_tokens(n_seq), {"s": x}, dtype="float16", chunk_seqs=chunk_seqs)


def loader_record(d: int, batch: int, dev: str, tokens: int | None = None) -> Record:
    """The loader on its own (checksums, shuffle by index, gather, decode to float32, batches) against
    reading the same chunk files' bytes sequentially (both from the page cache after a warm-up).
    The cache holds about 300 MB whatever the width."""
    tokens = tokens or 262144 * 576 // d
    with tempfile.TemporaryDirectory() as tmp:
        cache = _synthetic_cache(f"{tmp}/c", d, tokens)
        split = Split.of(cache, 0.0)
        rows = Rows(cache, "s", split, include_bos=True, include_outliers=True)
        n_batches = ActivationStream(rows, batch, 1.0).batches_per_epoch

        def load():  # a fresh stream each time: checksums are verified again, as in a new process
            it = ActivationStream(rows, batch, 1.0).batches(0)
            for _ in range(n_batches):
                next(it)
            it.close()

        files = [cache.chunk_file("s", c) for c in range(cache.n_chunks)]

        def raw():
            for f in files:
                with open(f, "rb") as fh:
                    fh.read()

        t_load = timed(load, repeat=3)
        t_raw = timed(raw, repeat=3)
    return Record(f"loader, float16, d={d}", n_batches * batch / t_load, "tok/s",
                  "raw sequential reads of the chunk files", tokens / t_raw, dev,
                  {"d_in": d, "batch": batch, "dtype": "float16", "tokens": tokens,
                   "bytes_per_token": 2 * d})


def fed_training_record(d: int, m: int, k: int, batch: int, device: str, dev: str, steps: int = 16) -> Record:
    """BatchTopK training fed by the loader (a fresh stream each time: its start-up is counted) against
    the same steps on batches already in memory, best of 5 each, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = _synthetic_cache(f"{tmp}/c", d, batch * steps)
        stream = ActivationStream(Rows(cache, "s", Split.of(cache, 0.0), include_bos=True, include_outliers=True),
                                  batch, 1.0, device=device)
        it = stream.batches(0)
        held = [next(it) for _ in range(stream.batches_per_epoch)]
        it.close()
        st = stack_trainer("batchtopk", 1, d, m, k, 0.0, device)
        step_t = torch.zeros((), dtype=torch.long, device=device)

        def train(batches):
            for x in batches:
                st.step(x, step_t)

        def fed():
            it = stream.batches(0)
            train(next(it) for _ in range(len(held)))
            it.close()

        train(held[:2])  # warm-up: first-step allocations and Adam's state
        t_fed, t_mem = float("inf"), float("inf")
        for _ in range(5):  # alternating, so a slow spell of a shared machine hits both
            t_fed = min(t_fed, timed(fed, repeat=1, warmup=0, device=device))
            t_mem = min(t_mem, timed(lambda: train(held), repeat=1, warmup=0, device=device))
    n = len(held) * batch
    return Record("BatchTopK training fed by the loader", n / t_fed, "tok/s", "the same steps on batches in memory",
                  n / t_mem, dev, {"d_in": d, "d_sae": m, "k": k, "batch": batch, "steps": len(held)})
