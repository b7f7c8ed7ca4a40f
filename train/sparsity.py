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
    def from_dense(cls, f: torch.Tensor) -> Code:
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
        """Active (non-zero) entries; reads the count back from the device."""
        return int((self.f != 0).sum()) if self._rows is None else int((self._vals != 0).sum())

    @property
    def pairs(self) -> int:
        """Stored pairs (a TopK code keeps its k pairs per row even where a value is 0); no device read
        for a sparse code."""
        return int((self.f != 0).sum()) if self._rows is None else self._vals.numel()

    def active(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, vals) of the non-zero entries only (reads their count back from the device)."""
        keep = self.vals != 0
        return self.rows[keep], self.cols[keep], self.vals[keep]

    @property
    def counts(self) -> torch.Tensor:
        """Active latents per token."""
        if self._rows is None:
            return (self.f != 0).sum(1)
        return count(self._rows, self.n, self._vals != 0)

    def fired(self) -> torch.Tensor:
        """How many tokens of the batch each latent fired on."""
        if self._rows is None:
            return (self.f != 0).sum(0)
        return count(self._cols, self.m, self._vals != 0)

    def min_active(self) -> torch.Tensor:
        """The smallest active activation (BatchTopK's threshold estimate uses it)."""
        if self._rows is None:
            return self.f[self.f != 0].detach().min()
        v = self._vals.detach()
        return torch.where(v != 0, v, torch.inf).min()

    def dense(self) -> torch.Tensor:
        if self.f is not None:
            return self.f
        out = self._vals.new_zeros(self.n, self.m)
        out[self._rows, self._cols] = self._vals
        return out


def count(idx: torch.Tensor, size: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """How often each of 0..size-1 occurs in idx (only at positions where `where` holds, if given):
    bincount without its read-back of idx.max() on a GPU."""
    ones = torch.ones_like(idx) if where is None else where.long()
    return torch.zeros(size, dtype=torch.long, device=idx.device).index_add_(0, idx, ones)


def _col_bags(cols: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation sorting the pairs by latent, offset of each latent's bag) for embedding_bag."""
    order = torch.argsort(cols)
    counts = count(cols, m)
    return order, torch.cumsum(counts, 0) - counts


class _KeptPre(torch.autograd.Function):
    """pre[rows, cols] of pre = x_in W_enc + b_enc, with the gradients of W_enc and b_enc from those
    pairs alone: one embedding_bag over the kept pairs (2·nnz·d FLOPs) instead of x_inᵀ times a dense
    [n, m] gradient. With `shift` (the encoder reads x - shift), shift gets -W_enc @ grad(b_enc)."""

    @staticmethod
    def forward(ctx, pre, x_in, W_enc, b_enc, shift, rows, cols):
        ctx.save_for_backward(x_in, W_enc, rows, cols)
        ctx.has_shift = shift is not None
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc, rows, cols = ctx.saved_tensors
        m = W_enc.shape[1]
        g = g.to(x_in.dtype)
        order, offsets = _col_bags(cols, m)
        # grad W_enc[:, j] = sum over kept pairs (i, j) of g_ij * x_in[i]: latent j's bag of rows of x_in
        gW = F.embedding_bag(rows[order], x_in, offsets, mode="sum", per_sample_weights=g[order])
        gb = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        gshift = -(W_enc.detach().to(gb.dtype) @ gb) if ctx.has_shift else None
        return None, None, gW.t().contiguous().to(W_enc.dtype), gb.to(W_enc.dtype), gshift, None, None


def kept_pre(pre: torch.Tensor, x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
             rows: torch.Tensor, cols: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable pre-activations at the kept (rows, cols) pairs; `pre` was computed without a graph
    from x_in (= x - shift when the encoder centres its input)."""
    return _KeptPre.apply(pre, x_in.detach(), W_enc, b_enc, shift, rows, cols)


class _SubsetPre(torch.autograd.Function):
    """The block pre[:, cols] of pre = x_in W_enc + b_enc, already masked (zeros where a latent is not
    kept), with the gradients of W_enc[:, cols] and b_enc[cols] through the kept entries: one dense
    [d, n] x [n, |cols|] product. For a block the kept pairs fill much of (the auxiliary loss's dead
    latents), dense products cost less than per-pair bags."""

    @staticmethod
    def forward(ctx, sub, x_in, W_enc, b_enc, shift, cols):
        ctx.save_for_backward(x_in, W_enc, cols, sub != 0)
        ctx.has_shift = shift is not None
        return sub

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc, cols, kept = ctx.saved_tensors
        g = g.to(x_in.dtype) * kept
        gW = torch.zeros_like(W_enc, dtype=g.dtype).index_copy_(1, cols, x_in.t() @ g)
        gb = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_copy_(0, cols, g.sum(0))
        gshift = -(W_enc.detach().to(gb.dtype) @ gb) if ctx.has_shift else None
        return None, None, gW.to(W_enc.dtype), gb.to(W_enc.dtype), gshift, None


def subset_pre(sub: torch.Tensor, x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
               cols: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable masked block `sub` = pre[:, cols] (zero where not kept), computed without a graph."""
    return _SubsetPre.apply(sub, x_in.detach(), W_enc, b_enc, shift, cols)


def sparse_decode(code: Code, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals_j * W_dec[cols_j] per token (no bias), via embedding_bag."""
    per_row = count(code.rows, code.n)  # stored pairs, zeros included
    offsets = torch.cumsum(per_row, 0) - per_row
    return F.embedding_bag(code.cols, W_dec, offsets, mode="sum", per_sample_weights=code.vals.to(W_dec.dtype))


def topk_code(pre: torch.Tensor, k: int) -> Code:
    """The k largest of relu(pre) per token: k pairs per row, a value of 0 where fewer than k are
    positive (kept as pairs, so the code's size is known without reading anything back)."""
    n, m = pre.shape
    vals, cols = pre.topk(k, dim=1, sorted=False)
    rows = torch.arange(n, device=pre.device).repeat_interleave(k)
    return Code(rows, cols.flatten(), vals.flatten().relu(), n, m)


def batch_topk_indices(pre: torch.Tensor, k: int, hint: float | torch.Tensor | None = None,
                       candidates: int = 4) -> torch.Tensor:
    """Flat indices (sorted) of the n*k largest positive entries of pre [n, m]; exact.

    With `hint` (a positive value a little below the expected n*k-th largest, e.g. from the previous
    batch; a 0-d tensor stays on the device),
    the candidates are the entries above it: one comparison and one nonzero over the batch, then a
    top-(n*k) among a few more than n*k values. When fewer than n*k entries pass, or without a hint,
    each row's top `candidates*k` are the candidates; that holds the answer unless some row had every
    candidate selected (it might hold more), and then a flat top-k over the whole batch decides.
    """
    n, m = pre.shape
    K = min(n * k, n * m)
    flat = pre.flatten()
    if hint is not None and (torch.is_tensor(hint) or hint > 0):
        idx = (flat > hint).nonzero().squeeze(1)
        if len(idx) >= K:
            return idx[flat[idx].topk(K, sorted=False).indices].sort().values
    c = min(m, candidates * k)
    if c < m:
        cv, ci = pre.topk(c, dim=1, sorted=False)
        sel = cv.flatten().topk(K, sorted=False).indices
        rows = sel // c
        if int(count(rows, n).max()) < c:
            idx = rows * m + ci.flatten()[sel]
        else:
            idx = flat.topk(K, sorted=False).indices
    else:
        idx = flat.topk(K, sorted=False).indices
    idx = idx.sort().values
    return idx[flat[idx] > 0]


def batch_topk_code(pre: torch.Tensor, k: int, hint: float | torch.Tensor | None = None) -> Code:
    """The n*k largest activations relu(pre) across the whole batch: k per token on average."""
    n, m = pre.shape
    idx = batch_topk_indices(pre, k, hint)
    return Code(idx // m, idx % m, pre.flatten()[idx], n, m)


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
