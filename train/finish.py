"""What finishes a training run once its last step is taken: the thresholds set from the final weights
(BatchTopK's θ, a target-L0 JumpReLU's factor), one pass over the held-out rows (validation NMSE and
the inference-mode L0), each SAE's metadata, and the saved SAEs. It reads the values of `Ending`, which the
trainer fills; it knows nothing of the trainer."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchtopk.cache.split import Rows, Split
from batchtopk.core import distributed

from .archs import ARCHS
from .executor import Executor
from .sae import NMSE, SAE, SAEConfig, save_sae, standardized_mse
from .settings import TrainSettings
from .theta import estimate_theta, target_shift

HELDOUT_L0_ROWS = 1 << 17  # held-out rows the final L0 check reads at most (the paper pipeline has 31,608)
VAL_ROWS = 8192  # held-out rows of the validation NMSE in each SAE's metadata


def sets_threshold(c: SAEConfig) -> bool:
    """Whether an SAE has a threshold set from its final weights: BatchTopK's (and a quantile SAE's) θ, or
    the factor on a target-L0 JumpReLU's thresholds."""
    return ARCHS[c.arch].sets_threshold(c)


@dataclass
class Ending:
    """What finishing a run reads, as values: the trained SAEs, where they go, and where the rows that set
    and check their thresholds come from."""

    saes: list[SAE]               # every SAE of the run, final weights, as plain SAEs
    dirs: list[Path]              # where each is saved
    running: list[float | None]   # each SAE's running θ (the log's theta_running; None where it has none)
    settings: TrainSettings
    train_batches: Iterator[torch.Tensor]  # the training batches that follow the last step
    rows: Rows                    # the cache's held-out and calibration rows
    split: Split
    run_metadata: dict[str, Any]  # what every SAE's cfg.json records of the run (model, cache, data, ...)
    executor: Executor
    rank: int = 0
    world: int = 1

    @property
    def cfgs(self) -> list[SAEConfig]:
        return [sae.cfg for sae in self.saes]

    @property
    def device(self) -> str:
        return self.executor.device


def theta_estimator(s: TrainSettings, split: Split) -> str:
    """The estimator θ is set by: `unseen` needs a calibration part (none without held-out rows)."""
    return "pooled" if s.theta_estimator == "unseen" and not split.calibrate else s.theta_estimator


def finish(t: Ending) -> list[Path]:
    """Set the thresholds, measure the held-out rows and save every SAE (rank 0); returns their directories."""
    saes, dirs = t.saes, t.dirs
    thetas = estimate_thresholds(t)
    chosen = theta_estimator(t.settings, t.split)
    for sae, est in zip(saes, thetas):
        if est is not None and sae.arch.global_theta:
            sae.theta.fill_(est[chosen])
        elif est is not None:
            with torch.no_grad():
                sae.log_threshold.add_(math.log(est["threshold_factor"]))
    if t.rank == 0:
        val, l0s = heldout_pass(t, thetas) if t.split.heldout_chunks else (None, [None] * len(saes))
        for sae, cfg, d, est, l0 in zip(saes, t.cfgs, dirs, thetas, l0s):
            meta = metadata(t, cfg, sae, chosen)
            if est is not None:
                meta["theta_estimates" if sae.arch.global_theta else "target_l0_calibration"] = est
            if l0 is not None:
                meta["heldout_l0"] = l0
            with torch.no_grad():
                for mode in sae.modes if val is not None else ():
                    x_hat = sae(val, mode)
                    meta[f"val_nmse_{mode}"] = NMSE().add(val, x_hat).value
                    meta[f"val_standardized_mse_{mode}"] = float(standardized_mse(val, x_hat).mean())
            save_sae(sae, d, meta)
    return dirs


def estimate_thresholds(t: Ending) -> list[dict[str, float] | None]:
    """Thresholds from the final weights: every BatchTopK SAE's θ estimates (theta.py) over the training
    batches that follow the last step (theta_tokens tokens, at the training batch size) and, with a
    calibration part, over its rows (`unseen`, the same batch size); for a JumpReLU with a target L0 the
    factor on its thresholds that lands it there, over the calibration part if there is one, else those
    training batches."""
    saes, s = t.saes, t.settings
    todo = [i for i, c in enumerate(t.cfgs) if sets_threshold(c)]
    out: list[dict[str, float] | None] = [None] * len(saes)
    if not todo:
        return out
    n = max(1, math.ceil(s.theta_tokens / s.batch_size))
    xs = [next(t.train_batches) for _ in range(n)]
    unseen = []
    if t.split.calibrate:
        rows = t.rows.take(s.theta_tokens, part="calibration")
        unseen = [x.to(t.device) for x in rows.split(s.batch_size)]
    for i in todo:
        sae = saes[i]
        cfg = sae.cfg
        with torch.no_grad(), t.executor.autocast():
            def pre(x, sae=sae):
                return sae.pre(sae.normalize(x)[0])
            if sae.arch.global_theta:
                est = estimate_theta(xs, pre, cfg.k)
                if unseen:
                    est["unseen"] = estimate_theta(unseen, pre, cfg.k)["pooled"]
                est["running"] = t.running[i]
            else:
                est = {"threshold_factor": target_shift(unseen or xs, pre, sae.threshold, cfg.target_l0) or 1.0}
        for key in est:  # ranks saw different batches: average their estimates
            v = torch.tensor([est[key]], device=t.device)
            est[key] = float(distributed.all_reduce_(v)) / t.world
        out[i] = est
    return out


@torch.no_grad()
def heldout_pass(t: Ending, thetas: list[dict[str, float] | None], val_rows: int = VAL_ROWS
                 ) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
    """One read of the held-out rows evaluation reads: their first val_rows rows (the validation NMSE),
    and the inference-mode L0 of every SAE whose L0 is not fixed by construction (BatchTopK's θ, also at
    each of its other θ estimates; JumpReLU's thresholds) over whole chunks, up to HELDOUT_L0_ROWS,
    chunk by chunk: held-out text differs from chunk to chunk, and the spread over chunks says how far
    a difference from k (or the target) is more than that."""
    saes = t.saes
    todo = [i for i, sae in enumerate(saes) if sae.arch.checks_l0]
    sums: dict[int, list[float]] = {i: [] for i in todo}
    at: dict[int, dict[str, float]] = {i: dict.fromkeys(thetas[i], 0.0) for i in todo
                                       if saes[i].arch.global_theta and thetas[i]}
    rows: list[int] = []  # per chunk the L0 check saw
    val: list[torch.Tensor] = []
    for x in t.rows.chunks("heldout"):
        need_val = sum(map(len, val)) < val_rows
        need_l0 = bool(todo) and sum(rows) < HELDOUT_L0_ROWS  # a large held-out part is not read whole
        if not (need_val or need_l0):
            break
        if need_val:
            val.append(x)
        if not need_l0 or not len(x):
            continue
        x = x.to(t.device)
        rows.append(len(x))
        for i in todo:
            sae = saes[i]
            with t.executor.autocast():
                pre = sae.pre(sae.normalize(x)[0])
                counts = sae.code(pre, sae.modes[0]).counts
                for name in at.get(i, {}):
                    at[i][name] += float((pre > max(thetas[i][name], 0.0)).sum())
            sums[i].append(float(counts.sum()))
    out: list[dict[str, Any] | None] = [None] * len(saes)
    for i in todo:
        per_chunk = [s / n for s, n in zip(sums[i], rows)]
        spread = statistics.stdev(per_chunk) / math.sqrt(len(per_chunk)) if len(per_chunk) > 1 else 0.0
        out[i] = {"mean": sum(sums[i]) / sum(rows), "standard_error": spread, "per_chunk": per_chunk,
                  "rows": sum(rows), "mode": saes[i].modes[0]}
        if i in at:
            out[i]["at_estimates"] = {name: v / sum(rows) for name, v in at[i].items()}
    return torch.cat(val)[:val_rows].to(t.device), out


def metadata(t: Ending, cfg: SAEConfig, sae: SAE, chosen: str) -> dict[str, Any]:
    """An SAE's cfg.json metadata: the run's (what SAELens-based tools read, where its data came from: the rows it
    saw, the batches), then its own: its recipe as data, its learning rate, and how its θ was set."""
    s = t.settings
    cal = t.split.sequences(t.rows.cache, "calibration")
    theta_doc = {"unseen": f"the smallest activation kept by one batch top-k over up to {s.theta_tokens} tokens "
                           f"of held-out sequences range({cal.start}, {cal.stop}, {cal.step}), never trained on, "
                           "final weights",
                 "pooled": f"the smallest activation kept by one batch top-k over {s.theta_tokens} training "
                           "tokens, final weights",
                 "mean": f"the mean smallest kept activation of batches of {s.batch_size} over "
                         f"{s.theta_tokens} training tokens, final weights (eq. 7)",
                 "running": "the training threshold at the last step (each step moved it toward the batch's "
                            "(1 - k/m) quantile of pre-activations)" if cfg.arch == "quantile" else
                            f"the mean smallest kept activation over the last {s.theta_window:.0%} of "
                            "training batches, weights of each step"}
    bt = sae.arch.global_theta
    return t.run_metadata | {
        "architecture": cfg.arch, "k": cfg.k, "d_sae": cfg.d_sae,
        "recipe": cfg.changed(),  # the settings beyond the name's that differ from the defaults
        "lr": cfg.lr if cfg.lr is not None else s.lr, "betas": list(cfg.betas or s.betas), "replicate": cfg.replicate,
        "theta": float(sae.theta) if bt else None,
        "theta_estimator": chosen if bt else None,
        "theta_estimate": theta_doc[chosen] if bt else None,
    }
