"""What every architecture is made of, and the two families the seven belong to.

An architecture is one object (`Arch`): what it needs beyond the common base (W_enc, b_enc, W_dec, b_dec),
which settings it takes and their defaults and checks, its name, how it selects latents for inference
(`code`) and in training (`losses`, on a stack of S SAEs: tensors [S, n, m]), its threshold rule, its
auxiliary loss, and how it is saved in SAELens's format. `SAE` (train/sae.py) and `SAEStack`
(train/stack.py) hold the weights and the shared machinery and call it; they never ask which architecture
they hold. docs/architectures.md says how to add one.

- `KArch`: k latents per token (on average), selected as kept pairs (flat indices [S, P] into [n, m]):
  gradients flow through the kept pairs only, and dead latents get Gao et al.'s auxiliary loss.
- `DenseArch`: a dense code [S, n, m] from an activation function, with a sparsity penalty.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batchtopk.core.errors import PipelineError

from ..sparsity import KeptPre, decode_pairs

if TYPE_CHECKING:
    from ..sae import SAE, SAEConfig
    from ..sparsity import Code
    from ..stack import SAEStack

DEFAULT_K = 32             # a k architecture's k where none is given
DEAD_TOKENS_DEFAULT = 4096
DENSE_DECODE_ABOVE = 0.05  # decode densely when more than this fraction of latents is active


ALL: dict[str, Arch] = {}  # every architecture by name, in the order the help lists them (archs/__init__.py)


def names(flag: str) -> tuple[str, ...]:
    """The names of the architectures whose `flag` is set (e.g. "takes_k")."""
    return tuple(n for n, a in ALL.items() if getattr(a, flag))


class Arch:
    """One architecture. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    takes_k: ClassVar[bool] = False       # k latents per token on average (a k setting)
    global_theta: ClassVar[bool] = False  # inference is JumpReLU with one θ, set from the final weights
    batch: ClassVar[bool] = False         # trains on the batch's n·k largest (a span; scored in batch mode too)
    l1: ClassVar[bool] = False            # an L1 penalty (and resampling instead of an auxiliary loss)
    checks_l0: ClassVar[bool] = False     # aims at an L0 its thresholds do not fix: finish measures it held out
    coeff_setting: ClassVar[str | None] = None  # its sparsity coefficient's setting (ramped over sparsity_warmup)
    export: ClassVar[str]                 # its SAELens architecture
    params: ClassVar[tuple[str, ...]] = ()  # per-latent parameters beyond the base's
    dead_tokens: ClassVar[int] = DEAD_TOKENS_DEFAULT  # default dead-latent window
    resample: ClassVar[float | None] = None         # default resampling period (a fraction of training)
    sparsity_warmup: ClassVar[float] = 0.0          # default warm-up of the sparsity coefficient

    # ------------------------------------------------------------ settings
    def check(self, cfg: SAEConfig) -> None:
        """Fill the defaults of cfg's architecture-dependent settings and refuse those it does not take."""
        if cfg.k is not None and not self.takes_k:
            raise PipelineError(f"k={cfg.k} is a setting of {', '.join(names('takes_k'))} SAEs, not of {cfg.arch} "
                                "(whose sparsity comes from its coefficient)")
        if cfg.groups is not None and cfg.arch != "matryoshka":
            raise PipelineError(f"groups is a Matryoshka setting, not one of {cfg.arch}")
        if cfg.span is not None and (not self.batch or cfg.span < 1):
            raise PipelineError(f"span={cfg.span}: a BatchTopK setting, a positive number of tokens per selection "
                                f"(this SAE is {cfg.arch}; leave span unset for the whole batch)")
        if cfg.aux_batch and not self.takes_k:
            raise PipelineError(f"aux_batch applies to {', '.join(names('takes_k'))} SAEs (their auxiliary loss), "
                                f"not {cfg.arch}")
        if cfg.sparsity_warmup is None:
            cfg.sparsity_warmup = self.sparsity_warmup
        if cfg.resample is None and self.resample is not None:
            cfg.resample = self.resample
        if cfg.resample and not self.l1:
            raise PipelineError(f"resample applies to {', '.join(names('l1'))} SAEs, not {cfg.arch} (whose auxiliary "
                                "loss revives dead latents); leave it unset")
        if cfg.dead_tokens is None:
            cfg.dead_tokens = self.dead_tokens

    def title(self, cfg: SAEConfig) -> str:
        """The start of the SAE's name: its architecture and what names it (size, k or coefficients)."""
        raise NotImplementedError

    # ------------------------------------------------------------ one SAE (inference, evaluation, export)
    def init(self, sae: SAE) -> None:
        """Add the parameters of `params` to a fresh SAE."""

    @property
    def modes(self) -> tuple[str, ...]:
        """Inference modes evaluation measures (the first is the SAE's own)."""
        return ("threshold", "batch") if self.batch else ("threshold",)

    def code(self, sae: SAE, pre: torch.Tensor, mode: str) -> Code:
        """The latents of pre-activations [n, m]: mode 'threshold' (inference), or 'train'/'batch' (as trained)."""
        raise NotImplementedError

    def init_from_data(self, sae: SAE, x: torch.Tensor) -> None:
        """Its data-dependent start from the first batch x (in the input space), beyond b_dec's."""

    def sets_threshold(self, cfg: SAEConfig) -> bool:
        """Whether a threshold is set from the final weights (finish.py): a global θ, or a target-L0 factor."""
        return self.global_theta

    def saved(self, sae: SAE, tensors: dict[str, torch.Tensor]) -> None:
        """Add to (or rename in) tensors, which hold W_enc, b_enc, W_dec, b_dec, what the SAELens file holds
        beyond them, by SAELens's names."""

    def file_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """The shapes of the tensors `saved` adds that loading checks."""
        return {}

    def loaded(self, tensors: dict[str, torch.Tensor]) -> None:
        """Undo `saved`'s renaming in the tensors read from a file."""

    def restore(self, sae: SAE, tensors: dict[str, torch.Tensor]) -> None:
        """Set what `saved` added into a loaded SAE (whose base parameters are set)."""

    def saved_config(self, sae: SAE) -> dict[str, Any]:
        """Entries of the SAELens cfg.json this architecture adds."""
        return {}

    # ------------------------------------------------------------ a stack (training)
    def losses(self, stack: SAEStack, x_in: torch.Tensor, x_enc: torch.Tensor, since_fired: torch.Tensor,
               coeff: torch.Tensor, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Fill out with each SAE's losses [S] on inputs x_in [S, n, d] (x_enc: what the encoder reads);
        return (x_hat [S, n, d], the code: kept pairs (idx, vals) [S, P] or a dense [S, n, m])."""
        raise NotImplementedError

    def after_step(self, stack: SAEStack, world: int) -> None:
        """What follows each optimiser step (a quantile SAE's threshold moves)."""

    def to_sae(self, stack: SAEStack, i: int, sae: SAE) -> None:
        """Copy what SAE i of the stack holds beyond its parameters into a plain SAE."""

    def running_theta(self, stack: SAEStack, state: Any, i: int) -> float:
        """SAE i's running θ (the log's theta_running): the mean smallest kept activation of the batches since
        theta_from (StepState's sums)."""
        return float(state.theta_sum[i]) / max(1.0, float(state.theta_n[i]))


class KArch(Arch):
    """k latents per token on average, as kept pairs; Gao et al.'s auxiliary loss on dead latents."""

    takes_k = True

    def check(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            cfg.k = DEFAULT_K
        if not 0 < cfg.k <= cfg.d_sae:
            raise PipelineError(f"k={cfg.k} must satisfy 0 < k <= dictionary size ({cfg.d_sae})")
        super().check(cfg)

    def title(self, cfg: SAEConfig) -> str:
        return f"{cfg.arch}_k{cfg.k}_m{cfg.d_sae}"

    def select(self, stack: SAEStack, pre: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training's selection for the stack's SAEs sl: flat indices [S', P] of the kept pairs of pre [S', n, m],
        and each latent's largest pre-activation [S', m] where found on the way (else None)."""
        raise NotImplementedError

    def keep(self, stack: SAEStack, vals: torch.Tensor) -> torch.Tensor:
        """The kept pairs' values [S, P] (relu'd) as the code uses them."""
        return vals

    def extra_losses(self, stack: SAEStack, idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor | None,
                     x_in: torch.Tensor, grouped: tuple[torch.Tensor, ...] | None, out: dict[str, torch.Tensor]
                     ) -> None:
        """Losses beyond the MSE and the auxiliary loss, from the same pairs (or dense code)."""

    def losses(self, stack, x_in, x_enc, since_fired, coeff, out):
        n, m = x_in.shape[1], stack.key.d_sae
        shift = stack.b_dec if stack.key.center else None
        xe = x_enc.detach()
        xe1 = torch.cat([xe, xe.new_ones(*xe.shape[:2], 1)], 2)  # with a column of ones: b_enc's input
        dead = since_fired >= stack.dead_tokens[:, None]                                 # [S, m]
        with torch.no_grad():
            idx, kept, cols, block = stack.encode_pairs(xe, xe1, dead)
        grouped = stack.kernels.by_latent(idx, n, m)  # (exact: for the encoder's and decoder's gradients)
        # relu: a pair keeps value 0 where fewer than n·k (TopK: k) pre-activations are positive
        vals = self.keep(stack, KeptPre.apply(kept, xe1, stack.W_enc, stack.b_enc, shift, idx, grouped).relu())
        dense = None
        if idx.shape[1] > DENSE_DECODE_ABOVE * m * n:
            shape = (stack.size, n, m)
            dense = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
            dense = dense.view(stack.size, -1).scatter(1, idx, vals).view(shape)
            x_hat = torch.bmm(dense, stack.W_dec) + stack.b_dec[:, None, :]
        else:
            x_hat = decode_pairs(idx, vals, stack.W_dec, n, grouped) + stack.b_dec[:, None, :]
        out["mse"] = stack.mse(x_hat - x_in)
        self.extra_losses(stack, idx, vals, dense, x_in, grouped, out)
        out["aux"] = stack.aux_loss(cols, block, xe1, shift, dead, (x_in - x_hat).detach())
        return x_hat, (idx, vals)


class DenseArch(Arch):
    """A dense code from an activation function of the pre-activations, with a sparsity penalty."""

    def activate(self, stack: SAEStack, pre: torch.Tensor, x_in: torch.Tensor, coeff: torch.Tensor, unit: int,
                 out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The code [S, n, m] of pre [S, n, m]; adds the penalty (coeff [S] times unit, in units of the
        per-element MSE) and any auxiliary loss to out."""
        raise NotImplementedError

    def losses(self, stack, x_in, x_enc, since_fired, coeff, out):
        pre = torch.baddbmm(stack.b_enc[:, None, :], x_enc, stack.W_enc)
        unit = stack.key.d_in if stack.key.mse == "sum" else 1  # coefficients weigh against the per-element MSE
        f = self.activate(stack, pre, x_in, coeff, unit, out)
        x_hat = torch.bmm(f, stack.W_dec) + stack.b_dec[:, None, :]
        out["mse"] = stack.mse(x_hat - x_in)
        return x_hat, f
