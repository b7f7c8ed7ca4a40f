"""`python -m evaluate`: write metrics.json for SAEs; `python -m evaluate report`: the comparison report."""
from __future__ import annotations

import os

import click

from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--sae", "sae_dirs", multiple=True,
              help="SAE directory (repeatable). Default: the SAEs of the latest `make train` of the pipeline.")
@click.option("--tokens", type=int, help="Held-out tokens to evaluate on (default: the pipeline's, or all the "
              "held-out part has if that is fewer).")
@click.option("--batch-seqs", type=int, help="Sequences per forward pass.")
@click.option("--include-bos", is_flag=True, help="Also splice and score BOS positions (default: excluded).")
@click.option("--include-outliers", is_flag=True,
              help="Also splice and score massive-activation positions (norm > 10x the mean; default: excluded).")
@click.option("--dataset", help="Evaluate on this corpus instead of the cache's held-out part.")
@click.option("--device", help="cuda or cpu (default: CUDA when present).")
@click.pass_context
@one_line_errors
def main(ctx, pipeline, sae_dirs, tokens, batch_seqs, include_bos, include_outliers, dataset, device) -> None:
    """Splice each SAE's reconstruction into the model and measure NMSE, L0, CE and KL.

    Writes metrics.json beside each SAE and prints their paths.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .run import EvalSettings, evaluate

    name, pipe = pipelines.get(pipeline)
    ev = pipe["eval"]
    s = EvalSettings(saes=list(sae_dirs) or latest_saes(name, "evaluate"),
                     tokens=tokens if tokens is not None else int(ev.get("tokens", 4096)), exact_tokens=tokens is not None,
                     batch_seqs=batch_seqs or int(ev.get("batch_seqs", 8)), exclude_bos=not include_bos,
                     exclude_outliers=not include_outliers,
                     device=device, dataset=dataset)
    for path in evaluate(s):
        click.echo(str(path))


@main.command()
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--out", help="Report directory (default data/reports/<pipeline>).")
@one_line_errors
def report(pipeline, out) -> None:
    """Gather every evaluated SAE of the pipeline into report.md with plots; prints its path."""
    from .report import write_report
    from .run import discover

    name, _ = pipelines.get(pipeline)
    click.echo(str(write_report(name, discover(name), out)))


@main.command()
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--sae", "sae_dirs", multiple=True,
              help="SAE directory (repeatable). Default: the SAEs of the latest `make train` of the pipeline.")
@click.option("--tokens", type=int, help="Scan at most this many tokens (default: all of the held-out part).")
@click.option("--whole-cache", is_flag=True, help="Scan the whole cache instead of its held-out part.")
@click.option("--include-bos", is_flag=True, help="Also scan BOS positions (default: left out).")
@click.option("--include-outliers", is_flag=True, help="Also scan massive-activation positions (default: left out).")
@click.option("--out", help="Site directory (one SAE only; default data/browse/<pipeline>/<SAE name>).")
@click.option("--device", help="cuda or cpu (default: CUDA when present).")
@one_line_errors
def browse(pipeline, sae_dirs, tokens, whole_cache, include_bos, include_outliers, out, device) -> None:
    """Write a static latent browser per SAE (opens from disk); prints each site's index.html."""
    from batchtopk.harvest import models

    from .browse import BrowseSettings, build, write_overview

    name, _ = pipelines.get(pipeline)
    dirs = list(sae_dirs) or latest_saes(name, "browse")
    if out and len(dirs) > 1:
        raise PipelineError(f"--out names one site but {len(dirs)} SAEs were given; drop --out or give one --sae")
    if tokens is not None and tokens < 1:
        raise PipelineError(f"--tokens must be positive, not {tokens}")
    sites = []
    for d in dirs:
        sites.append(build(BrowseSettings(sae=d, out=out, tokens=tokens, whole_cache=whole_cache,
                                          include_bos=include_bos, include_outliers=include_outliers,
                                          device=device or models.default_device(), pipeline=name)))
        click.echo(str(sites[-1]))
    if len(sites) > 1:  # last line: one page linking them all
        click.echo(str(write_overview(sites, pipelines.DATA_DIR / "browse" / name, name)))



def latest_saes(pipeline: str, command: str) -> list[str]:
    """The SAEs of the latest `make train` of the pipeline; before any (or when they are gone), every SAE of
    the pipeline. Says which on stderr."""
    from batchtopk.core import latest

    from .run import discover

    ptr = latest.read(pipeline, "train")
    if ptr is not None:
        gone = [d for d in ptr["saes"] if not os.path.isdir(d)]
        if not gone:
            latest.note(f"{command}: the {len(ptr['saes'])} SAE(s) of the latest `make train` of pipeline {pipeline} "
                        f"({ptr['at']}): {ptr['run']}")
            return list(ptr["saes"])
        latest.note(f"{command}: the latest `make train` of pipeline {pipeline} wrote {ptr['run']}, which is gone")
    dirs = discover(pipeline)
    latest.note(f"{command}: every SAE of pipeline {pipeline} ({len(dirs)})")
    return dirs
