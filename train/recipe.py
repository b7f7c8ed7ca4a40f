"""One SAE's training recipe beyond its losses: optimiser, learning-rate schedule, sparsity coefficient.

The schedules are pure functions of the step, so a resumed run follows exactly the same schedule.
"""
from __future__ import annotations

import torch

from .sae import SAE, SAEConfig

# JumpReLU aimed at a target L0, as `make paper` trains it (pipelines.yaml spells the same settings):
# the target penalty's weight, Gemma Scope's beta1 = 0 and lr decay over the last 20%; the lr and the
# thresholds' own lr that measured best at make paper's budget (bench/ablation.py round 7: 3x and 5x
# what it had, and no sparsity warm-up). The final threshold factor then lands it on its target.
JUMPRELU_TARGET_RECIPE = {"lr": 3e-3, "l0_coeff": 1.0, "threshold_lr": 0.1, "betas": (0.0, 0.999), "decay": 0.2}


def make_optimizer(sae: SAE, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the SAE's parameters with the SAE's own lr and betas where it sets them (else the
    run's); JumpReLU's log-thresholds in a group of their own when threshold_lr is set. Each group
    remembers its base lr; lr_factor scales it every step."""
    cfg = sae.cfg
    lr = cfg.lr if cfg.lr is not None else lr
    groups = [{"params": [p for n, p in sae.named_parameters() if n != "log_threshold"], "lr": lr}]
    if cfg.arch == "jumprelu":
        groups.append({"params": [sae.log_threshold], "lr": cfg.threshold_lr or lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    fused = sae.W_enc.is_cuda or None  # one fused kernel on a GPU; the CPU keeps the default (foreach)
    return torch.optim.Adam(groups, betas=tuple(cfg.betas or betas), fused=fused)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def lr_factor(cfg: SAEConfig, step: int, total: int) -> float:
    """Linear warm-up over the first `warmup` of training, linear decay to 0 over the last `decay`."""
    t = step / max(1, total)
    f = 1.0
    if cfg.warmup > 0 and t < cfg.warmup:
        f = (step + 1) / (cfg.warmup * total + 1)
    if cfg.decay > 0 and t > 1 - cfg.decay:
        f = min(f, (total - step) / (cfg.decay * total))
    return max(0.0, min(1.0, f))


def base_sparsity_coeff(cfg: SAEConfig) -> float | None:
    return {"jumprelu": cfg.l0_coeff, "relu": cfg.l1_coeff}.get(cfg.arch)


def sparsity_coeff(cfg: SAEConfig, step: int, total: int) -> float | None:
    """The L0 (JumpReLU) or L1 (ReLU) coefficient at this step, warmed up over `sparsity_warmup`."""
    base = base_sparsity_coeff(cfg)
    if base is None or cfg.sparsity_warmup <= 0:
        return base
    return base * min(1.0, (step + 1) / (cfg.sparsity_warmup * total))
