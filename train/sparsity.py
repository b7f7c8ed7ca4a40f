"""Sparse codes and the activation functions that make them.

A code is kept as (rows, cols, vals) sorted by row: token `rows[i]` uses latent `cols[i]`
with value `vals[i]`. Decoding is then one `embedding_bag` over the kept pairs (forward
and backward touch only those rows of W_dec), instead of a dense [n, m] x [m, d] product.

The training kernels work on stacks of S SAEs ([S, n, m] pre-activations, flat indices [S, P]) with
shapes fixed by the settings: the selections keep a fixed number of pairs, and the gradients of the
encoder come from the kept pairs alone (KeptPre) or from one dense block (MaskedBlock).
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

    @classmethod
    def from_pairs(cls, pre: torch.Tensor, idx: torch.Tensor) -> Code:
        """The code keeping relu(pre) [n, m] at the flat indices idx (sorted by row; a value of 0 where the
        pre-activation is not positive, kept as a pair so the code's size is known without a device read)."""
        n, m = pre.shape
        return cls(idx // m, idx % m, pre.flatten()[idx].relu(), n, m)

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


def sparse_decode(code: Code, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals_j * W_dec[cols_j] per token (no bias), via embedding_bag."""
    per_row = count(code.rows, code.n)  # stored pairs, zeros included
    offsets = torch.cumsum(per_row, 0) - per_row
    return F.embedding_bag(code.cols, W_dec, offsets, mode="sum", per_sample_weights=code.vals.to(W_dec.dtype))


# ---------------------------------------------------------------- stacked kernels: selection (fixed shapes, exact)
CANDIDATES = 8  # BatchTopK on the CPU: each token's top CANDIDATES·k pre-activations are its candidates

def batch_topk(pre: torch.Tensor, k: int, candidates: int | None = None) -> torch.Tensor:
    """Flat indices [S, n·k] (sorted) of the n·k largest entries of each pre[s] [n, m]; exact.

    On a GPU one flat top-(n·k) per SAE. On the CPU, where that is slow, each token's top c entries
    are its candidates, and the rows that might hold more than c of the answer are read whole: a row
    holds c + 1 or more of the n·k largest only if all c of its candidates are among them, so its c-th
    candidate is at least the answer's smallest value, and at most n·k / c rows can do that; the
    R = n·k // c + 1 rows with the largest c-th candidate include them all (with ties at the n·k-th
    value, the kept values are still the n·k largest). Ties go by torch.topk's (deterministic) order.
    """
    S, n, m = pre.shape
    K = n * k
    c = min(m, (candidates or CANDIDATES) * k)
    if pre.is_cuda or c >= m or n * c + (K // c + 1) * m >= n * m:
        idx = pre.reshape(S, n * m).topk(K, dim=1, sorted=False).indices
        return idx.sort(dim=1).values
    R = min(n, K // c + 1)
    cv, ci = pre.topk(c, dim=2, sorted=False)                          # [S, n, c]
    rows = cv.amin(dim=2).topk(R, dim=1, sorted=False).indices         # [S, R]: the rows read whole
    cv = cv.scatter(1, rows[:, :, None].expand(S, R, c), float("-inf"))  # ... so not as candidates too
    whole = pre.gather(1, rows[:, :, None].expand(S, R, m))            # [S, R, m]
    token = torch.arange(n, device=pre.device)[None, :, None]
    pool_v = torch.cat([cv.reshape(S, n * c), whole.reshape(S, R * m)], dim=1)
    pool_i = torch.cat([(token * m + ci).reshape(S, n * c),
                        (rows[:, :, None] * m + torch.arange(m, device=pre.device)).reshape(S, R * m)], dim=1)
    top = pool_v.topk(K, dim=1, sorted=False).indices
    return pool_i.gather(1, top).sort(dim=1).values


def span_topk(pre: torch.Tensor, k: int, span: int) -> torch.Tensor:
    """Flat indices [S, n·k] (sorted) of the span·k largest entries of each group of `span` consecutive tokens
    of each pre[s] [n, m] (n a multiple of span): BatchTopK's selection over spans shorter than the batch.
    Span 1 is TopK's per-token constraint; span n is batch_topk."""
    S, n, m = pre.shape
    groups = n // span
    idx = batch_topk(pre.reshape(S * groups, span, m), k)                    # flat within each group
    start = torch.arange(groups, device=pre.device).repeat(S)[:, None] * (span * m)
    return (idx + start).reshape(S, n * k)


HINT_BLOCK = 8  # batch_topk_hinted: tokens whose values of one latent are screened together by their maximum


def batch_topk_hinted(pre: torch.Tensor, k: int, hint: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shortcut to batch_topk for the CPU, uncompiled (data-dependent shapes): the entries of each pre[s]
    at or above hint[s] (a little below the previous batch's n·k-th value) are the candidates, and the n·k
    largest of those are the answer. Blocks of HINT_BLOCK tokens of one latent whose maximum is below the
    hint are passed over unread (one vectorised max over the tokens instead of a scan of every entry).
    Returns (flat indices [S, n·k], sorted; ok [S]; each latent's largest value over the tokens [S, m], from
    the screen's block maxima): the indices are exact where ok, that is where between n·k and 2·n·k - 1
    entries passed (a hint far below costs more than the exact selection); elsewhere they are -1 and the
    caller takes batch_topk."""
    S, n, m = pre.shape
    K = n * k
    B = HINT_BLOCK if n % HINT_BLOCK == 0 else 1
    span = torch.arange(B, device=pre.device) * m   # the flat offsets of a block's tokens
    idx = torch.full((S, K), -1, dtype=torch.long, device=pre.device)
    ok = torch.zeros(S, dtype=torch.bool)
    peak = pre.new_empty(S, m)
    for s in range(S):
        h = float(hint[s])
        block_max = pre[s].view(n // B, B, m).amax(1)
        torch.amax(block_max, 0, out=peak[s])
        block, latent = (block_max >= h).nonzero().unbind(1)
        cand = ((block * (B * m) + latent)[:, None] + span).reshape(-1)
        vals = pre[s].reshape(-1)[cand]
        passed = vals >= h
        if not K <= int(passed.sum()) < 2 * K:
            continue
        cand, vals = cand[passed], vals[passed]
        keep = vals >= vals.topk(K, sorted=False).values.amin()
        top = cand[keep] if int(keep.sum()) == K else cand[vals.topk(K, sorted=False).indices]  # ties: topk's order
        idx[s] = top.sort().values
        ok[s] = True
    return idx, ok, peak


def topk_rows(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices [S, n·k] of each token's k largest entries, grouped by token."""
    S, n, m = pre.shape
    ci = pre.topk(k, dim=2, sorted=False).indices
    return (torch.arange(n, device=pre.device)[None, :, None] * m + ci).reshape(S, n * k)


# ---------------------------------------------------------------- gradients through the kept pairs
def _global(idx: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-SAE indices [S, P] -> (token row, latent) indices over the whole stack, [S·P] each."""
    s = torch.arange(idx.shape[0], device=idx.device)[:, None]
    return (idx // m + s * n).reshape(-1), (idx % m + s * m).reshape(-1)


def by_latent(idx: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, ...]:
    """The stack's pairs (flat indices [S, P]) grouped by latent: (their order [S·P], their tokens in that order
    (rows of the stack's [S·n] tokens), the offset of each of the stack's S·m latents' group, and each pair's
    latent among the stack's S·m, in the pairs' own order)."""
    rows, cols = _global(idx, n, m)
    order = torch.argsort(cols, stable=True)  # each latent's pairs in token order
    per_latent = count(cols, idx.shape[0] * m)
    return order, rows.index_select(0, order), torch.cumsum(per_latent, 0) - per_latent, cols


def _latent_sums(groups: tuple[torch.Tensor, ...], src: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weights[p] · src[token of p] over the pairs p of each latent, [S·m, d] (groups: by_latent's; src
    [S·n, d], weights [S·P]): one embedding_bag over the pairs grouped by latent."""
    order, rows, offsets, _ = groups
    return F.embedding_bag(rows, src, offsets, mode="sum", per_sample_weights=weights.index_select(0, order))


class KeptPre(torch.autograd.Function):
    """The kept pre-activations kept[s] = pre[s].flatten()[idx[s]] of pre = x_enc W_enc + b_enc (computed
    without a graph), with the gradients of W_enc and b_enc from those pairs alone: one embedding_bag over
    all the stack's kept pairs (2·S·P·d FLOPs), never a dense [n, m] gradient. x1 [S, n, d + 1] is x_enc
    with a column of ones, whose gradient is b_enc's (inductor, torch 2.13, compiled a whole TopK step
    wrong when b_enc's gradient was a scatter of g into zeros: off by its whole size). With `shift` (the
    encoder reads x - shift), shift gets -W_enc @ grad(b_enc). `groups`: the pairs' by_latent, if made."""

    @staticmethod
    def forward(ctx, kept, x1, W_enc, b_enc, shift, idx, groups=None):
        ctx.save_for_backward(x1, W_enc, idx)
        ctx.has_shift = shift is not None
        ctx.groups = groups
        return kept

    @staticmethod
    def backward(ctx, g):
        x1, W_enc, idx = ctx.saved_tensors
        S, n, d1 = x1.shape
        d, m = W_enc.shape[1:]
        g = g.reshape(-1).to(x1.dtype)
        groups = ctx.groups or by_latent(idx, n, m)
        gWb = _latent_sums(groups, x1.reshape(S * n, d1), g)
        gW, gb = gWb[:, :d], gWb[:, d].view(S, m)
        gshift = -torch.bmm(W_enc.detach().to(gb.dtype), gb[:, :, None])[:, :, 0] if ctx.has_shift else None
        return (None, None, gW.view(S, m, d).transpose(1, 2).to(W_enc.dtype), gb.to(W_enc.dtype), gshift, None, None)


class MaskedBlock(torch.autograd.Function):
    """The block pre[s][:, cols[s]] of pre = x_enc W_enc + b_enc, already masked (zeros where a latent is
    not used), with the gradients of W_enc[s][:, cols[s]] and b_enc[s][cols[s]] through the used entries:
    one batched [d + 1, n] x [n, |cols|] product of x1 (x_enc with a column of ones, see KeptPre) (the
    auxiliary loss's block of dead latents)."""

    @staticmethod
    def forward(ctx, block, x1, W_enc, b_enc, shift, cols):
        ctx.save_for_backward(x1, W_enc, cols, block != 0)
        ctx.has_shift = shift is not None
        return block

    @staticmethod
    def backward(ctx, g):
        x1, W_enc, cols, used = ctx.saved_tensors
        S, d, m = W_enc.shape
        g = g.to(x1.dtype) * used
        prod = torch.bmm(x1.transpose(1, 2), g).to(x1.dtype)  # (bfloat16 where autocast reaches the backward)
        gWb = torch.zeros(S, d + 1, m, dtype=x1.dtype, device=g.device).scatter_(
            2, cols[:, None, :].expand(S, d + 1, cols.shape[1]), prod)
        gW, gb = gWb[:, :d], gWb[:, d]
        gshift = -torch.bmm(W_enc.detach().to(gb.dtype), gb[:, :, None])[:, :, 0] if ctx.has_shift else None
        return None, None, gW.to(W_enc.dtype), gb.to(W_enc.dtype), gshift, None


class _DecoderGrad(torch.autograd.Function):
    """The identity on a decoded batch [S, n, d], whose backward gives W_dec [S, m, d] the decode's gradient from
    the pairs: Σ vals · grad[token] over each latent's pairs (grouped by latent: by_latent), one embedding_bag
    forward, on the CPU about twice as fast as embedding_bag's own backward for its weight."""

    @staticmethod
    def forward(ctx, out, W_dec, vals, groups):
        ctx.save_for_backward(vals)
        ctx.groups, ctx.W_shape = groups, W_dec.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        (vals,) = ctx.saved_tensors
        S, m, d = ctx.W_shape
        gW = _latent_sums(ctx.groups, g.reshape(-1, d), vals.reshape(-1).to(g.dtype))
        return g, gW.view(S, m, d), None, None


def decode_pairs(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, n: int,
                 groups: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Σ vals · W_dec[s][latent] per token, without b_dec: one embedding_bag over the stack's pairs (idx
    sorted by token within each SAE). [S, n, d]. With `groups` (the pairs' by_latent; the CPU, uncompiled:
    inductor mis-compiles it), W_dec's gradient comes from _DecoderGrad."""
    S, m, d = W_dec.shape
    rows, cols = _global(idx, n, m)
    per_row = count(rows, S * n)
    W = W_dec if groups is None else W_dec.detach()
    out = F.embedding_bag(cols, W.reshape(S * m, d), torch.cumsum(per_row, 0) - per_row, mode="sum",
                          per_sample_weights=vals.reshape(-1).to(W_dec.dtype)).view(S, n, d)
    return out if groups is None else _DecoderGrad.apply(out, W_dec, vals.detach(), groups)


# ---------------------------------------------------------------- JumpReLU (Rajamanoharan et al. 2024)
def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); straight-through gradient for theta with a rectangle kernel. theta (and the
    bandwidth) broadcast against z; theta's gradient is summed back to its shape."""

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
        gtheta = (-(theta / eps) * _rect((z - theta) / eps) * g).sum_to_size(theta.shape)
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
        return None, (-(1.0 / eps) * _rect((z - theta) / eps) * g).sum_to_size(theta.shape), None


def gated(pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor) -> torch.Tensor:
    """A Gated SAE's latents from its gate's pre-activations pre = x W_enc + b_gate: H(pre) times
    relu(x W_enc · exp(r_mag) + b_mag) (the magnitude path shares W_enc). Works on [n, m] and [S, n, m]
    (parameters [m] or [S, 1, m])."""
    mag = (pre - b_gate) * r_mag.exp() + b_mag
    return (pre > 0).to(pre.dtype) * mag.relu()


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(z, theta, bandwidth)
