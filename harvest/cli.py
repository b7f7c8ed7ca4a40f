"""`python -m harvest`: harvest a cache (no subcommand), or ls / info / verify / push / pull."""
from __future__ import annotations

import json
import sys

import click

from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors
from batchtopk.core.options import ADVANCED, Group, GroupedOption, build, check_keys, options, settable

from .settings import HarvestSettings

# pipelines.yaml's harvest keys that are spelled otherwise than the settings' fields
YAML_NAMES = {"sites": "site_kinds", "config": "dataset_config"}


def settings_from(pipeline: str | None, **cli) -> tuple[str, HarvestSettings]:
    """The pipeline's harvest settings, overridden by every command-line value that was given (keyed by
    field name; `site` may be kinds or full names; `no_wait`)."""
    name, pipe = pipelines.get(pipeline)
    check_keys(pipe["harvest"], [*YAML_NAMES, *settable(HarvestSettings)], f"pipelines.yaml, pipeline {name}, "
               "section harvest")
    section = {YAML_NAMES.get(k, k): v for k, v in pipe["harvest"].items()}
    if cli.get("model") and cli["model"] != section.get("model") and cli.get("layers") is None:
        section.pop("layers", None)  # another model: its own default layer, not this pipeline's
    if cli.get("dataset") is not None:
        section.pop("dataset_fallback", None)  # a dataset named here has no hub fallback
    site = cli.pop("sites", None)
    if site:
        names = [x.strip() for x in site.split(",") if x.strip()]
        full = [x for x in names if x.startswith("blocks.")]
        if full and len(full) != len(names):
            raise PipelineError("--site takes either kinds (resid_pre,resid_post) or full names, not a mix")
        cli["sites" if full else "site_kinds"] = full or names
    s = build(HarvestSettings, cli, section)
    s.dataset = pipelines.resolve_path(s.dataset)
    if cli.pop("no_wait", False):
        s.wait = False
    return name, s


@click.group(cls=Group, invoke_without_command=True)
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@options(HarvestSettings)
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting when another process writes the same cache.",
              cls=GroupedOption, group=ADVANCED)
@click.pass_context
@one_line_errors
def main(ctx: click.Context, pipeline, **cli) -> None:
    """Run a language model once and cache residual-stream activations as sharded Zarr.

    Prints the cache's location as the last line. Rerunning a complete harvest is a no-op;
    an interrupted one resumes.
    """
    if ctx.invoked_subcommand is not None:
        return
    from batchtopk.core import distributed, latest

    from .run import harvest

    name, s = settings_from(pipeline, **cli)
    location = harvest(s)
    if distributed.world()[0] == 0:
        latest.record(name, "harvest", cache=location, model=s.model)  # `make train` takes it from here
        click.echo(location)
    distributed.shutdown()


@main.command()
@click.argument("root", required=False)
@one_line_errors
def ls(root: str | None) -> None:
    """List the caches under ROOT (directory or URL; default data/cache)."""
    from batchtopk.cache.share import list_caches

    rows = list_caches(root or str(pipelines.DATA_DIR / "cache"))
    if not rows:
        click.echo("no caches")
        return
    click.echo(f"{'location':<70} {'model':<14} {'tokens':>11} {'size':>9}  status  sites")
    for r in rows:
        click.echo(f"{r['location']:<70} {r['model']:<14} {r['n_tokens']:>11,} {r['size_h']:>9}  "
                   f"{'complete' if r['complete'] else 'partial '} {','.join(r['sites'])}")


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="The whole manifest as JSON (statistics included).")
@one_line_errors
def info(cache: str, as_json: bool) -> None:
    """Print the manifest of CACHE."""
    from batchtopk.cache.format import Cache

    c = Cache.open(cache, need_complete=False)
    a = c.attrs
    if as_json:
        click.echo(json.dumps(a, indent=2))
        return
    for k, v in a.items():
        if k == "stats":
            for site, st in v.items():
                click.echo(f"stats[{site}]: n={st['n']:,} mean_norm={st['mean_norm']:.4g} "
                           f"max|x|={max(st['abs_max']):.4g}")
        elif k == "checksum":
            continue
        else:
            click.echo(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    click.echo(f"location: {c.location}")


@main.command()
@click.argument("cache")
@one_line_errors
def verify(cache: str) -> None:
    """Re-hash every chunk of CACHE against its manifest; exit 1 on any corruption."""
    from batchtopk.cache.format import Cache

    c = Cache.open(cache, need_complete=False)
    problems = c.verify()
    for p in problems:
        click.echo(p)
    if problems:
        click.echo(f"CORRUPT: {len(problems)} problem(s) in {c.location}", err=True)
        sys.exit(1)
    click.echo(f"ok: {c.n_chunks} chunks x {1 + len(c.sites)} arrays verified in {c.location}"
               + ("" if c.complete else " (incomplete cache)"))


@main.command()
@click.argument("cache")
@click.argument("remote")
@one_line_errors
def push(cache: str, remote: str) -> None:
    """Copy a local CACHE to the REMOTE root (URL); prints the remote location."""
    from batchtopk.cache.share import copy_cache

    click.echo(copy_cache(cache, remote))


@main.command()
@click.argument("cache")
@click.argument("local_root", required=False)
@one_line_errors
def pull(cache: str, local_root: str | None) -> None:
    """Copy a remote CACHE into LOCAL_ROOT (default data/cache); prints the local location."""
    from batchtopk.cache.share import copy_cache

    click.echo(copy_cache(cache, local_root or str(pipelines.DATA_DIR / "cache")))
