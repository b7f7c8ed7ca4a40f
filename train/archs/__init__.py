"""The architectures, one file each (docs/architectures.md says how to add one). `ARCHS` maps each name to its
object, in the order the help lists them; the name tuples below are derived from the objects."""
from __future__ import annotations

from . import batchtopk, gated, jumprelu, matryoshka, quantile, relu, topk
from .base import ALL, Arch, names

ALL.update((m.ARCH.name, m.ARCH) for m in (batchtopk, topk, quantile, matryoshka, jumprelu, relu, gated))
ARCHS: dict[str, Arch] = ALL
K_ARCHS = names("takes_k")           # k latents per token (on average)
THETA_ARCHS = names("global_theta")  # one global θ at inference
BATCH_ARCHS = names("batch")         # training on the batch's n·k largest
L1_ARCHS = names("l1")               # an L1 penalty (and resampling)
