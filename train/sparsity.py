"""Sparse codes and the activation functions that make them.

A code is kept as (rows, cols, vals) sorted by row: token `rows[i]` uses latent `cols[i]`
with value `vals[i]`. Decoding is then one `embedding_bag` over the kept pairs (forward
and backward touch only those rows of W_dec), instead of a dense [n, m] x [m, d] product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Code:
    """Selected latents of a batch: (rows, cols, vals) sorted by row, or a dense matrix.

    A code made from a dense matrix keeps it and extracts the index triples only when they
    are asked for (a sparse decode), so dense codes never pay for `nonzero`.
    """

    def __init__(self, rows: torch.Tensor | None, cols: torch.Tensor | None, vals: torch.Tensor | None,
                 n: int, m: int, f: torch.Tensor | None = None):
        self._rows, self._cols, self._vals, self.n, self.m, self.f = rows, cols, vals, n, m, f

    @classmethod
    def from_dense(cls, f: torch.Tensor) -> "Code":
        return cls(None, None, None, f.shape[0], f.shape[1], f)

    def _index(self) -> None:
        if self._rows is None:
            idx = self.f.flatten().nonzero().squeeze(1)  # sorted, so rows come out grouped
            self._rows, self._cols, self._vals = idx // self.m, idx % self.m, self.f.flatten()[idx]

    @property
    def rows(self) -> torch.Tensor:
        self._index()
        return self._rows

    @property
    def cols(self) -> torch.Tensor:
        self._index()
        return self._cols

    @cols.setter
    def cols(self, value: torch.Tensor) -> None:
        self._index()
        self._cols = value

    @property
    def vals(self) -> torch.Tensor:
        self._index()
        return self._vals

    @property
    def nnz(self) -> int:
        return int((self.f != 0).sum()) if self._rows is None else self._vals.numel()

    @property
    def counts(self) -> torch.Tensor:
        """Active latents per token."""
        if self._rows is None:
            return (self.f != 0).sum(1)
        return torch.bincount(self._rows, minlength=self.n)

    def fired(self) -> torch.Tensor:
        """How many tokens of the batch each latent fired on."""
        if self._rows is None:
            return (self.f != 0).sum(0)
        return torch.bincount(self._cols, minlength=self.m)

    def min_active(self) -> torch.Tensor:
        """The smallest kept activation (BatchTopK's threshold estimate uses it)."""
        v = self.f[self.f != 0] if self._rows is None else self._vals
        return v.detach().min()

    def dense(self) -> torch.Tensor:
        if self.f is not None:
            return self.f
        out = self._vals.new_zeros(self.n, self.m)
        out[self._rows, self._cols] = self._vals
        return out


def sparse_decode(code: Code, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals_j * W_dec[cols_j] per token (no bias), via embedding_bag."""
    offsets = torch.zeros(code.n, dtype=torch.long, device=code.rows.device)
    if code.n > 1:
        offsets[1:] = torch.cumsum(code.counts, 0)[:-1]
    return F.embedding_bag(code.cols, W_dec, offsets, mode="sum", per_sample_weights=code.vals.to(W_dec.dtype))


def topk_code(acts: torch.Tensor, k: int) -> Code:
    """Exactly k latents per token (the k largest; acts are post-ReLU, zeros dropped)."""
    n, m = acts.shape
    vals, cols = acts.topk(k, dim=1, sorted=False)
    rows = torch.arange(n, device=acts.device).repeat_interleave(k)
    keep = vals.flatten() > 0
    return Code(rows[keep], cols.flatten()[keep], vals.flatten()[keep], n, m)


def batch_topk_indices(acts: torch.Tensor, k: int, candidates: int = 4) -> torch.Tensor:
    """Flat indices (sorted) of the n*k largest entries of acts [n, m]; exact.

    Selection runs over each row's top `candidates*k` only, which holds the answer unless
    some row had every candidate selected (it might hold more); then it falls back to a
    flat top-k over the whole batch. Zeros are never kept.
    """
    n, m = acts.shape
    K = min(n * k, n * m)
    c = min(m, candidates * k)
    if c < m:
        cv, ci = acts.topk(c, dim=1, sorted=False)
        sel = cv.flatten().topk(K, sorted=False).indices
        rows = sel // c
        if int(torch.bincount(rows, minlength=n).max()) < c:
            idx = rows * m + ci.flatten()[sel]
        else:
            idx = acts.flatten().topk(K, sorted=False).indices
    else:
        idx = acts.flatten().topk(K, sorted=False).indices
    idx = idx.sort().values
    return idx[acts.flatten()[idx] > 0]


def batch_topk_code(acts: torch.Tensor, k: int) -> Code:
    """The n*k largest activations across the whole batch: k per token on average."""
    n, m = acts.shape
    idx = batch_topk_indices(acts, k)
    return Code(idx // m, idx % m, acts.flatten()[idx], n, m)


# ---------------------------------------------------------------- JumpReLU (Rajamanoharan et al. 2024)
def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); straight-through gradient for theta with a rectangle kernel."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gz = g * (z > theta)
        gtheta = (-(theta / eps) * _rect((z - theta) / eps) * g).sum(0)
        return gz, gtheta, None


class _Step(torch.autograd.Function):
    """H(z - theta); gradient only for theta (straight-through), as in the JumpReLU paper."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * _rect((z - theta) / eps) * g).sum(0), None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(z, theta, bandwidth)
