"""BatchTopK (Bussmann et al. 2024): the batch's n·k largest relu(pre), so each token uses k latents on
average; at inference JumpReLU with one global θ, the expected smallest kept activation (the paper's eq. 7).
A span trains on the span·k largest of each group of span tokens instead (span 1: TopK's constraint)."""
from __future__ import annotations

import torch

from ..kernels import FIXED, FixedKernels
from ..sparsity import batch_topk, span_topk
from .base import GlobalThetaArch


def select_batch(pre: torch.Tensor, k: int, span: int | None = None, kernels: FixedKernels = FIXED,
                 hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The n·k largest entries of each pre[s] [n, m] (flat indices [S, n·k], sorted), or with a span the span·k
    largest of each group of span consecutive tokens (a last, shorter group of r tokens: its r·k largest); and
    each latent's largest entry [S, m] where the kernels' selection finds it on the way (else None). Training,
    evaluation's batch mode and the θ estimates all select with this."""
    S, n, m = pre.shape
    if span is None or span >= n:
        return kernels.batch_topk(pre, k, hint)
    whole = n // span * span
    idx = span_topk(pre[:, :whole], k, span)
    if whole < n:
        idx = torch.cat([idx, batch_topk(pre[:, whole:], k) + whole * m], 1)
    return idx, None


class BatchTopK(GlobalThetaArch):
    name = "batchtopk"
    batch = True

    def select(self, stack, pre, sl):
        return select_batch(pre, stack.key.k, stack.key.span, stack.kernels, stack.hint[sl])


ARCH = BatchTopK()
