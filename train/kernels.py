"""The two programs a stack's math runs as: the fixed-shape kernels (every shape fixed by the settings, nothing
read back from the device: the GPU's program, compiled or not) and the exact CPU kernels (eager, with host
reads and data-dependent shapes). The math in stack.py calls one of them and never asks which it is; the
Executor picks it once, at set-up.

The two give the same losses and gradients (the auxiliary loss: whenever no SAE has more dead latents than
the fixed-shape pool holds); tests/test_stack.py compares them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sparsity import batch_topk, batch_topk_hinted, by_latent

if TYPE_CHECKING:
    from .stack import SAEStack

# exact: SAEs stepped (or encoded) together, at most this many bytes of their [n, m] pre-activations (one SAE at
# least); measured on a 2-core machine with 300 MiB of L3, a stack of 8 at n 4096, m 4608 against 8 SAEs alone:
# 0.68-0.89x whole, 0.93-0.98x encoded in chunks, 0.98-1.04x stepped in parts (bench ops)
CPU_PRE_BYTES = 64 * 2**20


def top_per_row(block: torch.Tensor, k: int) -> torch.Tensor:
    """block [..., D] with each row's k largest entries kept and the rest -inf."""
    v, i = block.topk(k, dim=-1, sorted=False)
    return torch.full_like(block, float("-inf")).scatter_(-1, i, v)


class FixedKernels:
    """The fixed-shape program: the whole stack at once, exact selections of fixed size, the auxiliary loss over
    the stack's fixed pool (`SAEStack.aux_pool`), and nothing read from the device."""

    name = "fixed-shape"  # (the executor's name for it)

    def chunk(self, stack: SAEStack, n: int) -> int:
        """How many of the stack's SAEs to encode together on a batch of n tokens."""
        return stack.size

    def steps_in_parts(self, world: int) -> bool:
        """Whether a step runs the stack's losses and backward a few SAEs at a time (`chunk`)."""
        return False

    def pre(self, stack: SAEStack, xe: torch.Tensor, xe1: torch.Tensor, sl: slice) -> torch.Tensor:
        """The pre-activations [S', n, m] of the stack's SAEs sl (xe: every SAE's encoder input [S, n, d]; xe1:
        with a column of ones)."""
        return torch.baddbmm(stack.b_enc[sl, None, :], xe[sl], stack.W_enc[sl])

    def batch_topk(self, pre: torch.Tensor, k: int, hint: torch.Tensor | None = None, sl: slice = slice(None)
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The n·k largest entries of each pre[s] [n, m] (flat indices [S', n·k], sorted), and each latent's
        largest entry [S', m] where the selection finds it on the way (else None). hint: the stack's [S], a little
        below the last batch's n·k-th values, of which pre's SAEs are sl (the exact kernels' shortcut, updated in
        place), or None."""
        return batch_topk(pre, k), None

    def aux_width(self, stack: SAEStack, dead: torch.Tensor) -> int:
        """The auxiliary loss's pool width D for the dead latents [S, m]."""
        return stack.aux_pool

    def aux_top(self, block: torch.Tensor, k: int) -> torch.Tensor:
        """The pool's block [S, n, D] with each token's k largest entries kept, the rest -inf."""
        return top_per_row(block, k)

    def by_latent(self, idx: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, ...] | None:
        """The kept pairs grouped by latent for both sparse gradients (`sparsity.by_latent`), or None: the
        gradients scatter pair by pair."""
        return None


class ExactKernels(FixedKernels):
    """The CPU's exact eager program, where launches cost nothing and data-dependent shapes are free: a stack
    trains as fast per SAE as its SAEs alone. It steps its losses and backward a few SAEs at a time (`chunk`;
    under DDP, which needs the whole stack's forward, it encodes a few at a time), so each SAE's temporaries stay
    in the cache, and it reads the host: BatchTopK's selection starts from a hint (a little below the last
    batch's n·k-th value), the auxiliary pool is the dead set itself (the exact loss at every step) and selects
    only where it must, and the kept pairs are grouped by latent once for both sparse gradients."""

    name = "exact"

    def chunk(self, stack: SAEStack, n: int) -> int:
        return max(1, CPU_PRE_BYTES // (n * stack.key.d_sae * stack.W_enc.element_size()))

    def steps_in_parts(self, world: int) -> bool:
        return world == 1

    def pre(self, stack: SAEStack, xe: torch.Tensor, xe1: torch.Tensor, sl: slice) -> torch.Tensor:
        """One matrix product per SAE with the bias as the ones' weights: on the CPU faster than baddbmm, which
        first copies the bias into every row of its output."""
        xe1 = xe1[sl]
        pre = xe1.new_empty(*xe1.shape[:2], stack.key.d_sae)
        for j, s in enumerate(range(*sl.indices(stack.size))):
            torch.mm(xe1[j], torch.cat([stack.W_enc[s], stack.b_enc[s, None]]), out=pre[j])
        return pre

    def batch_topk(self, pre: torch.Tensor, k: int, hint: torch.Tensor | None = None, sl: slice = slice(None)
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hint is None:
            return super().batch_topk(pre, k)
        hint = hint[sl]
        idx, ok, peak = batch_topk_hinted(pre, k, hint)
        for s in (~ok).nonzero()[:, 0].tolist():  # the hint missed (the first batch, or a jump): the exact path
            idx[s] = batch_topk(pre[s:s + 1], k)[0]
        kth = pre.reshape(pre.shape[0], -1).gather(1, idx).amin(1)
        hint.copy_(kth - 0.05 * kth.abs())
        return idx, peak

    def aux_width(self, stack: SAEStack, dead: torch.Tensor) -> int:
        """The most dead latents of an SAE: the pool holds every dead latent, with no column wider than it needs."""
        return max(1, int(dead.sum(1).max()))

    def aux_top(self, block: torch.Tensor, k: int) -> torch.Tensor:
        """Only the tokens with more than k positive entries need a selection."""
        s, t = ((block > 0).sum(2) > k).nonzero().unbind(1)
        block[s, t] = top_per_row(block[s, t], k)
        return block

    def by_latent(self, idx: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, ...] | None:
        return by_latent(idx, n, m)


FIXED, EXACT = FixedKernels(), ExactKernels()
