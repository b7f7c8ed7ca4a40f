"""One SAE's training losses and gradients, through a stack of one (the only training path)."""
from __future__ import annotations

import torch

from batchtopk.train.sae import SAE
from batchtopk.train.stack import SAEStack


class Losses:
    """stack.losses for one SAE: `out` holds its scalar losses (and x_hat), `grad(name)` its gradients
    after `backward`, `code` its kept pairs (idx, vals) or dense code."""

    def __init__(self, sae: SAE, x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0,
                 total: int = 100):
        self.stack = SAEStack([sae], 1e-3, (0.9, 0.99))
        since = torch.zeros(1, sae.cfg.d_sae, dtype=torch.long)
        if dead is not None:
            since[0, dead] = 10 ** 9
        coeff = self.stack.sparsity_coeff(torch.tensor(step), total)
        out, _, x_hat, code = self.stack.losses(x, since, coeff)
        self.out = {k: v[0] for k, v in out.items()} | {"x_hat": x_hat[0]}
        self.code = code

    def backward(self, key: str = "loss") -> Losses:
        self.out[key].backward()
        return self

    def grad(self, name: str) -> torch.Tensor:
        return getattr(self.stack, name).grad[0]

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad[0] for n, p in self.stack.named_parameters()}

    @property
    def nnz(self) -> int:
        code = self.code
        return int((code[1] > 0).sum()) if isinstance(code, tuple) else int((code != 0).sum())
