"""BatchTopK (Bussmann et al. 2024): the batch's n·k largest relu(pre), so each token uses k latents on
average; at inference JumpReLU with one global θ, the expected smallest kept activation (the paper's eq. 7).
A span trains on the span·k largest of each group of span tokens instead (span 1: TopK's constraint)."""
from __future__ import annotations

import torch

from ..kernels import FIXED, FixedKernels
from ..sparsity import Code, batch_topk, span_topk
from .base import KArch


def select_batch(pre: torch.Tensor, k: int, span: int | None = None, kernels: FixedKernels = FIXED,
                 hint: torch.Tensor | None = None, sl: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The n·k largest entries of each pre[s] [n, m] (flat indices [S, n·k], sorted), or with a span the span·k
    largest of each group of span consecutive tokens (a last, shorter group of r tokens: its r·k largest); and
    each latent's largest entry [S, m] where the kernels' selection finds it on the way (else None). Training,
    evaluation's batch mode and the θ estimates all select with this."""
    S, n, m = pre.shape
    if span is None or span >= n:
        return kernels.batch_topk(pre, k, hint, sl)
    whole = n // span * span
    idx = span_topk(pre[:, :whole], k, span)
    if whole < n:
        idx = torch.cat([idx, batch_topk(pre[:, whole:], k) + whole * m], 1)
    return idx, None


class BatchTopK(KArch):
    """Inference is JumpReLU with one θ, the SAE's `theta` (set from its final weights); as trained
    ('train'/'batch' mode), the batch's n·k largest (per span)."""

    name = "batchtopk"
    batch = True
    global_theta = True
    checks_l0 = True
    export = "jumprelu"

    def select(self, stack, pre, sl):
        return select_batch(pre, stack.key.k, stack.key.span, stack.kernels, stack.hint, sl)

    def code(self, sae, pre, mode):
        if mode == "threshold":
            return Code.from_dense(pre * (pre > sae.theta.clamp_min(0)))
        return Code.from_pairs(pre, select_batch(pre[None], sae.cfg.k, sae.cfg.span)[0][0])

    def saved(self, sae, tensors):
        tensors["threshold"] = torch.full((sae.cfg.d_sae,), float(sae.theta))  # θ in every latent

    def restore(self, sae, tensors):
        sae.theta.fill_(float(tensors["threshold"][0]))


ARCH = BatchTopK()
