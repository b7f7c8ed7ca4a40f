"""`python -m train`: train BatchTopK and baseline SAEs on a cache; prints each SAE's directory."""
from __future__ import annotations

import click

from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors
from batchtopk.core.options import Command, build, check_keys, options, settable

from .sae import SAEConfig
from .settings import TrainSettings, run_id
from .sweep import GRID_KEYS, SWEEP_KEYS, Grid, sweep_from

FIXED = ("cache", "saes", "out", "pipeline")  # TrainSettings fields the command sets itself
PIPELINE = click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")


@click.command(cls=Command)
@PIPELINE
@click.option("--cache", help="Cache (path or URL). Default: the latest `make harvest`'s of the pipeline, else "
              "the pipeline's own.")
@options(SAEConfig, Grid, as_text=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUES",
              help="Any other SAE setting or sweep key, e.g. --set aux_k=256 (repeatable).")
@options(TrainSettings)
@click.option("--out", help="Run directory (default data/saes/<pipeline>/<run id>).")
@one_line_errors
def main(pipeline: str | None, cache: str | None, sets: tuple[str, ...], out: str | None, **given) -> None:
    """Train BatchTopK (default) and baseline SAEs; one pass over the cache feeds a whole sweep.

    Rerunning after an interruption resumes; rerunning a finished run prints its SAEs again.
    """
    from batchtopk.cache.format import Cache
    from batchtopk.core import distributed, latest

    from .trainer import Trainer

    name, pipe = pipelines.get(pipeline)
    train = pipe["train"]
    check_keys(train, [*settable(TrainSettings, FIXED), *GRID_KEYS, "sweep"], f"pipelines.yaml, pipeline {name}, "
               "section train")  # before anything runs (a harvest, for a pipeline without a cache yet)
    c = Cache.open(cache if cache is not None else _default_cache(name))
    grid = {k: given.pop(k) for k in SWEEP_KEYS}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PipelineError(f"--set takes KEY=VALUES, not {item!r}")
        grid[key.strip()] = value
    saes = sweep_from(train, grid, c.d_model())
    s = build(TrainSettings, given, train, cache=c.location, saes=saes, out="", pipeline=name)
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
            raise PipelineError(f"the latest `make harvest` of pipeline {pipeline} wrote {ptr['cache']}, which is "
                                "gone; harvest again, or name a cache with CACHE= (--cache)")
        latest.note(f"train: on the cache of the latest `make harvest` of pipeline {pipeline} ({ptr['at']}): "
                    f"{ptr['cache']}")
        return ptr["cache"]
    from batchtopk.harvest.cli import settings_from
    from batchtopk.harvest.run import harvest

    latest.note(f"train: no `make harvest` of pipeline {pipeline} yet; on the pipeline's own cache")
    return harvest(settings_from(pipeline)[1])
