"""The architectures, one file each (docs/architectures.md says how to add one). `ARCHS` maps each name to its
object, in the order the help lists them; the name tuples below are derived from the objects."""
from __future__ import annotations

from . import batchtopk, gated, jumprelu, matryoshka, quantile, relu, topk
from .base import Arch

ARCHS: dict[str, Arch] = {m.ARCH.name: m.ARCH for m in (batchtopk, topk, quantile, matryoshka, jumprelu, relu, gated)}
K_ARCHS = tuple(n for n, a in ARCHS.items() if a.takes_k)           # k latents per token (on average)
THETA_ARCHS = tuple(n for n, a in ARCHS.items() if a.global_theta)  # one global θ at inference
BATCH_ARCHS = tuple(n for n, a in ARCHS.items() if a.batch)         # training on the batch's n·k largest
L1_ARCHS = tuple(n for n, a in ARCHS.items() if a.l1)               # an L1 penalty (and resampling)
