"""Matryoshka BatchTopK (Bussmann et al. 2025): BatchTopK's selection and θ, trained so that each prefix of the
dictionary (nested groups of latents) reconstructs x on its own: the loss sums the prefixes' MSEs."""
from __future__ import annotations

import itertools

import torch

from ..sparsity import decode_pairs
from .batchtopk import BatchTopK

# the default groups, as fractions of the dictionary: its authors' spacing (prefixes of 1/16, 1/8, 1/4, 1/2 and
# all of it; bartbussmann/matryoshka_sae)
MATRYOSHKA_GROUPS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


class Matryoshka(BatchTopK):
    name = "matryoshka"

    def check(self, cfg):
        super().check(cfg)
        cfg.group_sizes  # noqa: B018  (checks the groups)

    def extra_losses(self, stack, idx, vals, dense, x_in, grouped, out):
        """The summed MSEs of the reconstructions by each proper prefix of the dictionary (its first group, its
        first two, ...; the whole dictionary's is `mse`), from the same kept pairs (or dense code)."""
        m, n = stack.key.d_sae, x_in.shape[1]
        total = torch.zeros(stack.size, device=x_in.device)
        for end in itertools.accumulate(stack.key.groups[:-1]):
            if dense is not None:
                part = torch.bmm(dense[..., :end], stack.W_dec[:, :end])
            else:
                part = decode_pairs(idx, vals * (idx % m < end), stack.W_dec, n, grouped)
            total = total + stack.mse(part + stack.b_dec[:, None, :] - x_in)
        out["prefix_mse"] = total


ARCH = Matryoshka()
