"""Quantile: relu(pre) above a threshold that follows the batches' (1 - k/m) quantile of pre (a moving average
of the n·k-th largest: the BatchTopK authors' running-quantile idea); at inference JumpReLU with one global θ,
estimated as BatchTopK's."""
from __future__ import annotations

import torch

from batchtopk.core import distributed

from ..sparsity import batch_topk
from .batchtopk import BatchTopK

QUANTILE_CAPACITY = 2  # a training step keeps at most this many times n·k pairs (fixed shape)


class Quantile(BatchTopK):
    """BatchTopK's θ and inference (its 'train' mode: the batch's n·k largest); trained on a threshold."""

    name = "quantile"
    batch = False

    def select(self, stack, pre, sl):
        """The QUANTILE_CAPACITY·n·k largest pre-activations (exact, fixed shape; those above the threshold are
        kept, all of them unless more than that pass it). Notes the batch's n·k-th largest value, the (1 - k/m)
        quantile the threshold follows."""
        S, n, _ = pre.shape
        idx = batch_topk(pre, QUANTILE_CAPACITY * stack.key.k)
        top = pre.reshape(S, -1).gather(1, idx)
        stack.batch_quantile[sl].copy_(top.topk(n * stack.key.k, dim=1, sorted=False).values.amin(1))
        return idx, None

    def keep(self, stack, vals):
        """The pairs above the threshold (the first batch: its own quantile)."""
        theta = torch.where(torch.isfinite(stack.threshold), stack.threshold, stack.batch_quantile)
        return vals * (vals.detach() > theta[:, None])

    @torch.no_grad()
    def after_step(self, stack, world):
        """Move each threshold quantile_rate of the way to the last batch's quantile (averaged over ranks); the
        first batch sets it."""
        q = distributed.all_reduce_(stack.batch_quantile.clone()) / world
        t = stack.threshold
        t.copy_(torch.where(torch.isfinite(t), t + stack.quantile_rate * (q - t), q))

    def to_sae(self, stack, i, sae):
        sae.theta.fill_(float(stack.threshold[i].clamp_min(0)))  # its training threshold (finish sets θ)

    def running_theta(self, stack, state, i):
        return float(stack.threshold[i])


ARCH = Quantile()
