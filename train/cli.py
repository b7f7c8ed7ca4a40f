"""`python -m train`: train BatchTopK and baseline SAEs on a cache; prints each SAE's directory."""
from __future__ import annotations

import itertools
from typing import Any

import click

from harvest import pipelines
from harvest.cli import parse_tokens
from harvest.errors import PipelineError, one_line_errors

from .sae import ARCHS

GRID_KEYS = ("arch", "k", "dict", "l0_coeff", "l1_coeff", "init_l0")


def _split(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise PipelineError(f"{what} must be an integer, not {v!r}") from None


def dict_size(v: Any, d_in: int) -> int:
    """An integer, or a multiple of d_model written like '8x'."""
    s = str(v).strip().lower()
    n = _int(s[:-1], "dictionary multiple") * d_in if s.endswith("x") else _int(s, "dictionary size")
    if n < 1:
        raise PipelineError(f"dictionary size {v} must be at least 1")
    return n


def expand(grid: dict[str, Any], d_in: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One grid (lists per key) -> SAE configs; k applies to (batch)topk, coefficients to jumprelu/relu."""
    archs = _split(grid.get("arch", "batchtopk"))
    for a in archs:
        if a not in ARCHS:
            raise PipelineError(f"unknown architecture {a!r}; allowed: {', '.join(ARCHS)}")
    out = []
    for arch, m in itertools.product(archs, _split(grid.get("dict", "4x"))):
        base = {"arch": arch, "d_sae": dict_size(m, d_in), **extra}
        if arch in ("batchtopk", "topk"):
            out += [base | {"k": _int(k, "k")} for k in _split(grid.get("k", 32))]
        elif arch == "jumprelu":
            out += [base | {"l0_coeff": float(c)} | ({"jumprelu_init_l0": float(i)} if i is not None else {})
                    for c in (_split(grid.get("l0_coeff")) or [0.005])
                    for i in (_split(grid.get("init_l0")) or [None])]
        else:
            out += [base | {"l1_coeff": float(c)} for c in (_split(grid.get("l1_coeff")) or [0.01])]
    return out


def sweep_from(train: dict[str, Any], cli: dict[str, Any], d_in: int, extra: dict[str, Any]) -> list[dict]:
    """Command-line lists replace the pipeline's; a pipeline `sweep` runs when none is given."""
    given = {k: cli[k] for k in GRID_KEYS if cli.get(k) is not None}
    if "sweep" in train and not given:
        grids = train["sweep"]
    else:
        grids = [{k: train[k] for k in GRID_KEYS if k in train} | given]
    saes = [c for g in grids for c in expand(g, d_in, extra)]
    for c in saes:
        if c.get("k") is not None and not 0 < c["k"] <= c["d_sae"]:
            raise PipelineError(f"k={c['k']} must satisfy 0 < k <= dictionary size ({c['d_sae']})")
    return saes


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--cache", help="Cache location (path or URL). Default: the pipeline's cache, harvested if needed.")
@click.option("--site", help="Site to train on (default: the cache's first).")
@click.option("--arch", help=f"Architecture(s), comma-separated: {', '.join(ARCHS)}.")
@click.option("--k", help="k (average latents per token), or a comma-separated list.")
@click.option("--dict", "dict_", help="Dictionary size(s): integers or multiples of d_model like 8x.")
@click.option("--l0-coeff", help="JumpReLU L0 penalty(s).")
@click.option("--l1-coeff", help="ReLU L1 penalty(s).")
@click.option("--tokens", help="Training tokens (integer, or 'all' for one epoch of the cache).")
@click.option("--batch-size", type=int, help="Tokens per batch (default 4096).")
@click.option("--lr", type=float, help="Adam learning rate (default 3e-4).")
@click.option("--seed", type=int, help="Seed for initialisation and data order.")
@click.option("--dead-tokens", type=int, help="Tokens without firing after which a latent counts as dead.")
@click.option("--val-fraction", type=float, help="Fraction of the cache's chunks held out (default 0.05).")
@click.option("--log-every", type=int, help="Steps between log records.")
@click.option("--checkpoint-every", type=int, help="Steps between training-state checkpoints.")
@click.option("--include-bos", is_flag=True, default=None, help="Train on BOS positions too (default: left out).")
@click.option("--include-outliers", is_flag=True, default=None,
              help="Train on massive-activation rows too (norm > 10x the mean; default: left out).")
@click.option("--local-copy", help="For a URL cache: keep a read-through copy of the chunks read in this folder.")
@click.option("--device", help="cuda or cpu (default: CUDA when present).")
@click.option("--out", help="Run directory (default data/saes/<pipeline>/<run id>).")
@one_line_errors
def main(pipeline, cache, site, arch, k, dict_, l0_coeff, l1_coeff, tokens, batch_size, lr, seed, dead_tokens,
         val_fraction, log_every, checkpoint_every, include_bos, include_outliers, local_copy, device, out) -> None:
    """Train BatchTopK (default) and baseline SAEs; one pass over the cache feeds a whole sweep.

    Rerunning after an interruption resumes; rerunning a finished run prints its SAEs again.
    """
    from harvest import distributed
    from harvest.cache import Cache

    from .trainer import TrainSettings, Trainer, run_id

    name, pipe = pipelines.get(pipeline)
    train = pipe["train"]
    if cache is None:
        from harvest.cli import settings_from
        from harvest.run import harvest

        cache = harvest(settings_from(name)[1])
    c = Cache.open(cache)
    d_in = c.d_model()
    extra = {"dead_tokens": dead_tokens} if dead_tokens is not None else {}
    if "dead_tokens" in train and not extra:
        extra["dead_tokens"] = int(train["dead_tokens"])
    saes = sweep_from(train, {"arch": arch, "k": k, "dict": dict_, "l0_coeff": l0_coeff, "l1_coeff": l1_coeff},
                      d_in, extra)
    s = TrainSettings(cache=c.location, saes=saes, out="", site=site or train.get("site"), pipeline=name,
                      tokens=parse_tokens(tokens if tokens is not None else train.get("tokens", "all")))
    for key, val in (("batch_size", batch_size), ("lr", lr), ("seed", seed), ("val_fraction", val_fraction),
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
        for d in dirs:
            click.echo(str(d))
    distributed.shutdown()
