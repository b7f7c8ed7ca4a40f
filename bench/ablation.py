"""`python -m bench ablation`: what each recipe difference between peers does to our trainer.

Every variant is our trainer with one setting changed (or a named combination), BatchTopK and
TopK alike, all trained in one pass over the same batches of the paper pipeline's cache and
scored on the same held-out rows (bench.peers.Budget and score). Several seeds give a spread.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from batchtopk.train.archs import K_ARCHS
from batchtopk.train.recipe import JUMPRELU_TARGET_RECIPE
from batchtopk.train.sae import load_sae
from batchtopk.train.settings import TrainSettings
from batchtopk.train.trainer import Trainer

from .peers import COMPARISON_TOKENS, HELDOUT_ROWS, MAIN_MODE, Budget, score
from .records import Record, device_name

# The defaults are what measured best below. Rounds 1-3 were measured on top of the previous
# defaults (lr 3e-4, MSE averaged over elements, no clipping); they are written that way here, so
# `--variant` reproduces each row (with the auxiliary-loss settings of the time, see AUX_BEFORE).
PREVIOUS = {"lr": 3e-4, "mse": "mean", "grad_clip": None, "aux_coeff": 1 / 32, "dead_tokens": 5 * 4096}
DL_RECIPE = {"center": True, "b_dec_init": "geometric_median", "grad_clip": 1.0, "mse": "sum", "betas": (0.9, 0.999),
             "warmup": 0.1, "aux_norm": True, "dead_tokens": 10_000_000}
ROUNDS: dict[str, dict[str, Any]] = {
    "previous defaults": {},
    "center (encode x - b_dec)": {"center": True},
    "b_dec = geometric median": {"b_dec_init": "geometric_median"},
    "betas 0.9/0.999": {"betas": (0.9, 0.999)},
    "clip 1.0, MSE mean over elements": {"grad_clip": 1.0},
    "clip 1.0, MSE summed over dimensions": {"grad_clip": 1.0, "mse": "sum"},
    "lr warm-up 10%": {"warmup": 0.1},
    "lr decay over the last 20%": {"decay": 0.2},
    "aux normalised, dead after 10M tokens": {"aux_norm": True, "dead_tokens": 10_000_000},
    "no aux loss": {"aux_coeff": 0.0},
    "lr 2e-4/sqrt(m/2^14) (dictionary_learning's)": {"lr": "dl"},
    "token standardisation (reference code)": {"norm": "token"},
    "dictionary_learning's whole recipe": DL_RECIPE | {"lr": "dl"},
    # second round: what makes the summed-MSE-with-clipping and the higher learning rate work
    "MSE summed over dimensions": {"mse": "sum"},
    "lr 6e-4": {"lr": 6e-4},
    "lr 1e-3": {"lr": 1e-3},
    "clip 1.0, MSE summed, lr 2e-4/sqrt(m/2^14)": {"grad_clip": 1.0, "mse": "sum", "lr": "dl"},
    "clip 1.0, MSE summed, lr 6e-4": {"grad_clip": 1.0, "mse": "sum", "lr": 6e-4},
    "MSE summed, lr 6e-4": {"mse": "sum", "lr": 6e-4},
    # third round: how far the learning rate goes at this budget, and what combines with it
    "lr 2e-3": {"lr": 2e-3},
    "lr 3e-3": {"lr": 3e-3},
    "clip 1.0, MSE summed, lr 1e-3 (today's defaults)": {"grad_clip": 1.0, "mse": "sum", "lr": 1e-3},
    "clip 1.0, MSE summed, lr 2e-3": {"grad_clip": 1.0, "mse": "sum", "lr": 2e-3},
    "lr 1e-3, token standardisation": {"lr": 1e-3, "norm": "token"},
    "lr 1e-3, decay over the last 20%": {"lr": 1e-3, "decay": 0.2},
    "clip 1.0, MSE summed, lr 1e-3, token standardisation": {"grad_clip": 1.0, "mse": "sum", "lr": 1e-3,
                                                            "norm": "token"},
}
# Round 4, on the lr-1e-3 defaults with the dead-latent settings they had then (aux loss 1/32, dead
# after 20,480 tokens): the reference code's options, a higher lr, and what revives dead latents.
AUX_BEFORE = {"aux_coeff": 1 / 32, "dead_tokens": 5 * 4096}
ROUND4: dict[str, dict[str, Any]] = {
    "defaults, aux 1/32, dead after 20480 tokens": {},
    "defaults + token standardisation": {"norm": "token"},
    "defaults + center": {"center": True},
    "defaults + lr 2e-3": {"lr": 2e-3},
    "aux 1/8": {"aux_coeff": 1 / 8},
    "dead after 4096 tokens": {"dead_tokens": 4096},
    "aux 1/8, dead after 4096 tokens (today's defaults)": {"aux_coeff": 1 / 8, "dead_tokens": 4096},
}
# Round 5, TopK at small k (where round 4's settings cost it 2.4%): the dead-latent settings between
# round 4's two corners, each written out in full.
ROUND5: dict[str, dict[str, Any]] = {
    "aux 1/32, dead after 4096 tokens": {"aux_coeff": 1 / 32, "dead_tokens": 4096},
    "aux 1/16, dead after 4096 tokens": {"aux_coeff": 1 / 16, "dead_tokens": 4096},
    "aux 1/8, dead after 8192 tokens": {"aux_coeff": 1 / 8, "dead_tokens": 8192},
    "aux 1/8, dead after 4096 tokens": {"aux_coeff": 1 / 8, "dead_tokens": 4096},
}
# Round 7, JumpReLU (`--arch jumprelu`: make paper's recipe, target L0 = --k): its dead latents, and
# the parts of Gemma Scope's recipe at this budget. (An auxiliary loss like TopK's, fitted to the
# residual by the dead latents' pre-activations, was tried too and not kept: worse, and more latents
# dead, most likely because a good fit needs values below the latents' thresholds.)
JUMPRELU_BEFORE = {"lr": None, "l0_coeff": 1.0, "threshold_lr": 0.02, "sparsity_warmup": 0.1, "betas": (0.0, 0.999),
                   "decay": 0.2}  # make paper's JumpReLU recipe before round 7 (lr None: the run's, 1e-3)
ROUND7: dict[str, dict[str, Any]] = {
    "JumpReLU recipe before round 7": {},
    # Anthropic's pre-activation loss (their 3e-6 on the summed MSE is 5e-9 per element at d = 576)
    "pre-act 5e-9": {"preact_coeff": 5e-9},
    "pre-act 1e-7": {"preact_coeff": 1e-7},
    "pre-act 4e-7": {"preact_coeff": 4e-7},
    "pre-act 2e-6": {"preact_coeff": 2e-6},
    "threshold lr 0.005": {"threshold_lr": 0.005},
    "pre-act 1e-7, threshold lr 0.005": {"preact_coeff": 1e-7, "threshold_lr": 0.005},
    "no lr decay": {"decay": 0.0},
    "betas 0.9/0.99": {"betas": (0.9, 0.99)},
    "no lr decay, betas 0.9/0.99": {"decay": 0.0, "betas": (0.9, 0.99)},
    "thresholds start at L0 64": {"jumprelu_init_l0": 64},
    "lr 2e-3": {"lr": 2e-3},
    "threshold lr 0.05": {"threshold_lr": 0.05},
    "bandwidth 0.003": {"bandwidth": 0.003},
    "no sparsity warm-up": {"sparsity_warmup": 0.0},
    "lr 2e-3, no sparsity warm-up": {"lr": 2e-3, "sparsity_warmup": 0.0},
    "lr 2e-3, threshold lr 0.05": {"lr": 2e-3, "threshold_lr": 0.05},
    "lr 2e-3, threshold lr 0.05, no sparsity warm-up": {"lr": 2e-3, "threshold_lr": 0.05, "sparsity_warmup": 0.0},
    "lr 2e-3, threshold lr 0.1, no sparsity warm-up": {"lr": 2e-3, "threshold_lr": 0.1, "sparsity_warmup": 0.0},
    "lr 3e-3, threshold lr 0.05, no sparsity warm-up": {"lr": 3e-3, "threshold_lr": 0.05, "sparsity_warmup": 0.0},
    "lr 3e-3, threshold lr 0.1, no sparsity warm-up": {"lr": 3e-3, "threshold_lr": 0.1, "sparsity_warmup": 0.0},
    "lr 2e-3, threshold lr 0.2, no sparsity warm-up": {"lr": 2e-3, "threshold_lr": 0.2, "sparsity_warmup": 0.0},
    "lr 3e-3, threshold lr 0.2, no sparsity warm-up": {"lr": 3e-3, "threshold_lr": 0.2, "sparsity_warmup": 0.0},
    "lr 4e-3, threshold lr 0.1, no sparsity warm-up": {"lr": 4e-3, "threshold_lr": 0.1, "sparsity_warmup": 0.0},
    "lr 3e-3, threshold lr 0.1, no sparsity warm-up, no lr decay": {"lr": 3e-3, "threshold_lr": 0.1,
                                                                     "sparsity_warmup": 0.0, "decay": 0.0},
    "lr 3e-3, threshold lr 0.1, no sparsity warm-up, pre-act 4e-7": {"lr": 3e-3, "threshold_lr": 0.1,
                                                                      "sparsity_warmup": 0.0, "preact_coeff": 4e-7},
    "lr 3e-3, threshold lr 0.1, no sparsity warm-up, pre-act 2e-6": {"lr": 3e-3, "threshold_lr": 0.1,
                                                                      "sparsity_warmup": 0.0, "preact_coeff": 2e-6},
}
# The reference code's two options on today's defaults (the README's 16x/32xd options table).
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults + --norm token": {"norm": "token"},
    "defaults + --center": {"center": True},
}
VARIANTS: dict[str, dict[str, Any]] = ({"defaults": {}} | {n: PREVIOUS | v for n, v in ROUNDS.items()}
                                       | {n: AUX_BEFORE | v for n, v in ROUND4.items()} | ROUND5
                                       | {n: JUMPRELU_BEFORE | v for n, v in ROUND7.items()} | OPTIONS)


def _cfg(variant: dict[str, Any], arch: str, m: int, k: int) -> dict[str, Any]:
    v = dict(variant)
    if v.get("lr") == "dl":
        v["lr"] = 2e-4 / (m / 2 ** 14) ** 0.5
    if arch == "jumprelu":  # make paper's JumpReLU (train/recipe.py), aimed at L0 = k
        v = JUMPRELU_TARGET_RECIPE | {"target_l0": k, "jumprelu_init_l0": 128} | v
    return {"arch": arch, "d_sae": m} | ({"k": k} if arch in K_ARCHS else {}) | v


def run(pipeline: str = "smollm2-135m-paper", archs: tuple[str, ...] = ("batchtopk", "topk"), dict_mult: int = 8,
        k: int = 32, seeds: int = 1, variants: tuple[str, ...] | None = None, extra: dict[str, dict] | None = None,
        tokens: int | None = None, heldout: str | None = None) -> list[Record]:
    from batchtopk.core import pipelines
    from batchtopk.harvest.cli import settings_from
    from batchtopk.harvest.run import harvest

    name, pipe = pipelines.get(pipeline)
    train = pipe["train"]
    cache = harvest(settings_from(name)[1])
    b = Budget.of(cache, tokens or COMPARISON_TOKENS, int(train.get("batch_size", 4096)),
                  int(train.get("seed", 0)), float(train.get("val_fraction", 0.05)),
                  heldout or train.get("heldout", "tail"))
    m = dict_mult * b.cache.d_model()
    todo = {n: VARIANTS[n] for n in (variants or VARIANTS)} | (extra or {})
    cfgs, keys = [], []
    for vname, v in todo.items():
        for arch in archs:
            for r in range(seeds):
                cfgs.append(_cfg(v, arch, m, k) | {"replicate": r})
                keys.append((vname, arch))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = Trainer(TrainSettings(cache=b.cache.location, saes=cfgs, out=str(Path(tmp) / "run"),
                                     tokens=b.steps * b.batch_size, batch_size=b.batch_size, seed=b.seed,
                                     val_fraction=b.val_fraction, heldout=b.layout, log_every=50,
                                     checkpoint_every=10 ** 9)).run()
        x = b.heldout(HELDOUT_ROWS)
        results: dict[tuple[str, str], dict[str, list[dict]]] = {}
        for key, d in zip(keys, dirs):
            sae, meta = load_sae(d)
            for mode in sae.modes:
                def rec(xb, mode=mode):
                    x_hat, code = sae.reconstruct(xb / b.scale, mode)
                    return x_hat * b.scale, code.counts, code.fired()
                label = mode if sae.cfg.arch == "batchtopk" else MAIN_MODE[sae.cfg.arch]
                results.setdefault(key, {}).setdefault(label, []).append(score(rec, x, b.batch_size, b.scale))
    dev = device_name("cpu")
    settings = {"pipeline": name, "cache_id": b.cache.attrs["cache_id"], "d_sae": m, "k": k, "steps": b.steps,
                "batch_size": b.batch_size, "training_tokens": b.steps * b.batch_size, "heldout_rows": len(x),
                "heldout": b.layout,
                "seeds": seeds}
    recs = []
    for (vname, arch), modes in results.items():
        main = MAIN_MODE[arch]
        base = statistics.fmean(r["nmse"] for r in results[(next(iter(todo)), arch)][main])
        for mode, runs in modes.items():
            vals = [r["nmse"] for r in runs]
            label = f"{arch}: {vname}" + (f" ({mode} mode)" if arch == "batchtopk" else "")
            recs.append(Record(label, statistics.fmean(vals), "NMSE", f"{arch}: {next(iter(todo))}"
                               + (f" ({main} mode)" if arch == "batchtopk" else ""), base, dev,
                               settings | {"variant": vname, "arch": arch, "mode": mode,
                                           "changes": {k2: v for k2, v in _cfg(todo[vname], arch, m, k).items()
                                                       if k2 not in ("arch", "d_sae", "k")},
                                           "nmse_per_seed": vals,
                                           "nmse_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                           "l0": statistics.fmean(r["l0"] for r in runs),
                                           "standardized_mse": statistics.fmean(r["standardized_mse"] for r in runs),
                                           "dead_fraction": statistics.fmean(r["dead_fraction"] for r in runs)}))
    return recs

