"""`python -m harvest`: harvest a cache (no subcommand), or ls / info / verify / push / pull."""
from __future__ import annotations

import json
import sys

import click

from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"layer must be an integer or a comma-separated list of integers, not {value!r}") from None


def parse_tokens(value) -> int | None:
    """An int, or 'all' (None) for the whole corpus."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        n = int(float(value))
    except ValueError:
        raise PipelineError(f"tokens must be a positive integer or 'all', not {value!r}") from None
    if n <= 0:
        raise PipelineError(f"tokens must be a positive integer or 'all', not {value!r}")
    return n


def settings_from(pipeline: str | None, **cli):
    """Pipeline values, overridden by every command-line value that was given."""
    from .run import HarvestSettings

    name, pipe = pipelines.get(pipeline)
    h = dict(pipe["harvest"])
    if cli.get("model") and cli["model"] != h.get("model") and cli.get("layer") is None:
        h.pop("layers", None)  # another model: its own default layer, not this pipeline's
    s = HarvestSettings()
    mapping = {"model": "model", "layers": "layers", "sites": "site_kinds", "dataset": "dataset",
               "dataset_config": "dataset_config", "config": "dataset_config", "split": "split",
               "text_column": "text_column", "separator": "separator", "dataset_fallback": "dataset_fallback",
               "ctx_len": "ctx_len", "dtype": "dtype", "model_dtype": "model_dtype", "batch_size": "batch_size",
               "chunk_mb": "chunk_mb"}
    for key, attr in mapping.items():
        if key in h:
            setattr(s, attr, h[key])
    if "tokens" in h:
        s.tokens = parse_tokens(h["tokens"])
    s.dataset = pipelines.resolve_path(s.dataset)
    for key in ("model", "dataset", "dataset_config", "split", "text_column", "separator", "ctx_len", "dtype",
                "model_dtype", "model_revision", "dataset_revision", "device", "batch_size", "chunk_mb",
                "cache_root", "out"):
        if cli.get(key) is not None:
            setattr(s, key, cli[key])
    if cli.get("dataset") is not None:
        s.dataset = pipelines.resolve_path(cli["dataset"])
        s.dataset_fallback = None
    if cli.get("layer") is not None:
        s.layers = _int_list(cli["layer"])
    if cli.get("site"):
        names = [x.strip() for x in cli["site"].split(",") if x.strip()]
        full = [x for x in names if x.startswith("blocks.")]
        if full and len(full) == len(names):
            s.sites = full
        elif full:
            raise PipelineError("--site takes either kinds (resid_pre,resid_post) or full names, not a mix")
        else:
            s.site_kinds = names
    if cli.get("tokens") is not None:
        s.tokens = parse_tokens(cli["tokens"])
    if cli.get("no_wait"):
        s.wait = False
    return name, s


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--model", help="Alias (smollm2-135m, gpt2, gemma-2-2b), hub id, local folder or .gguf file.")
@click.option("--model-revision", help="Hub revision (branch, tag or commit) of the model.")
@click.option("--layer", help="Layer(s) to hook, e.g. 8 or 6,8,10. Default: the model's usual layer.")
@click.option("--site", help="resid_pre and/or resid_post (comma-separated), or full names like blocks.8.hook_resid_pre.")
@click.option("--tokens", help="Tokens to cache (an integer, or 'all' for the whole corpus).")
@click.option("--dataset", help="Hub dataset id, or a local .txt/.jsonl/.parquet file or folder.")
@click.option("--dataset-config", help="Hub dataset configuration, e.g. wikitext-2-raw-v1.")
@click.option("--dataset-revision", help="Hub dataset revision.")
@click.option("--split", help="Dataset split (hub datasets).")
@click.option("--text-column", help="Column holding the text (default: text).")
@click.option("--separator", type=click.Choice(["auto", "none", "bos", "eos"]), help="Token between documents.")
@click.option("--ctx-len", type=int, help="Tokens per context, BOS included (default 128).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Storage precision.")
@click.option("--model-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Compute dtype.")
@click.option("--device", help="cuda, cuda:1 or cpu (default: CUDA when present).")
@click.option("--batch-size", type=int, help="Sequences per forward pass.")
@click.option("--chunk-mb", type=float, help="Target size of one chunk in MiB (default 4).")
@click.option("--cache-root", help="Root directory or URL under which caches live (default data/cache).")
@click.option("--out", help="Explicit cache location (default: derived from the settings under the root).")
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting when another process writes the same cache.")
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
