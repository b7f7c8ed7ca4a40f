"""JumpReLU (Rajamanoharan et al. 2024): pre·H(pre - θ_i) with a learned threshold per latent, straight-through
gradients through a kernel of width `bandwidth`, and an L0 penalty (or, with target_l0, a penalty on L0's
distance from its target, whose thresholds are then scaled after training to land it there)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..sparsity import Code, jumprelu, step
from .base import DenseArch


class JumpReLU(DenseArch):
    name = "jumprelu"
    export = "jumprelu"
    coeff_setting = "l0_coeff"
    params = ("log_threshold",)
    checks_l0 = True

    def title(self, cfg):
        target = f"t{cfg.target_l0:g}_" if cfg.target_l0 is not None else ""
        return f"jumprelu_{target}l{cfg.l0_coeff:g}_i{cfg.jumprelu_init_l0:g}_m{cfg.d_sae}"

    def sets_threshold(self, cfg):
        return cfg.target_l0 is not None

    def init(self, sae):
        sae.log_threshold = nn.Parameter(torch.full((sae.cfg.d_sae,), math.log(0.001)))

    @torch.no_grad()
    def init_from_data(self, sae, x):
        """Thresholds such that about jumprelu_init_l0 latents fire per token on the first batch x (input space)."""
        q = 1.0 - min(1.0, sae.cfg.jumprelu_init_l0 / sae.cfg.d_sae)
        theta = torch.quantile(sae.pre(x).float(), q, dim=0).clamp_min(1e-3)
        sae.log_threshold.copy_(theta.log())

    def code(self, sae, pre, mode):
        return Code.from_dense(jumprelu(pre, sae.threshold, sae.eps))

    def saved(self, sae, tensors):
        tensors["threshold"] = sae.threshold.detach().float().contiguous()

    def restore(self, sae, tensors):
        sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())

    def activate(self, stack, pre, x_in, coeff, unit, out):
        theta = stack.log_threshold.exp()[:, None, :]
        eps = stack.eps[:, None, None]
        f = jumprelu(pre, theta, eps)
        l0 = step(pre, theta, eps).sum(-1).mean(-1)
        penalty = (l0 / stack.target_l0 - 1) ** 2 if stack.key.target else l0
        out["sparsity"] = unit * coeff * penalty
        if stack.key.preact:  # Anthropic's pre-activation loss, sum_i relu(θ_i - pre_i)
            out["preact"] = unit * stack.preact_coeff * (theta - pre).relu().sum(-1).mean(-1)
        return f


ARCH = JumpReLU()
