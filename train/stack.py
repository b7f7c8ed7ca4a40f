"""SAEs of one architecture and shape trained as one: a stack.

Every parameter has a leading SAE dimension (W_enc [S, d, m], W_dec [S, m, d], ...), the encoder is one
batched product, and every SAE's selection, losses, gradient clipping and optimiser step run batched
over the stack. The settings that may differ inside a stack (learning rates and their schedules, betas,
coefficients, clipping, the dead-latent window, JumpReLU's targets) are device tensors; the ones that
decide shapes or code paths (architecture, sizes, k, aux_k, the input normalisation, centring, the MSE
reduction) make the stack's key, so SAEs that differ in them go to different stacks.

Every tensor of a training step has a shape fixed by the settings, never by the data, and the step
reads nothing back from the device: on CUDA it compiles into one graph and replays as a CUDA graph.
Where the one-SAE code made a data-dependent choice, the stack makes a fixed-shape one:

- BatchTopK keeps exactly n·k pairs per SAE (value 0 where fewer than n·k pre-activations are
  positive), found by an exact selection of fixed shape (`batch_topk`).
- The auxiliary loss picks each token's top aux_k dead latents (with aux_batch: the batch's top n·aux_k)
  from a pool of the `aux_pool` dead latents most active in the batch: exactly the one-SAE loss whenever
  no SAE has more dead latents than that, and a fixed [n, aux_pool] block of work whatever their number.
  The pool starts 2·aux_k wide and doubles at a log step (which reads the device anyway) whenever an SAE
  has more dead latents, so the loss stays exact but for the few steps before that (a compiled step
  compiles once more then).

The math runs as one of two programs (kernels.py), picked once by the Executor: the fixed-shape kernels
above, or the CPU's exact eager ones, which read the host and take data-dependent shortcuts.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchtopk.core import distributed

from .archs import ARCHS
from .archs.base import Arch
from .executor import CompiledStep, Executor, compile_limit
from .kernels import FIXED, FixedKernels
from .sae import NMSE, SAE, SAEConfig, standardize
from .sparsity import MaskedBlock, count

AUX_POOL = 2    # the fixed-shape auxiliary pool starts AUX_POOL·aux_k latents wide (SAEStack.grow_aux_pool)
RESAMPLE_UNTIL = 0.8     # resampling stops after this fraction of training (the last latents get the rest to learn)
RESAMPLE_ENC_NORM = 0.2  # a resampled latent's encoder row: this times the mean norm of the living latents' rows
# each parameter's latent axis (after the SAE axis): what resampling re-initialises
LATENT_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "r_mag": 0, "b_mag": 0}


@dataclass(frozen=True)
class StackKey:
    """What SAEs of one stack share: everything that decides a shape or a code path."""

    arch: str
    d_in: int
    d_sae: int
    k: int | None
    aux_k: int
    norm: str
    center: bool
    mse: str
    aux_norm: bool
    aux_batch: bool       # (Batch)TopK: the auxiliary loss selects across the batch
    span: int | None      # BatchTopK: tokens per selection (None: the whole batch)
    groups: tuple[int, ...] | None  # Matryoshka: its groups' sizes
    target: bool          # JumpReLU: a target-L0 penalty (or a plain L0 one)
    preact: bool          # JumpReLU: with Anthropic's pre-activation loss

    @classmethod
    def of(cls, c: SAEConfig) -> StackKey:
        """The key of an SAE: a setting its architecture does not take (its declaration's applies_to) counts as
        absent."""
        t = c.takes
        return cls(c.arch, c.d_in, c.d_sae, c.k if t("k") else None, c.aux_k if t("aux_k") else 0, c.norm, c.center,
                   c.mse, c.aux_norm if t("aux_norm") else False, c.aux_batch, c.span,
                   c.group_sizes if t("groups") else None, c.target_l0 is not None, c.preact_coeff > 0)


def stack_configs(cfgs: list[SAEConfig], size: int | None = None) -> list[list[int]]:
    """The indices of cfgs grouped into stacks (of at most `size` SAEs), in order of first appearance."""
    groups: dict[StackKey, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(StackKey.of(c), []).append(i)
    size = size or len(cfgs)
    return [g[j:j + size] for g in groups.values() for j in range(0, len(g), size)]


# ---------------------------------------------------------------- the stack
class SAEStack(nn.Module):
    """S SAEs of one StackKey, built from SAEs (freshly initialised, so each starts as it would alone) and
    turned back into them (`sae`)."""

    def __init__(self, saes: list[SAE], run_lr: float, run_betas: tuple[float, float]):
        super().__init__()
        cfgs = [s.cfg for s in saes]
        keys = {StackKey.of(c) for c in cfgs}
        if len(keys) != 1:
            raise ValueError(f"a stack holds SAEs of one key, not {len(keys)}")
        self.key = keys.pop()
        self.arch: Arch = ARCHS[self.key.arch]
        self.cfgs = cfgs
        stack = lambda name: torch.stack([getattr(s, name).detach() for s in saes])  # noqa: E731
        self.W_enc = nn.Parameter(stack("W_enc").clone())
        self.b_enc = nn.Parameter(stack("b_enc").clone())
        self.W_dec = nn.Parameter(stack("W_dec").clone())
        self.b_dec = nn.Parameter(stack("b_dec").clone())
        for name in self.arch.params:  # (JumpReLU's thresholds, Gated's magnitude path)
            setattr(self, name, nn.Parameter(stack(name).clone()))
        self.register_buffer("input_scale", stack("input_scale").clone())
        dev = self.W_enc.device

        def per_sae(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)
        lrs = [c.lr if c.lr is not None else run_lr for c in cfgs]
        betas = [tuple(c.betas or run_betas) for c in cfgs]
        inf = float("inf")
        self.register_buffer("lr", per_sae(lrs))
        self.register_buffer("threshold_lr", per_sae([c.threshold_lr or lr for c, lr in zip(cfgs, lrs)]))
        self.register_buffer("beta1", per_sae([b[0] for b in betas]))
        self.register_buffer("beta2", per_sae([b[1] for b in betas]))
        self.register_buffer("grad_clip", per_sae([c.grad_clip if c.grad_clip else inf for c in cfgs]))
        self.register_buffer("aux_coeff", per_sae([c.aux_coeff for c in cfgs]))
        self.register_buffer("dead_tokens", per_sae([c.dead_tokens for c in cfgs], torch.long))
        coeff = self.arch.coeff_setting
        self.register_buffer("coeff", per_sae([getattr(c, coeff) if coeff else 0.0 for c in cfgs]))
        self.register_buffer("target_l0", per_sae([c.target_l0 or 1.0 for c in cfgs]))
        self.register_buffer("preact_coeff", per_sae([c.preact_coeff for c in cfgs]))
        self.register_buffer("eps", per_sae([s.eps for s in saes]))
        self.register_buffer("warmup", per_sae([c.warmup for c in cfgs]))
        self.register_buffer("decay", per_sae([c.decay for c in cfgs]))
        self.register_buffer("sparsity_warmup", per_sae([c.sparsity_warmup for c in cfgs]))
        # quantile: the threshold (-inf until the first batch sets it) and the last batch's n·k-th largest value
        self.register_buffer("quantile_rate", per_sae([c.quantile_rate for c in cfgs]))
        self.register_buffer("threshold", torch.full((len(cfgs),), float("-inf"), device=dev))
        self.register_buffer("batch_quantile", torch.zeros(len(cfgs), device=dev), persistent=False)
        # the program the math runs as (kernels.py; the trainer sets the executor's), and the exact kernels'
        # BatchTopK hint: a little below the last batch's n·k-th value
        self.kernels: FixedKernels = FIXED
        self.register_buffer("hint", torch.full((len(cfgs),), float("-inf"), device=dev), persistent=False)
        self.aux_pool = min(self.key.d_sae, AUX_POOL * self.key.aux_k)  # the fixed-shape path's auxiliary pool width

    @property
    def size(self) -> int:
        return len(self.cfgs)

    def part(self, sl: slice) -> SAEStack:
        """The SAEs sl of this stack as a stack of their own that shares its storage: parameters that are leaves
        (their gradients their own) viewing this stack's, buffers viewing its buffers; what either writes in
        place, the other sees."""
        sub = object.__new__(type(self))
        nn.Module.__init__(sub)
        sub.key, sub.arch, sub.cfgs = self.key, self.arch, self.cfgs[sl]
        sub.kernels, sub.aux_pool = self.kernels, self.aux_pool
        for name, p in self.named_parameters(recurse=False):
            setattr(sub, name, nn.Parameter(p.data[sl]))
        for name, b in self.named_buffers(recurse=False):
            sub.register_buffer(name, b[sl])
        return sub

    def sae(self, i: int) -> SAE:
        """SAE i as a plain SAE (sharing nothing with the stack)."""
        sae = SAE(self.cfgs[i]).to(self.W_enc.device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale", *self.arch.params):
                getattr(sae, name).copy_(getattr(self, name)[i])
            self.arch.to_sae(self, i, sae)
        return sae

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Each SAE's data-dependent start from the first batch of raw activations (SAE.init_from_data:
        b_dec, JumpReLU's thresholds)."""
        for i in range(self.size):
            sae = self.sae(i)
            sae.init_from_data(sae.normalize(x)[0])
            for name in ("b_dec", *self.arch.params):
                getattr(self, name)[i].copy_(getattr(sae, name))

    # ------------------------------------------------------------ schedules (device tensors of the step)
    def lr_factor(self, step: torch.Tensor, total: int) -> torch.Tensor:
        """Each SAE's learning-rate factor at a (device) step: a linear warm-up over the first `warmup` of
        training, a linear decay to 0 over the last `decay`; 1 in between. A pure function of the step, so a
        resumed run follows the same schedule."""
        s = step.to(torch.float64)
        t = s / max(1, total)
        warm, decay = self.warmup.double(), self.decay.double()
        f = torch.ones_like(warm)
        f = torch.where((warm > 0) & (t < warm), (s + 1) / (warm * total + 1), f)
        f = torch.where((decay > 0) & (t > 1 - decay), torch.minimum(f, (total - s) / (decay * total)), f)
        return f.clamp(0.0, 1.0).float()

    def sparsity_coeff(self, step: torch.Tensor, total: int) -> torch.Tensor:
        """Each SAE's L0 (JumpReLU) or L1 (ReLU, Gated) coefficient at a (device) step, ramped up from 0 over the
        first `sparsity_warmup` of training."""
        w = self.sparsity_warmup.double()
        ramp = torch.clamp((step.double() + 1) / (w * total), max=1.0)
        return (self.coeff.double() * torch.where(w > 0, ramp, torch.ones_like(w))).float()

    # ------------------------------------------------------------ the losses
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [n, d] -> each SAE's input space [S, n, d]."""
        if self.key.norm == "token":
            return standardize(x)[0][None].expand(self.size, *x.shape)
        return x[None] * self.input_scale[:, None, None]

    def losses(self, x: torch.Tensor, since_fired: torch.Tensor, coeff: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training losses of every SAE on a batch of raw activations x [n, d].

        Returns ({name: [S] per-SAE values, 'loss': [S]}, x_in [S, n, d], x_hat [S, n, d] (detached),
        kept (idx [S, P] flat indices, vals [S, P]) packed as (idx, vals) for the sparse codes, or the
        dense code [S, n, m])."""
        x_in = self.normalize(x)
        x_enc = x_in - self.b_dec[:, None, :] if self.key.center else x_in
        out: dict[str, torch.Tensor] = {}
        x_hat, code = self.arch.losses(self, x_in, x_enc, since_fired, coeff, out)
        out["loss"] = sum(out.values())
        return out, x_in, x_hat.detach(), code

    def mse(self, err: torch.Tensor) -> torch.Tensor:
        """Each SAE's MSE [S] of err [S, n, d]: summed over dimensions and averaged over tokens, or averaged."""
        sq = err.pow(2)
        return sq.sum(-1).mean(-1) if self.key.mse == "sum" else sq.mean((-1, -2))

    def encode_pairs(self, xe: torch.Tensor, xe1: torch.Tensor, dead: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Without a graph, from the pre-activations xe W_enc + b_enc [S, n, m] (xe1: xe with a column of
        ones): the kept pairs (flat indices [S, P], their pre-activations [S, P]) and the auxiliary loss's pool
        (its latents [S, D], their masked block [S, n, D], see `aux_loss`), a chunk of SAEs at a time (the kernels')."""
        S, n, _ = xe.shape
        chunk = self.kernels.chunk(self, n)
        width = self.kernels.aux_width(self, dead)
        parts = []
        for a in range(0, S, chunk):
            sl = slice(a, min(S, a + chunk))
            pre = self.kernels.pre(self, xe, xe1, sl)
            idx, peak = self.arch.select(self, pre, sl)  # (peak: each latent's largest pre-activation, or None)
            parts.append((idx, pre.reshape(pre.shape[0], -1).gather(1, idx),
                          *self._aux_pool(pre, dead[sl], width, peak)))
        return parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def grow_aux_pool(self, dead: int) -> bool:
        """Double the fixed-shape auxiliary pool (up to d_sae) until it holds `dead` latents, the most dead
        latents of an SAE of the stack; True if it grew (a compiled step then compiles for the new width)."""
        width = self.aux_pool
        while 0 < width < min(dead, self.key.d_sae):
            width = min(2 * width, self.key.d_sae)
        grew, self.aux_pool = width != self.aux_pool, width
        return grew

    def _aux_pool(self, pre: torch.Tensor, dead: torch.Tensor, width: int, peak: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary loss's pool, from the pre-activations [S, n, m] and dead latents [S, m]: the `width`
        (the kernels' `aux_width`) dead latents with the largest pre-activation anywhere in the batch [S, D]
        (peak [S, m] when known), and their block [S, n, D] with each token's top aux_k of them kept (aux_batch:
        the batch's top n·aux_k), the rest 0."""
        S, n, m = pre.shape
        score = (pre.amax(1) if peak is None else peak).masked_fill(~dead, float("-inf"))
        cols = score.topk(width, dim=1, sorted=False).indices  # [S, D]
        block = pre.gather(2, cols[:, None, :].expand(S, n, cols.shape[1]))
        block.masked_fill_(~dead.gather(1, cols)[:, None, :], float("-inf"))
        if self.key.aux_batch and cols.shape[1] > self.key.aux_k:  # the batch's top n·aux_k of the pool
            flat = block.view(S, -1)
            top = flat.topk(n * self.key.aux_k, dim=1, sorted=False).indices
            keep = torch.zeros(flat.shape, dtype=torch.bool, device=block.device).scatter_(1, top, True)
            block.masked_fill_(~keep.view(block.shape), float("-inf"))
        elif cols.shape[1] > self.key.aux_k:  # each token's top aux_k of the pool
            block = self.kernels.aux_top(block, self.key.aux_k)
        return cols, block.relu_()  # -inf (not dead, or not among a token's top aux_k) -> 0

    def aux_loss(self, cols: torch.Tensor, block: torch.Tensor, xe1: torch.Tensor, shift: torch.Tensor | None,
             dead: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Gao et al.'s auxiliary loss: the residual fitted with each token's top aux_k dead latents (with
        aux_batch, the BatchTopK authors' open idea: the top n·aux_k dead-latent pre-activations of the whole
        batch), times aux_coeff (0 where none is dead); optionally over the residual's variance.

        In a fixed shape: the pool is the aux_pool dead latents with the largest pre-activation anywhere in
        the batch, and each token takes its top aux_k of those (one dense [n, pool] block, `_aux_pool`). That
        is the one-SAE loss exactly whenever no SAE has more dead latents (with the exact kernels, always).
        xe1: the encoder's input with a column of ones (MaskedBlock)."""
        block = MaskedBlock.apply(block, xe1, self.W_enc, self.b_enc, shift, cols)
        decoded = torch.bmm(block, self.W_dec.gather(1, cols[:, :, None].expand(*cols.shape, self.key.d_in)))
        aux = self.mse(decoded - residual)
        if self.key.aux_norm:
            aux = aux / self.mse(residual - residual.mean(1, keepdim=True)).clamp_min(1e-12)
        return self.aux_coeff * aux * dead.any(1)  # no dead latent, no auxiliary loss

    @torch.no_grad()
    def resample(self, i: int, dead: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Re-initialise SAE i's latents where dead [m] from the tokens of the batch x [n, d] (raw) that it
        reconstructs worst (Bricken et al. 2023): each latent takes a token drawn with probability in proportion
        to its squared error, each token once (at most n latents, drawn at random, at a time); its decoder row
        becomes that token's direction beyond b_dec, its encoder row the same direction at RESAMPLE_ENC_NORM
        times the mean norm of the living latents' rows, its biases (Gated: and its magnitude path's) 0.
        Returns the latents' indices (reads the device)."""
        lat = dead.nonzero().squeeze(1)
        if len(lat) > len(x):
            lat = lat[torch.randperm(len(lat), generator=gen)[:len(x)].to(lat.device)].sort().values
        if lat.numel() == 0:
            return lat
        sae = self.sae(i)
        x_in = sae.normalize(x)[0]
        err = (sae.decode_code(sae.code(sae.pre(x_in))) - x_in).pow(2).sum(1).double().cpu()
        weights = err if bool((err > 0).any()) and bool(torch.isfinite(err).all()) else torch.ones_like(err)
        rows = torch.multinomial(weights, lat.numel(), generator=gen)
        v = x_in[rows.to(x_in.device)] - self.b_dec[i]
        u = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        living = self.W_enc[i][:, ~dead].norm(dim=0)
        scale = RESAMPLE_ENC_NORM * (living.mean() if living.numel() else 1.0)
        self.W_dec[i, lat] = u
        self.W_enc[i][:, lat] = u.t() * scale
        self.b_enc[i, lat] = 0.0
        for name in self.arch.params:  # (Gated's magnitude path: only ReLU and Gated resample)
            getattr(self, name)[i, lat] = 0.0
        return lat

    # ------------------------------------------------------------ after backward
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each (unit) decoder row."""
        g = self.W_dec.grad
        g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class StackAdam(nn.Module):
    """Per-SAE gradient clipping and Adam over a stack's parameters, with a learning rate and betas per SAE,
    written as clip_grad_norm_ and torch.optim.Adam compute them, over one flat [S, P] view of every
    parameter's gradient (a few ops per step, whatever the number of SAEs). Its moments and step count are
    buffers updated in place, so a captured step replays without recompiling."""

    def __init__(self, stack: SAEStack, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.names = [n for n, _ in stack.named_parameters()]
        self.sizes = [p[0].numel() for _, p in stack.named_parameters()]
        total = sum(self.sizes)
        dev = stack.W_enc.device
        self.register_buffer("exp_avg", torch.zeros(stack.size, total, device=dev))
        self.register_buffer("exp_avg_sq", torch.zeros(stack.size, total, device=dev))
        self.register_buffer("step_count", torch.zeros((), device=dev))
        # the step's [S, P] temporaries, reused from step to step (a stack's are large); allocated here, before
        # any compiled call, so that a CUDA graph never owns memory that outlives its replay
        self.register_buffer("_g", torch.zeros(stack.size, total, device=dev), persistent=False)
        self.register_buffer("_u", torch.zeros(stack.size, total, device=dev), persistent=False)

    @torch.no_grad()
    def clipped_gradient(self, stack: SAEStack, parts: list[tuple[slice, SAEStack]] | None = None) -> torch.Tensor:
        """Every parameter's gradient as one [S, P] tensor (the buffer _g), each SAE's clipped at its grad_clip.
        The gradients are the stack's, or those of its parts (SAEs sl of the stack, `SAEStack.part`)."""
        grads = lambda st: [getattr(st, n).grad.reshape(st.size, -1) for n in self.names]  # noqa: E731
        if parts is None:
            torch.cat(grads(stack), dim=1, out=self._g)
        for sl, part in parts or ():
            torch.cat(grads(part), dim=1, out=self._g[sl])
        g = self._g
        norm = torch.linalg.vector_norm(g, dim=1)
        return g.mul_((stack.grad_clip / (norm + 1e-6)).clamp(max=1.0)[:, None])

    @torch.no_grad()
    def forget(self, stack: SAEStack, i: int, latents: torch.Tensor) -> None:
        """Zero SAE i's moments of the given latents (in every parameter with a latent axis), as for new ones."""
        offsets = itertools.accumulate(self.sizes, initial=0)
        for name, size, start in zip(self.names, self.sizes, offsets):
            if name in LATENT_AXIS:
                shape = getattr(stack, name).shape[1:]
                for moment in (self.exp_avg, self.exp_avg_sq):
                    moment[i, start:start + size].view(shape).index_fill_(LATENT_AXIS[name], latents, 0.0)

    @torch.no_grad()
    def step(self, stack: SAEStack, lr_factor: torch.Tensor, parts: list[tuple[slice, SAEStack]] | None = None) -> None:
        """Clip each SAE's gradient norm at its grad_clip (coefficient clip / (norm + 1e-6), at most 1), then
        one Adam step of every SAE at its lr times lr_factor [S] (JumpReLU's thresholds at theirs), in place.
        The gradients are the stack's, or its parts' (clipped_gradient)."""
        g = self.clipped_gradient(stack, parts)
        self.step_count += 1
        t = self.step_count.double()
        bc1 = (1 - stack.beta1.double() ** t).float()  # in float64, as torch computes them from Python floats
        bc2_sqrt = (1 - stack.beta2.double() ** t).sqrt().float()
        b1, b2 = stack.beta1[:, None], stack.beta2[:, None]
        self.exp_avg.lerp_(g, 1 - b1)
        self.exp_avg_sq.mul_(b2 / (1 - b2)).addcmul_(g, g).mul_(1 - b2)  # b2·v + (1 - b2)·g², no temporary
        u = torch.sqrt(self.exp_avg_sq, out=self._u).div_(bc2_sqrt[:, None]).add_(self.eps)
        u = torch.div(self.exp_avg, u, out=self._u)
        for n, part in zip(self.names, u.split(self.sizes, dim=1)):
            p = getattr(stack, n)
            lr = (stack.threshold_lr if n == "log_threshold" else stack.lr) * lr_factor / bc1
            p.addcmul_(part.view(p.shape), -lr.view(-1, *([1] * (p.dim() - 1))))


class Objective(nn.Module):
    """Wraps a stack so DistributedDataParallel sees its training losses as its forward."""

    def __init__(self, stack: SAEStack):
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor, since_fired: torch.Tensor, coeff: torch.Tensor):
        return self.stack.losses(x, since_fired, coeff)


class StepState(nn.Module):
    """A stack's training state on the device, updated in place by every step: the tokens since each latent
    last fired, the step at which each SAE's loss first became non-finite (and that loss), and the sum
    and count of the smallest kept activations that make the running θ."""

    def __init__(self, stack: SAEStack):
        super().__init__()
        S, dev = stack.size, stack.W_enc.device
        self.register_buffer("since_fired", torch.zeros(S, stack.key.d_sae, dtype=torch.long, device=dev))
        self.register_buffer("bad_step", torch.full((S,), -1, dtype=torch.long, device=dev))
        self.register_buffer("bad_loss", torch.zeros(S, device=dev))
        self.register_buffer("theta_sum", torch.zeros(S, dtype=torch.float64, device=dev))
        self.register_buffer("theta_n", torch.zeros(S, dtype=torch.float64, device=dev))


class StackTrainer:
    """One stack's training: the stack, its optimiser and its state, stepped by an Executor's program. A step
    reads nothing back from the device unless asked for the log's metrics; compiled, every other step runs as one
    graph (on CUDA replayed as a CUDA graph), and a failed compile leaves the step eager."""

    def __init__(self, stack: SAEStack, total_steps: int, theta_from: int, world: int = 1, compile: bool = False,
                 executor: Executor | None = None):
        self.stack, self.opt, self.state = stack, StackAdam(stack), StepState(stack)
        self.total_steps, self.theta_from, self.world = total_steps, theta_from, world
        dev = stack.W_enc.device
        self.executor = executor or Executor.choose(str(dev), "on" if compile else "off", world=world)
        stack.kernels = self.executor.kernels
        self.objective: nn.Module = Objective(stack)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.objective = DDP(self.objective, device_ids=[dev.index] if dev.type == "cuda" else None)
        # resampling (ReLU, Gated): SAE i every resample_every[i] steps through the first RESAMPLE_UNTIL of training
        self.resample_every = [max(1, round(c.resample * total_steps)) if c.resample else 0 for c in stack.cfgs]
        self.resampled = [0] * stack.size  # latents resampled so far (the log's count; checkpointed)
        self._parts_for: tuple[int, list[tuple[slice, SAEStack]]] = (0, [])  # (batch, its parts): see _parts
        self.compiled: CompiledStep | None = None
        if self.executor.compiled:
            label = f"the stack of {stack.size} {stack.cfgs[0].name}"
            self.compiled = CompiledStep(self._step, label, self.executor.cuda_graphs,
                                         compile_limit(stack.key.d_sae, stack.aux_pool))

    def step(self, x: torch.Tensor, step_t: torch.Tensor, log: bool = False) -> list[dict[str, float]] | None:
        """One training step on the batch x [n, d] at device step step_t; with `log`, every SAE's metrics
        (losses averaged over ranks, NMSE and L0 over every rank's tokens)."""
        if not log and self.compiled is not None and self.compiled(x, step_t, keep=False):
            return None
        kept = self._step(x, step_t, keep=log)
        if not log:
            return None
        metrics = self._metrics(*kept, x.shape[0])
        self.stack.grow_aux_pool(max(m["dead"] for m in metrics))  # the dead latents are counted here anyway
        return metrics

    def compile_counts(self) -> dict[str, int]:
        """What compiling this stack's step has cost so far: graphs made, and on CUDA those run without a CUDA
        graph (empty when the step is not compiled)."""
        if self.compiled is None:
            return {}
        out = {"compiles": self.compiled.compiles}
        if self.executor.cuda_graphs:
            out["cudagraph_skips"] = self.compiled.cudagraph_skips
        return out

    def _parts(self, n: int) -> list[tuple[slice, SAEStack]] | None:
        """With the exact kernels, in one process: the stack's SAEs in parts whose [n, m] pre-activations take at
        most CPU_PRE_BYTES together (one SAE at least, kernels.py), each stepped through its losses and backward on
        its own, so that its temporaries stay in the cache as a lone SAE's do (a stack of 8 at the bench shape
        trained 0.93-0.97x as fast per SAE as 8 alone, whole). None: the whole stack at once."""
        if not self.stack.kernels.steps_in_parts(self.world):
            return None
        if self._parts_for[0] != n:
            size = self.stack.kernels.chunk(self.stack, n)
            S = self.stack.size
            self._parts_for = (n, [(sl, self.stack.part(sl)) for sl in (slice(a, min(S, a + size))
                                                                        for a in range(0, S, size))])
        return self._parts_for[1]

    def _step(self, x: torch.Tensor, step_t: torch.Tensor, keep: bool):
        stack, st, n = self.stack, self.state, x.shape[0]
        coeff = stack.sparsity_coeff(step_t, self.total_steps)
        f = stack.lr_factor(step_t, self.total_steps)
        parts = self._parts(n)
        logged = []
        for sl, part in parts or [(slice(None), stack)]:  # (no gradient is left from a step before: see below)
            with self.executor.autocast():
                out, x_in, x_hat, code = (self.objective(x, st.since_fired, coeff) if parts is None
                                          else part.losses(x, st.since_fired[sl], coeff[sl]))
            loss = out["loss"]
            with torch.no_grad():  # noted on the device, read back at log steps and before saving
                bad_step, bad_loss = st.bad_step[sl], st.bad_loss[sl]
                new = (bad_step < 0) & ~torch.isfinite(loss)
                bad_step.copy_(torch.where(new, step_t + 1, bad_step))
                bad_loss.copy_(torch.where(new, loss.detach().float(), bad_loss))
            loss.sum().backward()
            part.project_decoder_grad()
            with torch.no_grad():
                fired, nnz = self._fired(part, code)
                distributed.all_reduce_(fired)
                since = st.since_fired[sl]
                since.copy_(torch.where(fired > 0, 0, since + n * self.world))
                if stack.arch.batch:  # the running θ over the last steps: each batch's smallest kept value
                    vals = code[1]
                    mn = torch.where(vals > 0, vals, torch.inf).amin(1).double()
                    use = (step_t >= self.theta_from) & torch.isfinite(mn)
                    mn = torch.where(use, mn, 0.0)
                    distributed.all_reduce_(mn)
                    st.theta_sum[sl].add_(mn / self.world)
                    st.theta_n[sl].add_(use.double())
            if keep:
                logged.append((out, x_in, x_hat, nnz))
        self.opt.step(stack, f, parts)  # clipping, then Adam
        for _, part in parts or [(slice(None), stack)]:  # no gradient outlives the step (a CUDA graph's outputs
            for p in part.parameters():                  # would live in memory its next replay overwrites)
                p.grad = None
        stack.normalize_decoder()
        stack.arch.after_step(stack, self.world)  # (a quantile SAE's threshold moves)
        if not keep:
            return None
        if len(logged) == 1:
            return (*logged[0], coeff, f)
        outs, x_ins, x_hats, nnzs = zip(*logged)
        out = {name: torch.cat([o[name] for o in outs]) for name in outs[0]}
        return out, torch.cat(x_ins), torch.cat(x_hats), torch.cat(nnzs), coeff, f

    def resample_due(self, step: int) -> list[int]:
        """The SAEs of the stack that resample their dead latents once `step` steps are done."""
        return [i for i, every in enumerate(self.resample_every)
                if every and step % every == 0 and step <= RESAMPLE_UNTIL * self.total_steps]

    def resample(self, x: torch.Tensor, step: int, seed: int) -> None:
        """Resample the latents of each due SAE that fired on no token since its last resampling, from the global
        batch x [n, d] (raw), with a generator that depends on the run's seed, the SAE and the step only: a
        stack resamples as its SAEs alone would, and a resumed run as the first. Their Adam moments are zeroed
        and their silence counted anew."""
        st = self.stack
        for i in self.resample_due(step):
            dead = self.state.since_fired[i] >= self.resample_every[i] * x.shape[0]
            key = f"{seed}/{st.cfgs[i].name}/{step}".encode()
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
            latents = st.resample(i, dead, x, gen)
            self.opt.forget(st, i, latents)
            self.state.since_fired[i, latents] = 0
            self.resampled[i] += latents.numel()
        for t in st.parameters():  # every rank goes on from rank 0's weights
            distributed.broadcast_(t.data)

    @staticmethod
    def _fired(st: SAEStack, code) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens each latent fired on [S, m], active latents of the batch [S]) of the stack st's code."""
        if isinstance(code, tuple):  # kept pairs
            idx, vals = code
            m = st.key.d_sae
            latent = (idx % m + torch.arange(st.size, device=idx.device)[:, None] * m).reshape(-1)
            return count(latent, st.size * m, (vals > 0).reshape(-1)).view(st.size, m), (vals > 0).sum(1)
        return (code != 0).sum(1), (code != 0).sum((1, 2))

    def _metrics(self, out, x_in, x_hat, nnz, coeff, f, n) -> list[dict[str, float]]:
        names = list(out)
        agg = torch.stack([out[k].detach().double() / self.world for k in names] + [nnz.double()])
        distributed.all_reduce_(agg)
        stack, st, metrics = self.stack, self.state, []
        for i in range(stack.size):
            err = NMSE().add(x_in[i], x_hat[i])
            distributed.all_reduce_(err.terms)
            mi = {k: float(v) for k, v in zip(names, agg[:, i])}
            mi.update(nmse=err.value, l0=float(agg[-1, i]) / (n * self.world),
                      dead=int((st.since_fired[i] >= stack.dead_tokens[i]).sum()), lr_factor=float(f[i]))
            if stack.arch.coeff_setting:
                mi["sparsity_coeff"] = float(coeff[i])
            if self.resample_every[i]:
                mi["resampled"] = self.resampled[i]
            if float(st.theta_n[i]):
                mi["theta_running"] = float(st.theta_sum[i] / st.theta_n[i])
            metrics.append(mi)
        return metrics

    def running_theta(self, i: int) -> float:
        """SAE i's running θ: BatchTopK's mean smallest kept activation over the steps since theta_from, a
        quantile SAE's training threshold."""
        return self.stack.arch.running_theta(self.stack, self.state, i)

    def first_bad(self) -> tuple[int, int, float] | None:
        """(SAE, step, loss) of the first SAE whose loss became non-finite, or None (reads the device)."""
        for i, b in enumerate(self.state.bad_step.tolist()):
            if b >= 0:
                return i, b, float(self.state.bad_loss[i])
        return None

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda sd: {k: v.cpu() for k, v in sd.items()}  # noqa: E731
        return {"stack": cpu(self.stack.state_dict()), "opt": cpu(self.opt.state_dict()),
                "state": cpu(self.state.state_dict()), "aux_pool": self.stack.aux_pool, "resampled": self.resampled}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stack.load_state_dict(sd["stack"])
        self.opt.load_state_dict(sd["opt"])
        self.state.load_state_dict(sd["state"])
        self.stack.grow_aux_pool(sd.get("aux_pool", 0))  # (a checkpoint from before the pool grew: as it starts)
        self.resampled = list(sd.get("resampled", self.resampled))  # (one from before it was kept: counts anew)
