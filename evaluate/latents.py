"""Per-latent statistics in one streaming pass over cached activations (no forward pass of the model).

For each latent: how often it fires, the sum and maximum of its activations, its top activating rows,
a uniform sample of its firings (for contexts at lower quantiles) and a histogram of its activations.
Everything merges batch by batch with fixed memory, so any number of tokens can be scanned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

HIST_BINS = 40
HIST_DECADES = 4.0  # the histogram spans [max / 10^4, max * 10^0.5] of the first batch, in log10 bins


def merge_top(keys: torch.Tensor, payload: list[torch.Tensor], cols: torch.Tensor, new_keys: torch.Tensor,
              new_payload: list[torch.Tensor]) -> None:
    """Keep, for each latent (row of keys [m, T]), the T largest keys among its kept ones and the new
    (col, key) pairs; payload tensors [m, T] follow their keys. In place."""
    m, T = keys.shape
    if len(cols) == 0:
        return
    # group the new pairs by latent, largest key first, and keep each latent's first T
    order = torch.argsort(new_keys, descending=True, stable=True)
    order = order[torch.argsort(cols[order], stable=True)]
    c = cols[order]
    start = torch.searchsorted(c, c, right=False)  # first position of each pair's latent
    rank = torch.arange(len(c)) - start
    keep = rank < T
    sel, slot = order[keep], rank[keep]
    cand_k = torch.full((m, T), -math.inf, dtype=keys.dtype)
    cand_k[c[keep], slot] = new_keys[sel]
    cand_p = []
    for p, new in zip(payload, new_payload):
        cp = torch.full((m, T), -1, dtype=p.dtype) if not p.is_floating_point() else torch.zeros((m, T), dtype=p.dtype)
        cp[c[keep], slot] = new[sel]
        cand_p.append(cp)
    all_k = torch.cat([keys, cand_k], 1)
    best = all_k.topk(T, dim=1).indices
    keys.copy_(all_k.gather(1, best))
    for p, cp in zip(payload, cand_p):
        p.copy_(torch.cat([p, cp], 1).gather(1, best))


@dataclass
class LatentStats:
    """Running statistics of m latents over scanned tokens (rows are global row ids of the cache)."""

    m: int
    top: int = 20
    sample: int = 64
    seed: int = 0
    n_tokens: int = 0
    fired: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    max: torch.Tensor = field(init=False)
    top_vals: torch.Tensor = field(init=False)
    top_rows: torch.Tensor = field(init=False)
    sample_keys: torch.Tensor = field(init=False)
    sample_vals: torch.Tensor = field(init=False)
    sample_rows: torch.Tensor = field(init=False)
    hist: torch.Tensor = field(init=False)
    hist_lo: float | None = None  # log10 of the histogram's lower edge

    def __post_init__(self) -> None:
        m = self.m
        self.fired = torch.zeros(m, dtype=torch.int64)
        self.total = torch.zeros(m, dtype=torch.float64)
        self.max = torch.zeros(m)
        self.top_vals = torch.full((m, self.top), -math.inf)
        self.top_rows = torch.full((m, self.top), -1, dtype=torch.int64)
        self.sample_keys = torch.full((m, self.sample), -math.inf)
        self.sample_vals = torch.zeros((m, self.sample))
        self.sample_rows = torch.full((m, self.sample), -1, dtype=torch.int64)
        self.hist = torch.zeros((m, HIST_BINS), dtype=torch.int64)
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def hist_edges(self) -> np.ndarray:
        return 10 ** np.linspace(self.hist_lo, self.hist_lo + HIST_DECADES + 0.5, HIST_BINS + 1)

    def add(self, row_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """One batch: row_ids [n] global ids of its tokens; (rows, cols, vals) its nonzero activations."""
        self.n_tokens += len(row_ids)
        vals = vals.float()
        if len(vals) == 0:
            return
        self.fired += torch.bincount(cols, minlength=self.m)
        self.total.index_add_(0, cols, vals.double())
        self.max.scatter_reduce_(0, cols, vals, "amax")
        gid = row_ids[rows]
        merge_top(self.top_vals, [self.top_rows], cols, vals, [gid])
        # a uniform sample of each latent's firings: the `sample` largest of independent random keys
        keys = torch.rand(len(vals), generator=self._gen)
        merge_top(self.sample_keys, [self.sample_vals, self.sample_rows], cols, keys, [vals, gid])
        if self.hist_lo is None:
            self.hist_lo = math.floor(math.log10(float(vals.max())) * 2) / 2 - HIST_DECADES
        b = ((vals.log10() - self.hist_lo) / (HIST_DECADES + 0.5) * HIST_BINS).floor().long().clamp(0, HIST_BINS - 1)
        self.hist.view(-1).index_add_(0, cols * HIST_BINS + b, torch.ones_like(b))

    def top_of(self, latent: int) -> list[tuple[float, int]]:
        """(activation, row) of a latent's top rows, largest first."""
        v, r = self.top_vals[latent], self.top_rows[latent]
        return [(float(a), int(b)) for a, b in zip(v, r) if b >= 0]

    def samples_of(self, latent: int) -> list[tuple[float, int]]:
        """(activation, row) of the sampled firings of a latent, smallest activation first."""
        v, r = self.sample_vals[latent], self.sample_rows[latent]
        out = [(float(a), int(b)) for a, b in zip(v, r) if b >= 0]
        return sorted(out)
