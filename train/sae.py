"""Sparse autoencoders: one base (W_enc, b_enc, W_dec, b_dec), seven ways to pick latents (train/archs/, one
file each; SAE and SAEStack call them and never ask which they hold).

    x_in = norm(x) [- b_dec]   pre = x_in W_enc + b_enc   f = sigma(pre)   x_hat = denorm(f W_dec + b_dec)

batchtopk  keep the n*k largest relu(pre) across the batch; at inference JumpReLU(theta)
           with one global theta (the expected smallest kept activation, the paper's eq. 7)
topk       keep the k largest relu(pre) per token
quantile   keep relu(pre) above a threshold that follows the batches' (1 - k/m) quantile of pre (a moving
           average of the n*k-th largest: the BatchTopK authors' running-quantile idea); at inference
           JumpReLU(theta) with one global theta, estimated as BatchTopK's
matryoshka BatchTopK's selection and θ, trained so that each prefix of the dictionary (nested groups of
           latents) reconstructs x on its own: the loss sums the prefixes' MSEs (Bussmann et al. 2025)
jumprelu   pre * H(pre - theta_i), per-latent thresholds, straight-through gradients, L0 penalty
relu       relu(pre), L1 penalty (decoder rows unit norm)
gated      H(pre) * relu((pre - b_enc) * exp(r_mag) + b_mag): a gate (b_enc is its bias) and a magnitude path
           sharing W_enc; L1 on relu(pre) and the gate's reconstruction through the frozen decoder
           (Rajamanoharan et al. 2024; decoder rows unit norm)

`norm` is how activations reach the SAE: `global` multiplies every token by one scale (folded
into the saved weights), `token` standardises each token (subtract its mean, divide by its
std: the reference code's input_unit_norm, SAELens's `layer_norm`), undone on the output.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from batchtopk.core.errors import PipelineError
from batchtopk.core.options import IF_SET, RECIPE, setting

from .archs import ARCHS, BATCH_ARCHS, K_ARCHS, L1_ARCHS
from .archs.base import DEAD_TOKENS_DEFAULT, DEFAULT_K, DENSE_DECODE_ABOVE, Arch
from .archs.matryoshka import MATRYOSHKA_GROUPS
from .sparsity import Code, sparse_decode

NORMS = ("global", "token")
B_DEC_INITS = ("mean", "geometric_median", "zero")
MSE_REDUCTIONS = ("mean", "sum")
LN_EPS = 1e-5              # token standardisation: (x - mean) / (std + eps), as SAELens's layer_norm


@dataclass
class SAEConfig:
    """Architecture and training recipe of one SAE. Every field is a sweep key (pipelines.yaml grids,
    `--set KEY=VALUES`); those with an option of their own are listed by `python -m train --help`. A field
    added later is declared identity=IF_SET, so that the runs trained before it keep their identity."""

    arch: str = setting(help=f"Architecture(s), comma-separated: {', '.join(ARCHS)}.", metavar="ARCHS", in_name=True,
                        selects=True)
    d_in: int = setting(cli=False, in_name=True)
    d_sae: int = setting(cli=False, in_name=True)  # the sweep's `dict` key (sizes or multiples of d_model)
    k: int | None = setting(None, f"k (average latents per token), or a comma-separated list (default {DEFAULT_K}).",
                            metavar="KS", applies_to=K_ARCHS, in_name=True, selects=True)
    # initial weights depend on (run seed, replicate, d_in, d_sae), not on the architecture
    replicate: int = setting(0, "Replicate index: another initial draw of the same SAE (--seeds sets them).",
                             cli=False)
    # how activations reach the encoder
    norm: str = setting("global", f"Input normalisation(s): {', '.join(NORMS)} (one scale for all tokens, or each "
                        "token standardised like the reference code's input_unit_norm).", group=RECIPE)
    center: bool = setting(False, "Encode x - b_dec: true, false, or both (true,false).", group=RECIPE)
    b_dec_init: str = setting("mean", f"b_dec's start: {', '.join(B_DEC_INITS)} (of the first batch).", group=RECIPE)
    # losses
    mse: str = setting("sum", f"MSE reduction(s): {', '.join(MSE_REDUCTIONS)} (summed over dimensions and averaged "
                       "over tokens, or averaged over elements).", group=RECIPE)
    l1_coeff: float = setting(0.01, "ReLU and Gated: L1 penalty(s) (in units of the per-element MSE).",
                              applies_to=L1_ARCHS, in_name=True, selects=True)
    l0_coeff: float = setting(0.005, "JumpReLU: L0 penalty(s), or the weight of the target-L0 penalty.",
                              applies_to=("jumprelu",), in_name=True, selects=True)
    target_l0: float | None = setting(None, "JumpReLU: penalise (L0/target - 1)^2 (times --l0-coeff) so that L0 "
                                      "lands here.", applies_to=("jumprelu",), in_name=True, selects=True)
    bandwidth: float = setting(0.001, "JumpReLU: straight-through kernel width, in units of the mean input norm.",
                               group=RECIPE, cli=False, applies_to=("jumprelu",))
    jumprelu_init_l0: float = setting(64.0, "JumpReLU: initial thresholds give about this many active latents per "
                                      "token (sweep key init_l0).", group=RECIPE, cli=False, applies_to=("jumprelu",),
                                      in_name=True, selects=True)
    threshold_lr: float | None = setting(None, "JumpReLU: learning rate of the log-thresholds (default: the SAE's "
                                         "lr).", group=RECIPE, applies_to=("jumprelu",))
    sparsity_warmup: float | None = setting(None, "Fraction of training over which the L0/L1 coefficient ramps up "
                                            f"from 0 (default: Gated {ARCHS['gated'].sparsity_warmup:g}, others 0).",
                                            group=RECIPE, cli=False, applies_to=("jumprelu", *L1_ARCHS))
    preact_coeff: float = setting(0.0, "JumpReLU: Anthropic's pre-activation loss, sum_i relu(theta_i - pre_i).",
                                  group=RECIPE, cli=False, applies_to=("jumprelu",))
    aux_k: int = setting(512, "(Batch)TopK: the auxiliary loss on the top aux_k dead latents ...", group=RECIPE,
                         cli=False, applies_to=K_ARCHS)
    aux_coeff: float = setting(1 / 8, "... scaled by this.", group=RECIPE, cli=False, applies_to=K_ARCHS)
    aux_norm: bool = setting(False, "Divide the aux loss by the residual's variance (dictionary_learning, OpenAI): "
                             "true or false.", group=RECIPE, applies_to=K_ARCHS)
    aux_batch: bool = setting(False, "(Batch)TopK: the auxiliary loss keeps the n·aux_k largest dead-latent "
                              "pre-activations of the batch instead of each token's top aux_k: true or false.",
                              group=RECIPE, cli=False, applies_to=K_ARCHS)
    quantile_rate: float = setting(0.05, "Quantile: each step moves the threshold this fraction of the way to the "
                                   "batch's (1 - k/m) quantile of pre-activations.", group=RECIPE, cli=False,
                                   applies_to=("quantile",))
    groups: tuple[float, ...] | None = setting(
        None, "Matryoshka: the nested groups, as latents summing to the dictionary size or fractions summing to 1, "
        "separated by / (default: 1/16, 1/16, 1/8, 1/4 and 1/2 of the dictionary, its authors' spacing).",
        group=RECIPE, cli=False, identity=IF_SET, applies_to=("matryoshka",))
    span: int | None = setting(None, "BatchTopK: tokens per selection, the span·k largest within each group of span "
                               "tokens of a batch (1: TopK's constraint; default: the whole batch).", group=RECIPE,
                               cli=False, applies_to=BATCH_ARCHS)
    resample: float | None = setting(None, "ReLU and Gated: every this fraction of training, through its first 80%, "
                                     "re-initialise the latents that did not fire since the last time from badly "
                                     "reconstructed tokens (Bricken et al. 2023; default: Gated "
                                     f"{ARCHS['gated'].resample:g}, ReLU 0 (never)).", group=RECIPE, identity=IF_SET,
                                     applies_to=L1_ARCHS)
    dead_tokens: int | None = setting(None, "Tokens without firing after which a latent counts as dead (default: "
                                      f"{DEAD_TOKENS_DEFAULT}, TopK {ARCHS['topk'].dead_tokens}).", group=RECIPE,
                                      applies_to=K_ARCHS)
    # optimiser (None: the run's setting)
    lr: float | None = setting(None, "This SAE's Adam learning rate (default: the run's --lr).", cli=False)
    betas: tuple[float, float] | None = setting(None, "Adam betas as b1/b2, e.g. 0.9/0.999 (comma-separate several).",
                                                group=RECIPE)
    grad_clip: float | None = setting(1.0, "Clip each SAE's gradient norm at this (none: no clipping).",
                                      group=RECIPE)
    warmup: float = setting(0.0, "Fraction of training with a linear lr warm-up from 0.", group=RECIPE)
    decay: float = setting(0.0, "Fraction of training, at the end, with a linear lr decay to 0.", group=RECIPE)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise PipelineError(f"unknown architecture {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.d_sae < 1:
            raise PipelineError(f"dictionary size {self.d_sae} must be at least 1")
        if self.groups is not None:
            self.groups = tuple(float(g) for g in self.groups)
        ARCHS[self.arch].check(self)  # its defaults, and the settings it does not take refused
        for name, value, allowed in (("norm", self.norm, NORMS), ("b_dec_init", self.b_dec_init, B_DEC_INITS),
                                     ("mse", self.mse, MSE_REDUCTIONS)):
            if value not in allowed:
                raise PipelineError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.d_sae:
            raise PipelineError(f"target_l0={self.target_l0} must satisfy 0 < target_l0 <= dictionary size")
        for name in ("warmup", "decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise PipelineError(f"{name}={getattr(self, name)} must be a fraction of training in [0, 1)")
        if self.warmup + self.decay >= 1:
            raise PipelineError(f"warmup ({self.warmup}) and decay ({self.decay}) together must stay below 1")
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        if self.resample is not None and not 0 <= self.resample <= 0.5:
            raise PipelineError(f"resample={self.resample} must be a fraction of training in [0, 0.5] (0: never)")
        if self.dead_tokens < 1:
            raise PipelineError(f"dead_tokens={self.dead_tokens} must be at least 1")
        for name in ("lr", "threshold_lr", "grad_clip"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise PipelineError(f"{name}={getattr(self, name)} must be positive (or none)")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise PipelineError(f"betas={self.betas} must each lie in [0, 1)")
        if not 0 < self.quantile_rate <= 1:
            raise PipelineError(f"quantile_rate={self.quantile_rate} must lie in (0, 1]")
        if self.aux_k < 1 or self.aux_coeff < 0:
            raise PipelineError(f"aux_k={self.aux_k} must be at least 1 and aux_coeff={self.aux_coeff} at least 0")

    def takes(self, name: str) -> bool:
        """Whether this SAE's architecture has the setting `name`."""
        return self.arch in applies_to(name)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """A Matryoshka SAE's groups in latents (fractions: each rounded down, the last one taking the rest)."""
        g, m = self.groups or MATRYOSHKA_GROUPS, self.d_sae
        if all(v == int(v) for v in g) and sum(g) == m:
            sizes = tuple(int(v) for v in g)
        elif all(0 < v <= 1 for v in g) and abs(sum(g) - 1) < 1e-6:
            sizes = tuple(int(v * m) for v in g[:-1])
            sizes += (m - sum(sizes),)
        else:
            raise PipelineError(f"groups={'/'.join(f'{v:g}' for v in g)}: Matryoshka groups are latent counts summing "
                                f"to the dictionary size ({m}) or fractions summing to 1")
        if min(sizes) < 1:
            raise PipelineError(f"groups={'/'.join(f'{v:g}' for v in g)} leave a group of {m} latents empty; each "
                                "group needs at least one latent")
        return sizes

    @property
    def name(self) -> str:
        """A directory name: the architecture's identity, then every other setting that is not the default."""
        base = ARCHS[self.arch].title(self)
        label = recipe_label(self.changed(keep_replicate=True))
        return f"{base}_{label}" if label else base

    def changed(self, keep_replicate: bool = False) -> dict[str, Any]:
        """The settings beyond what names the SAE (architecture, size, k or coefficients) that differ from
        the defaults, in field order: its recipe (and its replicate, if asked for and not 0)."""
        default = SAEConfig(self.arch, self.d_in, self.d_sae, self.k)
        skip = SHOWN_IN_NAME | (set() if keep_replicate else {"replicate"})
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(default, f.name)}


SETTINGS = {f.name: f for f in fields(SAEConfig)}


def applies_to(name: str) -> tuple[str, ...]:
    """The architectures that have the setting `name` (its declaration's applies_to; every one by default)."""
    return SETTINGS[name].metadata.get("applies_to") or tuple(ARCHS)


SHOWN_IN_NAME = {f.name for f in fields(SAEConfig) if f.metadata.get("in_name")}  # (declared with in_name=True)


def recipe_label(recipe: dict[str, Any]) -> str:
    """A recipe (SAEConfig.changed(), or as read back from JSON) as the name's suffix: key-value pairs
    joined by underscores, '' for the defaults."""
    return "_".join(f"{k}-{_short(v)}" for k, v in recipe.items())


def _short(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(_short(x) for x in v)
    if isinstance(v, bool):
        return "1" if v else "0"
    return f"{v:g}" if isinstance(v, float) else str(v)


# Values of settings that older cfg.json files do not name (what the code did before they existed).
LEGACY = {"norm": "global", "center": False}


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Each token minus its mean, over its std (unbiased) plus LN_EPS; returns (x_std, (mean, std))."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    std = xc.std(-1, keepdim=True)
    return xc / (std + LN_EPS), (mu, std)


def standardized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The paper's normalised MSE per token: the MSE between x and x_hat after standardising both with
    x's own mean and std (its input_unit_norm); shape [n]."""
    _, (mu, std) = standardize(x)
    return ((x_hat - x) / (std + LN_EPS)).pow(2).mean(-1)


class NMSE:
    """Normalised MSE, Σ‖x − x̂‖² / Σ‖x − mean(x)‖², over every batch added (the mean over all of them),
    from float64 sums kept on the device: the one definition the trainer, evaluation and the benchmarks
    use. `terms` can be summed across ranks."""

    def __init__(self) -> None:
        self.terms: torch.Tensor | None = None  # [Σ‖x − x̂‖², Σ‖x‖², n, Σx (d values)]

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> NMSE:
        x = x.detach().double()
        head = torch.stack([(x - x_hat.detach().double()).pow(2).sum(), x.pow(2).sum(),
                            torch.tensor(float(len(x)), dtype=torch.float64, device=x.device)])
        t = torch.cat([head, x.sum(0)])
        self.terms = t if self.terms is None else self.terms + t
        return self

    @property
    def error(self) -> float:
        """Σ‖x − x̂‖²."""
        return float(self.terms[0])

    @property
    def variance(self) -> float:
        """Σ‖x − mean(x)‖²."""
        t = self.terms
        return float(t[1] - t[3:].pow(2).sum() / t[2])

    @property
    def value(self) -> float:
        return self.error / self.variance


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """NMSE of one batch (see NMSE)."""
    return NMSE().add(x, x_hat).value


def init_seed(run_seed: int, replicate: int, d_in: int, d_sae: int) -> int:
    """The generator seed of an SAE's initial weights: the same for every architecture of a shape."""
    key = f"{run_seed}/{replicate}/{d_in}/{d_sae}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:7], "little")


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's iteration for the point minimising the summed distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        nxt = (w[:, None] * x).sum(0) / w.sum()
        if (nxt - y).norm() < tol:
            y = nxt
            break
        y = nxt
    return y.float()


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, run_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.arch: Arch = ARCHS[cfg.arch]
        d, m = cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(init_seed(run_seed, cfg.replicate, d, m))
        W = torch.randn(m, d, generator=gen)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.t().clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.arch.init(self)  # its own parameters (JumpReLU's thresholds, Gated's magnitude path)
        # batchtopk: the global inference threshold (estimated after training)
        self.register_buffer("theta", torch.zeros(()))
        # global norm: raw activations are multiplied by this before encoding (1 once saved: folded in)
        self.register_buffer("input_scale", torch.ones(()))

    # ------------------------------------------------------------ input and output spaces
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Raw activations -> the SAE's input space, and what `denormalize` needs to undo it."""
        if self.cfg.norm == "token":
            return standardize(x)
        return x * self.input_scale, None

    def denormalize(self, x_hat: torch.Tensor, ctx: Any) -> torch.Tensor:
        if self.cfg.norm == "token":
            mu, std = ctx
            return x_hat * std + mu
        return x_hat / self.input_scale

    # ------------------------------------------------------------ encoding (input space)
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.center else x

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, self.encoder_input(x), self.W_enc)

    @property
    def modes(self) -> tuple[str, ...]:
        """Inference modes to measure: BatchTopK both ways (threshold first, its inference mode)."""
        return self.arch.modes

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @property
    def eps(self) -> float:
        """JumpReLU's straight-through bandwidth in pre-activation units (inputs have mean norm ~sqrt(d))."""
        return self.cfg.bandwidth * math.sqrt(self.cfg.d_in)

    def code(self, pre: torch.Tensor, mode: str = "train") -> Code:
        """Select latents (the architecture's `code`). mode: 'train'/'batch' (batchtopk over the batch, per span
        if it has one) or 'threshold' (inference). (Training itself runs on stacks: train/stack.py.)"""
        return self.arch.code(self, pre, mode)

    def decode_code(self, code: Code) -> torch.Tensor:
        if code.pairs > DENSE_DECODE_ABOVE * code.n * code.m:
            return code.dense() @ self.W_dec + self.b_dec
        return sparse_decode(code, self.W_dec) + self.b_dec

    # ------------------------------------------------------------ raw activations in, raw out
    def encode(self, x: torch.Tensor, mode: str = "threshold") -> torch.Tensor:
        """Dense latent activations [n, m] of raw activations; batchtopk defaults to its threshold mode."""
        return self.code(self.pre(self.normalize(x)[0]), mode).dense()

    def reconstruct(self, x: torch.Tensor, mode: str = "threshold") -> tuple[torch.Tensor, Code]:
        """(x_hat, code) for raw activations x."""
        x_in, ctx = self.normalize(x)
        code = self.code(self.pre(x_in), mode)
        return self.denormalize(self.decode_code(code), ctx), code

    def forward(self, x: torch.Tensor, mode: str = "threshold") -> torch.Tensor:
        return self.reconstruct(x, mode)[0]

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """b_dec from the first batch (in the input space); JumpReLU thresholds so that about
        jumprelu_init_l0 latents fire per token on it."""
        init = self.cfg.b_dec_init
        if init == "mean":
            self.b_dec.copy_(x.float().mean(0))
        elif init == "geometric_median":
            self.b_dec.copy_(geometric_median(x.float()))
        else:
            self.b_dec.zero_()
        self.arch.init_from_data(self, x)


SWAPPABLE = ("batchtopk", "topk")  # architectures whose activation another SAE can be scored with (--encode-as)


def with_activation(sae: SAE, arch: str) -> SAE:
    """The same weights selecting latents with another architecture's activation at the same k (the
    BatchTopK authors' swapped-activations check, evaluation's --encode-as): a TopK SAE as BatchTopK (batch
    top-(n·k), or JumpReLU with the θ the caller sets), a BatchTopK SAE as TopK (k per token). The
    parameters are shared, not copied."""
    if sae.cfg.arch not in SWAPPABLE or arch not in SWAPPABLE:
        raise PipelineError(f"a {sae.cfg.arch} SAE cannot be encoded as {arch}: only {' and '.join(SWAPPABLE)} "
                            "SAEs swap activations (both select by k)")
    # the selection's own settings go with it: a span of BatchTopK's means nothing to TopK
    other = SAE(replace(sae.cfg, arch=arch, dead_tokens=None, span=sae.cfg.span if arch in BATCH_ARCHS else None))
    for name, param in sae.named_parameters():
        setattr(other, name, param)
    other.input_scale = sae.input_scale.clone()
    other.theta = (sae.theta if arch == sae.cfg.arch else torch.zeros_like(sae.theta)).clone()
    return other


# ---------------------------------------------------------------- SAELens on-disk format
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


def save_sae(sae: SAE, directory: Path, metadata: dict[str, Any]) -> None:
    """Write cfg.json + sae_weights.safetensors in SAELens's format, for raw activations.

    A global input scale s is folded in: W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s
    (pre-activations, and so thresholds, are unchanged). Token standardisation is SAELens's
    `layer_norm`. BatchTopK (and quantile, Matryoshka) is exported as SAELens's `jumprelu` with theta in
    every latent; ReLU as `standard`; Gated as `gated` (b_enc is its b_gate); a centred encoder sets
    `apply_b_dec_to_input`.
    """
    cfg = sae.cfg
    directory.mkdir(parents=True, exist_ok=True)
    s = float(sae.input_scale) if cfg.norm == "global" else 1.0  # token standardisation is scale-free
    W_enc = (sae.W_enc.detach().float() * s).contiguous()
    W_dec = (sae.W_dec.detach().float() / s).contiguous()
    b_dec = (sae.b_dec.detach().float() / s).contiguous()
    b_enc = sae.b_enc.detach().float().contiguous()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    sae.arch.saved(sae, tensors)
    out = {
        "architecture": sae.arch.export, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": cfg.center,
        "normalize_activations": "layer_norm" if cfg.norm == "token" else "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                     "trained_architecture": cfg.arch, "sae_config": asdict(cfg), "input_scale": s,
                     **metadata},
    }
    out |= sae.arch.saved_config(sae)
    blob = safetensors_save(tensors)
    out["metadata"]["weights_blake2b"] = hashlib.blake2b(blob, digest_size=16).hexdigest()
    for name, data in ((WEIGHTS_FILE, blob), (CFG_FILE, json.dumps(out, indent=2).encode())):
        tmp = directory / (name + ".tmp")
        try:
            tmp.write_bytes(data)
        except BaseException:  # a full disk: the previous files stay as they were
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(directory / name)


def _fix(d: Path) -> str:
    return (f"restore it from a copy, or train it again (delete its run directory {d.parent} and rerun the same "
            "`make train`)")


def load_config(directory: str | Path) -> tuple[SAEConfig, dict[str, Any]]:
    """A saved SAE's configuration and its whole cfg.json; errors name what is missing."""
    d = Path(directory)
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (d / f).is_file()]
    if not d.is_dir() or missing:
        raise PipelineError(f"{d} is not an SAE directory: missing {', '.join(missing) or 'the directory'} "
                            f"(an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((d / CFG_FILE).read_text())
        saved = LEGACY | meta["metadata"]["sae_config"]
        if saved.get("arch") not in K_ARCHS:  # written before k was refused for these (it was ignored)
            saved["k"] = None
        if saved.get("arch") in ARCHS and ARCHS[saved["arch"]].resample:  # trained before the default resampling
            saved.setdefault("resample", 0.0)
        return SAEConfig(**saved), meta
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{d / CFG_FILE} is unreadable or not a config written by this pipeline "
                            f"({type(e).__name__}: {str(e)[:120]}); {_fix(d)}") from None


def load_sae(directory: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Load a saved SAE (raw-activation weights) and its cfg.json; errors name what is missing."""
    d = Path(directory)
    cfg, meta = load_config(d)
    fix = _fix(d)
    try:
        blob = (d / WEIGHTS_FILE).read_bytes()
        want = meta["metadata"].get("weights_blake2b")
        if want is not None and hashlib.blake2b(blob, digest_size=16).hexdigest() != want:
            raise ValueError(f"its bytes do not match the digest in {CFG_FILE}")
        tensors = {k: v.to(device) for k, v in safetensors_load(blob).items()}
        arch = ARCHS[cfg.arch]
        arch.loaded(tensors)
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
                  "b_dec": (cfg.d_in,)} | arch.file_shapes(cfg)
        bad = [n for n, shape in shapes.items() if tuple(tensors[n].shape) != shape]
        if bad:
            raise ValueError(f"{', '.join(bad)} not of the shape cfg.json gives")
    except Exception as e:  # truncated or altered safetensors
        raise PipelineError(f"{d / WEIGHTS_FILE} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"{fix}") from None
    sae = SAE(cfg).to(device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        sae.arch.restore(sae, tensors)
    return sae.eval(), meta
