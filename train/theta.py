"""Thresholds set after training from the final weights: BatchTopK's global θ, and the common shift that
puts a JumpReLU with a target L0 on its target.

The paper's eq. 7 sets θ to the expected smallest activation that batch top-(n·k) keeps. Two
estimates over N training batches of the training batch size n:

    mean     the mean over batches of each batch's smallest kept activation (eq. 7 as written)
    pooled   the smallest activation kept by one top-(N·n·k) over all N batches together: the limit
             of eq. 7 as the batch grows, and the threshold at which those N·n tokens use k latents
             per token on average

A JumpReLU trained with a target-L0 penalty lands near its target, not on it. `target_shift` finds
the one factor c by which to multiply every threshold so that the same batches use target_l0
latents per token on average: the pooled estimate above applied to pre / threshold.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .sparsity import batch_topk

ESTIMATORS = ("pooled", "mean")


def _top_values(acts: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest positive values of acts [n, m] (exact), largest first (fewer where fewer are
    positive)."""
    n, m = acts.shape
    k = max(1, -(-count // n))
    vals = acts.flatten()[batch_topk(acts[None], min(k, m))[0]]
    vals = vals[vals > 0].sort(descending=True).values
    return vals[:count]


@torch.no_grad()
def estimate_theta(xs: Sequence[torch.Tensor], pre: Callable[[torch.Tensor], torch.Tensor], k: int) -> dict[str, float]:
    """Both estimates over the batches xs, with `pre` giving a batch's pre-activations [n, m].

    Each batch keeps its top 2·n·k activations; the pooled threshold is exact as long as no batch has
    all of its stored values above it, which is checked (that batch is recomputed with a larger store).
    """
    def top(i: int, factor: int) -> torch.Tensor:
        return _top_values(pre(xs[i]).relu().float(), factor * len(xs[i]) * k)

    factors = [2] * len(xs)
    stores = [top(i, 2) for i in range(len(xs))]
    mins = [float(s[len(x) * k - 1]) if len(s) >= len(x) * k else 0.0 for s, x in zip(stores, xs)]
    total = sum(len(x) for x in xs) * k
    while True:
        pooled = torch.cat(stores)
        theta = float(pooled.topk(min(total, len(pooled))).values[-1]) if len(pooled) else 0.0
        short = [i for i, s in enumerate(stores) if len(s) == factors[i] * len(xs[i]) * k and float(s[-1]) >= theta]
        if not short:
            return {"pooled": theta, "mean": sum(mins) / len(mins)}
        for i in short:
            factors[i] *= 2
            stores[i] = top(i, factors[i])


@torch.no_grad()
def target_shift(xs: Sequence[torch.Tensor], pre: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor,
                 target: float) -> float | None:
    """The factor c such that thresholds c·θ keep round(target) latents per token on average over xs
    (None when fewer pre-activations than that are positive at all)."""
    c = estimate_theta(xs, lambda x: pre(x) / threshold, max(1, round(target)))["pooled"]
    return c if c > 0 else None
