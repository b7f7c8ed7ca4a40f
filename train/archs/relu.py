"""ReLU with an L1 penalty: the standard SAE (Bricken et al. 2023), decoder rows of unit norm."""
from __future__ import annotations

from ..sparsity import Code
from .base import DenseArch


class ReLU(DenseArch):
    name = "relu"
    export = "standard"
    coeff_setting = "l1_coeff"
    l1 = True

    def title(self, cfg):
        return f"{cfg.arch}_l{cfg.l1_coeff:g}_m{cfg.d_sae}"

    def code(self, sae, pre, mode):
        return Code.from_dense(pre.relu())

    def activate(self, stack, pre, x_in, coeff, unit, out):
        f = pre.relu()
        out["sparsity"] = unit * coeff * f.abs().sum(-1).mean(-1)
        return f


ARCH = ReLU()
