"""`python -m bench peers`: our trainer against peer implementations, on exactly the same batches.

Every implementation is fed the batches our training stream yields (same rows, same order, same
global input scale: mean norm sqrt(d)) for the same number of steps, and every SAE is scored on
the same held-out rows. Peers run with their own defaults; step-count defaults written for long
runs (warm-up, threshold start) are scaled to this budget and recorded in each record's settings.

- dictionary_learning 0.1.0 (PyPI): its BatchTopKTrainer, TopKTrainer, JumpReluTrainer,
  MatryoshkaBatchTopKTrainer and GatedSAETrainer, loaded by file path from a private install under
  data/peers/ (never imported into the product).
- SAELens (a test dependency): its BatchTopK / TopK / JumpReLU / Matryoshka BatchTopK training SAEs
  driven by its own SAETrainer (Adam 0.9/0.999, gradient norm clipped at 1, its dead-latent window).

Matryoshka runs with our default groups in every implementation. Gated has no k: each implementation
trains it at every L1 coefficient of a grid (GATED_L1, or --gated-l1) and its NMSE is read at L0 = k,
interpolated (log-log) between the two coefficients whose L0 bracket k.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import math
import statistics
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows, Split
from batchtopk.core.pipelines import DATA_DIR
from batchtopk.train.archs import BATCH_ARCHS
from batchtopk.train.archs.matryoshka import MATRYOSHKA_GROUPS
from batchtopk.train.recipe import JUMPRELU_TARGET_RECIPE
from batchtopk.train.sae import NMSE, SAEConfig, load_sae, standardized_mse
from batchtopk.train.settings import TrainSettings
from batchtopk.train.stream import ActivationStream
from batchtopk.train.trainer import Trainer

from .records import Record, device_name

DICTIONARY_LEARNING = "dictionary-learning==0.1.0"
PEER_SITE = DATA_DIR / "peers" / "site"
# x [n, d] (normalised space) -> (x_hat [n, d], active latents per token [n], firings per latent [m])
Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Budget:
    """The data and budget every implementation gets."""

    cache: Cache
    site: str
    batch_size: int
    steps: int
    seed: int
    val_fraction: float
    scale: float
    layout: str = "tail"  # the held-out layout (cache/split.py Split)

    @classmethod
    def of(cls, cache: str, tokens: int, batch_size: int, seed: int, val_fraction: float,
           layout: str = "tail") -> Budget:
        c = Cache.open(cache)
        site = c.sites[0]
        stats = c.train_stats(site, False)
        return cls(c, site, batch_size, math.ceil(tokens / batch_size), seed, val_fraction,
                   math.sqrt(c.d_model()) / float(stats["mean_norm"]), layout)

    @functools.cached_property
    def rows(self) -> Rows:
        """Our trainer's rows (BOS and outliers left out) and split: every other held-out sequence
        calibrates its θ, the others are scored."""
        return Rows(self.cache, self.site, Split.of(self.cache, self.val_fraction, self.layout, calibrate=True))

    def batches(self) -> Iterator[torch.Tensor]:
        """Exactly the batches our trainer sees, in its order, in the normalised space."""
        s = ActivationStream(self.rows, self.batch_size, self.scale, seed=self.seed)
        it = s.batches(0)
        try:
            for _ in range(self.steps):
                yield next(it)
        finally:
            it.close()

    def heldout(self, rows: int) -> torch.Tensor:
        return self.rows.take(rows, scale=self.scale)


@torch.no_grad()
def score(rec: Reconstruct, x: torch.Tensor, batch_size: int, scale: float,
          train: Iterable[torch.Tensor] | None = None) -> dict[str, Any]:
    """NMSE, the paper's standardised-token MSE, L0 and dead fraction over x (in chunks of batch_size).

    With `train` (the training batches), also how many latents fire on none of them, and how often the
    latents that are silent on x fired in training: a latent can be silent on held-out text because it
    is dead, or because it learned something only the training text has."""
    err, std_mse = NMSE(), 0.0
    l0 = 0
    fired = None
    for xb in x.split(batch_size):
        x_hat, counts, f = rec(xb)
        err.add(xb, x_hat)
        std_mse += float(standardized_mse(xb / scale, x_hat / scale).sum())
        l0 += int(counts.sum())
        fired = f if fired is None else fired + f
    out: dict[str, Any] = {"nmse": err.value, "standardized_mse": std_mse / len(x), "l0": l0 / len(x),
                           "dead_fraction": float((fired == 0).float().mean())}
    if train is not None:
        seen = sum(rec(xb)[2].long() for xb in train)
        silent = seen[fired == 0].sort().values
        out |= {"dead_in_training_fraction": float((seen == 0).float().mean()),
                "heldout_dead_training_firings": ([int(silent[0]), int(silent.median()), int(silent[-1])]
                                                  if len(silent) else []),
                "median_training_firings": int(seen.median())}
    return out


def at_l0(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Scores of runs at several sparsity coefficients (one seed) read at L0 = target: NMSE and the
    standardised MSE interpolated linearly in log L0 / log NMSE between the two runs whose L0 bracket the
    target, the other scores from the nearer of them; NaN where no two runs bracket it."""
    runs = sorted(runs, key=lambda r: r["l0"])
    for lo, hi in zip(runs, runs[1:]):
        if lo["l0"] <= target <= hi["l0"] and lo["l0"] > 0:
            w = (math.log(target) - math.log(lo["l0"])) / max(1e-12, math.log(hi["l0"]) - math.log(lo["l0"]))
            near = lo if w <= 0.5 else hi
            out = dict(near) | {"l0": float(target), "l0_bracket": [lo["l0"], hi["l0"]],
                                "coeff_bracket": [lo["coeff"], hi["coeff"]]}
            for key in ("nmse", "standardized_mse"):
                out[key] = math.exp((1 - w) * math.log(lo[key]) + w * math.log(hi[key]))
            return out
    return dict(runs[0]) | {"nmse": math.nan, "standardized_mse": math.nan, "l0": float(target),
                            "l0_bracket": [r["l0"] for r in runs], "coeff_bracket": None}


def _dense_rec(encode: Callable[[torch.Tensor], torch.Tensor],
               decode: Callable[[torch.Tensor], torch.Tensor]) -> Reconstruct:
    def rec(x):
        f = encode(x)
        return decode(f), (f != 0).sum(1), (f != 0).sum(0)
    return rec


# ---------------------------------------------------------------- ours
def train_ours(b: Budget, arch: str, m: int, k: int, seeds: int, out: Path,
               gated_l1: tuple[float, ...]) -> dict[str, list[dict]]:
    """One pass of our trainer for all seeds (Gated: at every coefficient of gated_l1, read at L0 = k);
    scored in each inference mode (BatchTopK and Matryoshka: batch and threshold)."""
    if arch == "gated":
        per = [{"l1_coeff": c} for c in gated_l1]
    elif arch == "jumprelu":
        per = [{"target_l0": k, "jumprelu_init_l0": 4 * k} | JUMPRELU_TARGET_RECIPE]
    else:
        per = [{"k": k}]
    cfgs = [{"arch": arch, "d_sae": m, "replicate": r} | c for r in range(seeds) for c in per]
    dirs = Trainer(TrainSettings(cache=b.cache.location, saes=cfgs, out=str(out), tokens=b.steps * b.batch_size,
                                 batch_size=b.batch_size, seed=b.seed, val_fraction=b.val_fraction, heldout=b.layout,
                                 log_every=50, checkpoint_every=10 ** 9)).run()
    x = b.heldout(HELDOUT_ROWS)
    scores: dict[str, list[dict]] = {}
    for d in dirs:
        sae, _ = load_sae(d)
        for mode in sae.modes:
            def rec(xb, mode=mode):  # the saved SAE reads raw activations
                x_hat, code = sae.reconstruct(xb / b.scale, mode)
                return x_hat * b.scale, code.counts, code.fired()
            label = mode if arch in BATCH_ARCHS else MAIN_MODE[arch]
            run = score(rec, x, b.batch_size, b.scale, b.batches()) | {"coeff": sae.cfg.l1_coeff}
            scores.setdefault(label, []).append(run)
    if arch == "gated":  # each seed's runs at every coefficient -> one run at L0 = k
        scores = {mode: [at_l0(runs[i:i + len(gated_l1)], k) for i in range(0, len(runs), len(gated_l1))]
                  for mode, runs in scores.items()}
    return scores


# ---------------------------------------------------------------- dictionary_learning
def _load_dictionary_learning() -> types.ModuleType:
    """dictionary_learning's trainers, imported by file path from a private install (its package
    __init__ needs nnsight; the trainers need only torch and einops)."""
    root = PEER_SITE / "dictionary_learning"
    if not (root / "trainers" / "batch_top_k.py").exists():
        PEER_SITE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(PEER_SITE), DICTIONARY_LEARNING, "einops"], check=True)
    if str(PEER_SITE) not in sys.path:
        sys.path.append(str(PEER_SITE))
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        if name not in sys.modules:  # packages without their __init__ (which imports nnsight)
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
    return importlib.import_module("dictionary_learning.trainers")


def train_dictionary_learning(b: Budget, arch: str, m: int, k: int, seeds: int, lr: float | None,
                              gated_l1: tuple[float, ...]) -> tuple[dict, dict]:
    """dictionary_learning's trainer for `arch` on our batches, at its default lr (None) or at `lr` (Gated: at
    every coefficient of gated_l1, read at L0 = k)."""
    importlib.import_module("dictionary_learning.trainers")
    mods = {a: importlib.import_module(f"dictionary_learning.trainers.{f}")
            for a, f in (("batchtopk", "batch_top_k"), ("topk", "top_k"), ("jumprelu", "jumprelu"),
                         ("matryoshka", "matryoshka_batch_top_k"), ("gated", "gdm"))}
    d = b.cache.d_model()
    scaled = max(1, b.steps // 10)  # its 1000-step warm-ups and threshold start, for a 1e5-step run
    settings: dict[str, Any] = {"warmup_steps": scaled}
    scores: dict[str, list[dict]] = {}
    held = b.heldout(HELDOUT_ROWS)  # read once for every seed and coefficient
    for seed in range(seeds):
        common = dict(steps=b.steps, activation_dim=d, dict_size=m, layer=0, lm_name="cache", seed=seed,
                      device="cpu", warmup_steps=scaled) | ({"lr": lr} if lr is not None else {})
        runs: dict[str, list[dict]] = {}
        # gated: its L1 penalty weighs the summed squared error, ours the per-element one (d times smaller)
        for coeff in gated_l1 if arch == "gated" else (None,):
            if arch == "batchtopk":
                tr = mods[arch].BatchTopKTrainer(k=k, threshold_start_step=scaled, **common)
            elif arch == "topk":
                tr = mods[arch].TopKTrainer(k=k, threshold_start_step=scaled, **common)
            elif arch == "matryoshka":
                tr = mods[arch].MatryoshkaBatchTopKTrainer(k=k, group_fractions=list(MATRYOSHKA_GROUPS),
                                                          threshold_start_step=scaled, **common)
                settings["group_sizes"] = tr.group_sizes
            elif arch == "gated":
                tr = mods[arch].GatedSAETrainer(l1_penalty=d * coeff, sparsity_warmup_steps=scaled, **common)
            else:
                tr = mods[arch].JumpReluTrainer(target_l0=float(k), sparsity_warmup_steps=scaled, **common)
            for step, x in enumerate(b.batches()):
                tr.update(step, x)
            ae = tr.ae
            if arch in ("jumprelu", "gated"):
                modes = {MAIN_MODE[arch]: _dense_rec(ae.encode, ae.decode)}
            else:  # its own selection, and the threshold it learns for inference
                modes = {MAIN_MODE[arch]: _dense_rec(lambda v: ae.encode(v, use_threshold=False), ae.decode)}
                if float(ae.threshold) >= 0:
                    modes["threshold"] = _dense_rec(lambda v: ae.encode(v, use_threshold=True), ae.decode)
            for mode, rec in modes.items():
                runs.setdefault(mode, []).append(score(rec, held, b.batch_size, b.scale, b.batches())
                                                 | {"coeff": coeff})
        for mode, rs in runs.items():
            scores.setdefault(mode, []).append(at_l0(rs, k) if arch == "gated" else rs[0])
        settings["lr"] = tr.lr
    return scores, settings


# ---------------------------------------------------------------- SAELens
def train_saelens(b: Budget, arch: str, m: int, k: int, seeds: int, lr: float | None = None) -> tuple[dict, dict]:
    """SAELens's training SAE for `arch` under its own SAETrainer on our batches, at its default lr or at `lr`."""
    import logging

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    d = b.cache.d_model()
    scores: dict[str, list[dict]] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        if arch == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, d_in=d, d_sae=m))
        elif arch == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, d_in=d, d_sae=m))
        elif arch == "matryoshka":  # our default groups, as the prefixes' widths
            widths = list(itertools.accumulate(SAEConfig("matryoshka", d, m, k=k).group_sizes))
            sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                k=k, d_in=d, d_sae=m, matryoshka_widths=widths))
        elif arch == "jumprelu":
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=m))
        cfg = SAETrainerConfig(total_training_samples=b.steps * b.batch_size, train_batch_size_samples=b.batch_size)
        if lr is not None:
            cfg.lr = lr
        cfg.lr_end = cfg.lr / 10  # what its runner config sets by default (used by decaying schedules only)
        trainer = SAETrainer(cfg, sae, data_provider=b.batches())
        _quiet_fit(trainer)
        x = b.heldout(HELDOUT_ROWS)
        modes = {}
        if arch in BATCH_ARCHS:
            modes["batch"] = _dense_rec(sae.encode, sae.decode)
        with tempfile.TemporaryDirectory() as tmp:  # its inference SAE (BatchTopK: JumpReLU with its threshold)
            from sae_lens import SAE
            sae.save_inference_model(tmp)
            inf = SAE.load_from_disk(tmp)
        modes["threshold" if arch in BATCH_ARCHS else MAIN_MODE[arch]] = _dense_rec(inf.encode, inf.decode)
        for mode, rec in modes.items():
            scores.setdefault(mode, []).append(score(rec, x, b.batch_size, b.scale, b.batches()))
    return scores, {"lr": cfg.lr, "betas": [cfg.adam_beta1, cfg.adam_beta2],
                    "dead_feature_window": cfg.dead_feature_window}


def _quiet_fit(trainer) -> None:
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()


# ---------------------------------------------------------------- the table
HELDOUT_ROWS = 16384
COMPARISON_TOKENS = 560_000  # two epochs of the paper cache's training part: 547 steps of 1024
# what each record is compared in
MAIN_MODE = {"batchtopk": "batch", "topk": "topk", "jumprelu": "jumprelu", "matryoshka": "batch", "gated": "gated"}
# the learning rate our trainer uses for each architecture (the run's default, JumpReLU its own recipe's)
OUR_LR = {"batchtopk": TrainSettings.lr, "topk": TrainSettings.lr, "jumprelu": JUMPRELU_TARGET_RECIPE["lr"],
          "matryoshka": TrainSettings.lr, "gated": TrainSettings.lr}
# Gated's L1 coefficients (in units of the per-element MSE), each implementation trained at every one
GATED_L1 = (0.003, 0.01, 0.03, 0.1)
PEER_ARCHS = {"dictionary_learning": ("batchtopk", "topk", "jumprelu", "matryoshka", "gated"),
              "saelens": ("batchtopk", "topk", "jumprelu", "matryoshka")}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run(pipeline: str = "smollm2-135m-paper", archs: tuple[str, ...] = ("batchtopk", "topk"), dict_mult: int = 8,
        k: int = 32, tokens: int | None = None, batch_size: int | None = None, seeds: int = 1,
        peers: tuple[str, ...] = ("dictionary_learning", "saelens"), heldout: str | None = None,
        peer_lrs: tuple[str, ...] = ("default", "ours"), gated_l1: tuple[float, ...] = ()) -> list[Record]:
    """Ours and every peer on the same batches; each peer at its own default learning rate and (with
    "ours" in peer_lrs) at ours, so a difference of recipe is told apart from a difference of lr. Gated trains at
    every coefficient of gated_l1 (empty: GATED_L1)."""
    gated_l1 = gated_l1 or GATED_L1
    from batchtopk.core import pipelines
    from batchtopk.harvest.cli import settings_from
    from batchtopk.harvest.run import harvest

    name, pipe = pipelines.get(pipeline)
    train = pipe["train"]
    cache = harvest(settings_from(name)[1])
    b = Budget.of(cache, tokens or COMPARISON_TOKENS, int(batch_size or train.get("batch_size", 4096)),
                  int(train.get("seed", 0)), float(train.get("val_fraction", 0.05)),
                  heldout or train.get("heldout", "tail"))
    m = dict_mult * b.cache.d_model()
    if "dictionary_learning" in peers:
        _load_dictionary_learning()
    settings = {"pipeline": name, "cache_id": b.cache.attrs["cache_id"], "site": b.site, "d_sae": m, "k": k,
                "steps": b.steps, "batch_size": b.batch_size, "training_tokens": b.steps * b.batch_size,
                "heldout_rows": len(b.heldout(HELDOUT_ROWS)), "heldout": b.layout, "seeds": seeds, "data_seed": b.seed}
    if "gated" in archs:
        settings["gated_l1"] = list(gated_l1)
    dev = device_name("cpu")
    recs: list[Record] = []
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            ours = train_ours(b, arch, m, k, seeds, Path(tmp) / "ours", gated_l1)
        our_lr = OUR_LR[arch]
        results = {"ours": (ours, {"lr": our_lr})}
        lrs = [(None, "")] * ("default" in peer_lrs) + [(our_lr, f" at our lr {our_lr:g}")] * ("ours" in peer_lrs)
        for lr, tag in lrs:
            if "dictionary_learning" in peers and arch in PEER_ARCHS["dictionary_learning"]:
                results[f"dictionary_learning 0.1.0{tag}"] = train_dictionary_learning(b, arch, m, k, seeds, lr,
                                                                                         gated_l1)
            if "saelens" in peers and arch in PEER_ARCHS["saelens"]:
                import sae_lens
                results[f"SAELens {sae_lens.__version__}{tag}"] = train_saelens(b, arch, m, k, seeds, lr)
        main = MAIN_MODE[arch]
        base = _mean_std([s["nmse"] for s in ours[main]])[0]
        for impl, (scores, extra) in results.items():
            for mode, runs in scores.items():
                nmse, sd = _mean_std([r["nmse"] for r in runs])
                label = f"{impl} {arch}" + ("" if mode == main and arch not in BATCH_ARCHS else f" ({mode} mode)")
                baseline = f"ours {arch}" + (" (batch mode)" if arch in BATCH_ARCHS else "")
                recs.append(Record(label, nmse, "NMSE", baseline,
                                   base, dev, settings | extra | {
                                       "implementation": impl, "arch": arch, "mode": mode, "nmse_std": sd,
                                       "nmse_per_seed": [r["nmse"] for r in runs],
                                       "standardized_mse": _mean_std([r["standardized_mse"] for r in runs])[0],
                                       "l0": _mean_std([r["l0"] for r in runs])[0],
                                       "dead_fraction": _mean_std([r["dead_fraction"] for r in runs])[0],
                                       "dead_in_training_fraction":
                                           _mean_std([r["dead_in_training_fraction"] for r in runs])[0],
                                       "heldout_dead_training_firings":
                                           [r["heldout_dead_training_firings"] for r in runs],
                                       "median_training_firings": [r["median_training_firings"] for r in runs]}
                                   | ({"l0_brackets": [r["l0_bracket"] for r in runs],
                                       "coeff_brackets": [r["coeff_bracket"] for r in runs]}
                                      if arch == "gated" else {})))
    return recs
