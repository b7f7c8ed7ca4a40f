"""Streaming accumulators for reconstruction and downstream metrics (float64 sums)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchtopk.train.sae import NMSE, standardized_mse

DEFINITIONS = {
    "nmse": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over evaluated tokens",
    "standardized_mse": "the paper's normalised MSE: mean over tokens and dimensions of "
                        "((x_hat - x) / (std(x) + 1e-5))^2, "
                        "std over the token's own dimensions (x and x_hat standardised with x's statistics)",
    "explained_variance": "1 - sum ||e - mean(e)||^2 / sum ||x - mean(x)||^2, e = x - x_hat",
    "cosine_sim": "mean over tokens of cos(x, x_hat)",
    "l0": "mean number of active latents per evaluated token",
    "dead_fraction": "fraction of latents that never fired on the evaluation tokens",
    "ce_degradation": "ce_spliced - ce_clean (nats per token; positive is worse)",
    "ce_loss_recovered": "(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean)",
    "kl_div": "mean over positions of KL(clean || spliced) next-token distributions",
}


def token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each position 0..T-2, shape [b, T-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1)


def token_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    p = clean_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@dataclass
class CE:
    total: float = 0.0
    n: int = 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.double().sum())
        self.n += values.numel()

    @property
    def mean(self) -> float:
        return self.total / max(1, self.n)


@dataclass
class Recon:
    """Reconstruction statistics of one SAE in one mode."""

    d_sae: int
    n: int = 0
    err: NMSE = field(default_factory=NMSE)
    sum_e: Any = None
    sum_cos: float = 0.0
    sum_std_mse: float = 0.0
    l0_counts: Any = None
    fired: Any = None
    ce: CE = field(default_factory=CE)
    kl: CE = field(default_factory=CE)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, counts: torch.Tensor, fired: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        e = x - x_hat
        if self.sum_e is None:
            self.sum_e = torch.zeros(x.shape[1], dtype=torch.float64)
            self.fired = torch.zeros(self.d_sae, dtype=torch.float64)
            self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.float64)
        self.n += x.shape[0]
        self.err.add(x, x_hat)
        self.sum_e += e.sum(0).cpu()
        self.sum_cos += float(F.cosine_similarity(x, x_hat, dim=1, eps=1e-12).sum())
        self.sum_std_mse += float(standardized_mse(x, x_hat).sum())
        self.l0_counts += torch.bincount(counts.cpu(), minlength=self.d_sae + 1)[: self.d_sae + 1].double()
        self.fired += fired.double().cpu()

    def result(self, ce_clean: float, ce_zero: float, ce_mean: float) -> dict[str, Any]:
        n = self.n
        e_var = self.err.error - float(self.sum_e.pow(2).sum()) / n
        counts = self.l0_counts.numpy()
        levels = np.arange(len(counts))
        l0 = float((counts * levels).sum() / n)
        cdf = np.cumsum(counts) / n
        freq = (self.fired / n).numpy()
        hist, edges = np.histogram(np.log10(freq[freq > 0]), bins=30, range=(-6, 0))
        ce_spliced = self.ce.mean
        return {
            "nmse": self.err.value, "standardized_mse": self.sum_std_mse / n,
            "explained_variance": 1 - e_var / self.err.variance,
            "cosine_sim": self.sum_cos / n, "l0": l0,
            "l0_quantiles": {q: int(np.searchsorted(cdf, q / 100)) for q in (5, 25, 50, 75, 95)},
            "l0_histogram": {int(i): int(c) for i, c in enumerate(counts) if c},
            "dead_fraction": float((self.fired == 0).double().mean()),
            "latent_density_log10_histogram": {"edges": edges.tolist(), "counts": hist.tolist(),
                                               "never_fired": int((freq == 0).sum())},
            "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablated": ce_zero, "ce_mean_ablated": ce_mean,
            "ce_degradation": ce_spliced - ce_clean,
            "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl_div": self.kl.mean, "n_tokens": n,
        }
