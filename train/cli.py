"""`python -m train`: train BatchTopK and baseline SAEs on a cache; prints each SAE's directory."""
from __future__ import annotations

import click

from batchtopk.cache.split import HELDOUT_LAYOUTS
from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors
from batchtopk.harvest.cli import parse_tokens

from .sae import ARCHS, B_DEC_INITS, MSE_REDUCTIONS, NORMS
from .sweep import sweep_from
from .trainer import THETA_ESTIMATORS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--cache", help="Cache location (path or URL). Default: the one the latest `make harvest` of the pipeline "
              "wrote; before any, the pipeline's own cache (harvested if needed).")
@click.option("--site", help="Site to train on (default: the cache's first).")
@click.option("--arch", help=f"Architecture(s), comma-separated: {', '.join(ARCHS)}.")
@click.option("--k", help="k (average latents per token), or a comma-separated list.")
@click.option("--dict", "dict_", help="Dictionary size(s): integers or multiples of d_model like 8x.")
@click.option("--l0-coeff", help="JumpReLU L0 penalty(s).")
@click.option("--l1-coeff", help="ReLU L1 penalty(s).")
@click.option("--norm", help=f"Input normalisation(s): {', '.join(NORMS)} (one scale for all tokens, or "
              "each token standardised like the reference code's input_unit_norm).")
@click.option("--center", help="Encode x - b_dec: true, false, or both (true,false).")
@click.option("--b-dec-init", help=f"b_dec's start: {', '.join(B_DEC_INITS)} (of the first batch).")
@click.option("--mse", help=f"MSE reduction(s): {', '.join(MSE_REDUCTIONS)} (over elements, or over dimensions).")
@click.option("--aux-norm", help="Divide the aux loss by the residual's variance: true or false.")
@click.option("--grad-clip", help="Clip each SAE's gradient norm at this (none: no clipping).")
@click.option("--warmup", help="Fraction of training with a linear lr warm-up.")
@click.option("--decay", help="Fraction of training, at the end, with a linear lr decay to 0.")
@click.option("--betas", help="Adam betas as b1/b2, e.g. 0.9/0.999 (comma-separate several).")
@click.option("--target-l0", help="JumpReLU: penalise (L0/target - 1)^2 (times --l0-coeff) so that L0 lands here.")
@click.option("--threshold-lr", help="JumpReLU: learning rate of the log-thresholds.")
@click.option("--seeds", type=int, help="Train this many seeds of every SAE in the same pass (replicates 0..n-1).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUES",
              help="Any other SAE setting or sweep key, e.g. --set aux_k=256 (repeatable).")
@click.option("--theta-estimator", type=click.Choice(THETA_ESTIMATORS),
              help="BatchTopK's inference threshold, from the final weights: unseen (default; over every other "
                   "held-out sequence, which evaluation then leaves out), pooled or mean (eq. 7) over training "
                   "batches, or running (during training).")
@click.option("--tokens", help="Training tokens (integer, or 'all' for one epoch of the cache).")
@click.option("--batch-size", type=int, help="Tokens per batch (default 4096).")
@click.option("--lr", type=float, help="Adam learning rate (default 1e-3).")
@click.option("--seed", type=int, help="Seed for initialisation and data order.")
@click.option("--dead-tokens", type=int, help="Tokens without firing after which a latent counts as dead.")
@click.option("--val-fraction", type=float, help="Fraction of the cache held out (default 0.05).")
@click.option("--heldout", type=click.Choice(HELDOUT_LAYOUTS),
              help="Which part is held out: tail (the last chunks, default) or interleaved (one sequence in "
                   "every 1/val-fraction, spread over the whole cache).")
@click.option("--log-every", type=int, help="Steps between log records.")
@click.option("--checkpoint-every", type=int, help="Steps between training-state checkpoints.")
@click.option("--include-bos", is_flag=True, default=None, help="Train on BOS positions too (default: left out).")
@click.option("--include-outliers", is_flag=True, default=None,
              help="Train on massive-activation rows too (norm > 10x the mean; default: left out).")
@click.option("--local-copy", help="For a URL cache: keep a read-through copy of the chunks read in this folder.")
@click.option("--device", help="cuda or cpu (default: CUDA when present).")
@click.option("--out", help="Run directory (default data/saes/<pipeline>/<run id>).")
@one_line_errors
def main(pipeline, cache, site, arch, k, dict_, l0_coeff, l1_coeff, norm, center, b_dec_init, mse, aux_norm, grad_clip,
         warmup, decay, betas, target_l0, threshold_lr, seeds, sets, theta_estimator, tokens, batch_size, lr, seed,
         dead_tokens, val_fraction, heldout, log_every, checkpoint_every, include_bos, include_outliers, local_copy, device,
         out) -> None:
    """Train BatchTopK (default) and baseline SAEs; one pass over the cache feeds a whole sweep.

    Rerunning after an interruption resumes; rerunning a finished run prints its SAEs again.
    """
    from batchtopk.cache.format import Cache
    from batchtopk.core import distributed, latest

    from .trainer import Trainer, TrainSettings, run_id

    name, pipe = pipelines.get(pipeline)
    train = pipe["train"]
    if cache is None:
        cache = _default_cache(name)
    c = Cache.open(cache)
    d_in = c.d_model()
    grid = {"arch": arch, "k": k, "dict": dict_, "l0_coeff": l0_coeff, "l1_coeff": l1_coeff, "norm": norm,
            "center": center, "b_dec_init": b_dec_init, "mse": mse, "aux_norm": aux_norm, "grad_clip": grad_clip,
            "warmup": warmup, "decay": decay, "betas": betas, "target_l0": target_l0, "threshold_lr": threshold_lr,
            "seeds": seeds, "dead_tokens": dead_tokens}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PipelineError(f"--set takes KEY=VALUES, not {item!r}")
        grid[key.strip()] = value
    saes = sweep_from(train, grid, d_in)
    s = TrainSettings(cache=c.location, saes=saes, out="", site=site or train.get("site"), pipeline=name,
                      tokens=parse_tokens(tokens if tokens is not None else train.get("tokens", "all")))
    for key, val in (("batch_size", batch_size), ("lr", lr), ("seed", seed), ("val_fraction", val_fraction),
                     ("heldout", heldout),
                     ("theta_estimator", theta_estimator), ("theta_tokens", None),
                     ("log_every", log_every), ("checkpoint_every", checkpoint_every), ("device", device),
                     ("include_bos", include_bos), ("include_outliers", include_outliers),
                     ("local_copy", local_copy)):
        if val is None and key in train:
            val = train[key]
        if val is not None:
            setattr(s, key, val)
    if s.batch_size < 1:
        raise PipelineError(f"batch size {s.batch_size} must be positive")
    s.out = out or str(pipelines.DATA_DIR / "saes" / name / run_id(c.attrs["cache_id"], s))
    dirs = Trainer(s).run()
    if distributed.world()[0] == 0:
        latest.record(name, "train", run=s.out, saes=[str(d) for d in dirs], cache=c.location)  # for `make eval`
        for d in dirs:
            click.echo(str(d))
    distributed.shutdown()


def _default_cache(pipeline: str) -> str:
    """The cache the latest `make harvest` of the pipeline wrote; before any, the pipeline's own cache
    (harvested first if it is not there yet). Says which on stderr."""
    from batchtopk.cache import store
    from batchtopk.core import latest

    ptr = latest.read(pipeline, "harvest")
    if ptr is not None:
        if not store.exists(ptr["cache"]):
            raise PipelineError(f"the latest `make harvest` of pipeline {pipeline} wrote {ptr['cache']}, which is gone; "
                                "harvest again, or name a cache with CACHE= (--cache)")
        latest.note(f"train: on the cache of the latest `make harvest` of pipeline {pipeline} ({ptr['at']}): "
                    f"{ptr['cache']}")
        return ptr["cache"]
    from batchtopk.harvest.cli import settings_from
    from batchtopk.harvest.run import harvest

    latest.note(f"train: no `make harvest` of pipeline {pipeline} yet; on the pipeline's own cache")
    return harvest(settings_from(pipeline)[1])
