"""`python -m bench theta SAE_DIR...`: how a BatchTopK SAE's threshold mode depends on when its
training tokens were seen.

For each SAE: the threshold-mode L0 (over k) of the run's own training batches, replayed in training
order with the final weights at the saved θ, one figure per tenth of the run; the same over the
held-out rows the trainer's `heldout_l0` reads; and the held-out L0 again at a θ estimated (pooled,
as the trainer does) from the batches of the middle of the run only (steps 10-70%, at most 2^18
tokens of them, spread evenly), which leaves out the tokens the SAE saw last.
The batches are the ones the trainer saw: the SAE's cfg.json names its cache, seed, batch size,
held-out sequences and exclusions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows
from batchtopk.core.errors import PipelineError
from batchtopk.train.finish import HELDOUT_L0_ROWS
from batchtopk.train.sae import load_sae
from batchtopk.train.stream import ActivationStream
from batchtopk.train.theta import estimate_theta

from .records import Record, device_name

MIDDLE = (0.1, 0.7)  # the part of the run whose batches the alternative θ comes from
MIDDLE_TOKENS = 1 << 18  # at most this many tokens of it, in batches spread evenly over it


def _l0(pre: torch.Tensor, theta: float) -> tuple[int, int]:
    """(active pairs, tokens) of a batch's pre-activations at threshold θ."""
    return int((pre > theta).sum()), len(pre)


@torch.no_grad()
def measure(sae_dir: str | Path, every: int = 1) -> list[Record]:
    """Records for one saved BatchTopK SAE (see the module docstring); `every` > 1 encodes only every
    so many of the run's batches (a long run's replay costs a fifth of its training otherwise)."""
    if every < 1:
        raise PipelineError(f"every={every} must be at least 1 (encode every n-th batch of the run)")
    sae, meta = load_sae(sae_dir)
    md = meta["metadata"]
    if md.get("architecture") != "batchtopk":
        raise PipelineError(f"{sae_dir} is a {md.get('architecture')} SAE; `bench theta` reads BatchTopK SAEs")
    cache = Cache.open(md["cache"])
    if cache.attrs["cache_id"] != md["cache_id"]:
        raise PipelineError(f"{md['cache']} is no longer the cache {sae_dir} was trained on (cache id "
                            f"{cache.attrs['cache_id']}, not {md['cache_id']})")
    k, batch = md["k"], md["batch_size"]
    if not md.get("heldout_sequences"):
        raise PipelineError(f"{sae_dir} was trained with no held-out part (val_fraction 0): nothing to compare")
    rows = Rows.from_metadata(cache, md)
    parts = md.get("data_parts", md.get("world_size", 1))  # SAEs saved before data_parts was recorded
    steps = -(-md["training_tokens"] // batch)
    stream = ActivationStream(rows, batch, 1.0, seed=md["seed"], parts=parts, my_parts=tuple(range(parts)),
                              shuffle_mb=md.get("shuffle_mb", 512))

    def pre(x: torch.Tensor) -> torch.Tensor:
        return sae.pre(sae.normalize(x)[0])

    theta = float(sae.theta)
    tenths = np.zeros((10, 2))
    lo, hi = (round(steps * f) for f in MIDDLE)
    spacing = max(1, math.ceil((hi - lo) * batch / MIDDLE_TOKENS))
    middle: list[torch.Tensor] = []
    it = stream.batches(0)
    try:
        for step in range(steps):
            x = next(it)
            if step % every == 0:
                tenths[step * 10 // steps] += _l0(pre(x), theta)
            if lo <= step < hi and (step - lo) % spacing == 0:
                middle.append(x)
    finally:
        it.close()
    theta_mid = estimate_theta(middle, pre, k)["pooled"]
    held = np.zeros((2, 2))
    for x in rows.chunks("heldout"):
        if held[0, 1] >= HELDOUT_L0_ROWS:  # whole chunks up to the trainer's cap, as its heldout_l0 reads
            break
        p = pre(x)
        held += [_l0(p, theta), _l0(p, theta_mid)]
    per_tenth = [round(float(a / n / k), 4) if n else None for a, n in tenths]  # a run under 10 steps
    l0_saved, l0_mid = (float(a / n / k) for a, n in held)
    settings = {"sae": str(sae_dir), "k": k, "d_sae": md["d_sae"], "steps": steps, "batch": batch,
                "theta": theta, "theta_middle": theta_mid, "middle_steps": [lo, hi], "middle_spacing": spacing,
                "every": every,
                "heldout_rows": int(held[0, 1]), "train_l0_over_k_by_tenth_of_run": per_tenth}
    dev = device_name("cpu")
    name = Path(sae_dir).name
    return [Record(f"{name}: held-out L0/k, θ from steps {lo}-{hi}", l0_mid, "L0/k",
                   "held-out L0/k at the saved θ", l0_saved, dev, settings)]
