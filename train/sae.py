"""Sparse autoencoders: one base (W_enc, b_enc, W_dec, b_dec), four ways to pick latents.

    pre = x W_enc + b_enc                  f = sigma(pre)         x_hat = f W_dec + b_dec

batchtopk  keep the n*k largest relu(pre) across the batch; at inference JumpReLU(theta)
           with one global theta (the mean smallest kept activation over training batches)
topk       keep the k largest relu(pre) per token
jumprelu   pre * H(pre - theta_i), per-latent thresholds, straight-through gradients, L0 penalty
relu       relu(pre), L1 penalty (decoder rows unit norm)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from harvest.errors import PipelineError

from .sparsity import Code, batch_topk_code, jumprelu, sparse_decode, step, topk_code

ARCHS = ("batchtopk", "topk", "jumprelu", "relu")
DENSE_DECODE_ABOVE = 0.05  # decode densely when more than this fraction of latents is active


@dataclass
class SAEConfig:
    arch: str
    d_in: int
    d_sae: int
    k: int | None = None              # batchtopk / topk
    l1_coeff: float = 0.01            # relu (about 5/d_model: our MSE is a mean over elements)
    l0_coeff: float = 0.005           # jumprelu lambda, on MSE averaged over elements
    bandwidth: float = 0.001          # jumprelu straight-through kernel width
    jumprelu_init_l0: float = 64.0    # initial thresholds give about this many active latents per token
    aux_k: int = 512                  # auxiliary loss on the top aux_k dead latents ...
    aux_coeff: float = 1 / 32         # ... scaled by this
    dead_tokens: int = 5 * 4096       # a latent is dead after this many tokens without firing

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise PipelineError(f"unknown architecture {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.d_sae < 1:
            raise PipelineError(f"dictionary size {self.d_sae} must be at least 1")
        if self.arch in ("batchtopk", "topk"):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise PipelineError(f"k={self.k} must satisfy 0 < k <= dictionary size ({self.d_sae})")

    @property
    def name(self) -> str:
        if self.arch in ("batchtopk", "topk"):
            return f"{self.arch}_k{self.k}_m{self.d_sae}"
        if self.arch == "jumprelu":
            return f"jumprelu_l{self.l0_coeff:g}_i{self.jumprelu_init_l0:g}_m{self.d_sae}"
        return f"relu_l{self.l1_coeff:g}_m{self.d_sae}"


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_in, cfg.d_sae
        W = torch.randn(m, d, generator=generator)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.t().clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((m,), math.log(0.001)))
        # batchtopk: the global inference threshold (a buffer, estimated during training)
        self.register_buffer("theta", torch.zeros(()))

    # ------------------------------------------------------------ encoding
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    @property
    def modes(self) -> tuple[str, ...]:
        """Inference modes to measure: BatchTopK both ways (threshold first, its inference mode)."""
        return ("threshold", "batch") if self.cfg.arch == "batchtopk" else ("threshold",)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def code(self, pre: torch.Tensor, mode: str = "train") -> Code:
        """Select latents. mode: 'train'/'batch' (batchtopk over the batch) or 'threshold' (inference)."""
        a = self.cfg.arch
        if a == "batchtopk":
            if mode == "threshold":
                return Code.from_dense(pre * (pre > self.theta.clamp_min(0)))
            return batch_topk_code(pre.relu(), self.cfg.k)
        if a == "topk":
            return topk_code(pre.relu(), self.cfg.k)
        if a == "jumprelu":
            return Code.from_dense(jumprelu(pre, self.threshold, self.cfg.bandwidth))
        return Code.from_dense(pre.relu())

    def encode(self, x: torch.Tensor, mode: str = "threshold") -> torch.Tensor:
        """Dense latent activations [n, m]; batchtopk defaults to its batch-free threshold mode."""
        return self.code(self.pre(x), mode).dense()

    def decode_code(self, code: Code) -> torch.Tensor:
        if code.nnz > DENSE_DECODE_ABOVE * code.n * code.m:
            return code.dense() @ self.W_dec + self.b_dec
        return sparse_decode(code, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor, mode: str = "threshold") -> torch.Tensor:
        return self.decode_code(self.code(self.pre(x), mode))

    # ------------------------------------------------------------ training
    def losses(self, x: torch.Tensor, dead: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Code]:
        """Training losses on a (normalised) batch. Returns ({name: value, 'loss': total}, code)."""
        cfg = self.cfg
        pre = self.pre(x)
        out: dict[str, torch.Tensor] = {}
        if cfg.arch == "jumprelu":
            # Dense here on purpose: the threshold's straight-through gradient needs the
            # reconstruction gradient at latents just below threshold, which a sparse decode drops.
            f = jumprelu(pre, self.threshold, cfg.bandwidth)
            x_hat = f @ self.W_dec + self.b_dec
            code = Code.from_dense(f.detach())
            out["sparsity"] = cfg.l0_coeff * step(pre, self.threshold, cfg.bandwidth).sum(-1).mean()
        else:
            code = self.code(pre, "train")
            x_hat = self.decode_code(code)
            if cfg.arch == "relu":
                out["sparsity"] = cfg.l1_coeff * code.dense().abs().sum() / x.shape[0]
        out["mse"] = (x_hat - x).pow(2).mean()
        if cfg.arch in ("batchtopk", "topk") and dead is not None and bool(dead.any()):
            out["aux"] = cfg.aux_coeff * self._aux_loss(pre, dead, (x - x_hat).detach())
        out["loss"] = sum(out.values())
        out["x_hat"] = x_hat.detach()
        return out, code

    def _aux_loss(self, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Reconstruct the residual from the top aux_k dead latents of each token (Gao et al. 2024)."""
        dead_idx = dead.nonzero().squeeze(1)
        k = min(self.cfg.aux_k, len(dead_idx))
        code = topk_code(pre[:, dead_idx].relu(), k)
        code.cols = dead_idx[code.cols]
        code.m = self.cfg.d_sae
        return (sparse_decode(code, self.W_dec) - residual).pow(2).mean()

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """JumpReLU thresholds so that about jumprelu_init_l0 latents fire per token on batch x."""
        if self.cfg.arch == "jumprelu":
            q = 1.0 - min(1.0, self.cfg.jumprelu_init_l0 / self.cfg.d_sae)
            theta = torch.quantile(self.pre(x).float(), q, dim=0).clamp_min(1e-3)
            self.log_threshold.copy_(theta.log())


# ---------------------------------------------------------------- SAELens on-disk format
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


def save_sae(sae: SAE, directory: Path, scale: float, metadata: dict[str, Any]) -> None:
    """Write cfg.json + sae_weights.safetensors in SAELens's format, folding the input scale in.

    Training sees x * scale; the saved SAE encodes raw x: W_enc' = scale W_enc,
    W_dec' = W_dec / scale, b_dec' = b_dec / scale (pre-activations, and so thresholds, are unchanged).
    BatchTopK is exported as SAELens's `jumprelu` with theta in every latent; ReLU as `standard`.
    """
    cfg = sae.cfg
    directory.mkdir(parents=True, exist_ok=True)
    W_enc = (sae.W_enc.detach().float() * scale).contiguous()
    W_dec = (sae.W_dec.detach().float() / scale).contiguous()
    b_dec = (sae.b_dec.detach().float() / scale).contiguous()
    tensors = {"W_enc": W_enc, "b_enc": sae.b_enc.detach().float().contiguous(), "W_dec": W_dec, "b_dec": b_dec}
    export = {"batchtopk": "jumprelu", "topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[cfg.arch]
    if cfg.arch == "batchtopk":
        tensors["threshold"] = torch.full((cfg.d_sae,), float(sae.theta))
    elif cfg.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float().contiguous()
    out = {
        "architecture": export, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                     "trained_architecture": cfg.arch, "sae_config": asdict(cfg), "input_scale": scale,
                     **metadata},
    }
    if cfg.arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / (CFG_FILE + ".tmp")).write_text(json.dumps(out, indent=2))
    (directory / (CFG_FILE + ".tmp")).replace(directory / CFG_FILE)


def load_sae(directory: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Load a saved SAE (raw-activation weights) and its cfg.json; errors name what is missing."""
    d = Path(directory)
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (d / f).is_file()]
    if not d.is_dir() or missing:
        raise PipelineError(f"{d} is not an SAE directory: missing {', '.join(missing) or 'the directory'} "
                            f"(an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((d / CFG_FILE).read_text())
        cfg = SAEConfig(**meta["metadata"]["sae_config"])
        tensors = load_file(str(d / WEIGHTS_FILE), device=device)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{d}/{CFG_FILE} is not a config written by this pipeline ({type(e).__name__}: {e})") from None
    sae = SAE(cfg).to(device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if cfg.arch == "batchtopk":
            sae.theta.fill_(float(tensors["threshold"][0]))
        elif cfg.arch == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
    return sae.eval(), meta
