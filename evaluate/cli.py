"""`python -m evaluate`: write metrics.json for SAEs; `python -m evaluate report`: the comparison report."""
from __future__ import annotations

import os

import click

from batchtopk.core import pipelines
from batchtopk.core.errors import PipelineError, one_line_errors
from batchtopk.core.options import Command, Group, build, check_keys, options, settable

from .settings import AbsorptionSettings, BrowseSettings, EvalSettings

PIPELINE = click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
SAES = click.option("--sae", "sae_dirs", multiple=True,
                    help="SAE directory (repeatable). Default: the SAEs of the latest `make train` of the pipeline.")


@click.group(cls=Group, invoke_without_command=True)
@PIPELINE
@SAES
@options(EvalSettings)
@click.pass_context
@one_line_errors
def main(ctx: click.Context, pipeline: str | None, sae_dirs: tuple[str, ...], **given) -> None:
    """Splice each SAE's reconstruction into the model and measure NMSE, L0, CE and KL.

    Writes metrics.json beside each SAE and prints their paths.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .run import evaluate

    name, pipe = pipelines.get(pipeline)
    check_keys(pipe["eval"], settable(EvalSettings, ("saes", "exact_tokens")),
               f"pipelines.yaml, pipeline {name}, section eval")
    s = build(EvalSettings, given, pipe["eval"], saes=list(sae_dirs) or latest_saes(name, "evaluate"),
              exact_tokens=given["tokens"] is not None)
    for path in evaluate(s):
        click.echo(str(path))


@main.command()
@PIPELINE
@click.option("--out", help="Report directory (default data/reports/<pipeline>).")
@one_line_errors
def report(pipeline: str | None, out: str | None) -> None:
    """Gather every evaluated SAE of the pipeline into report.md with plots; prints its path."""
    from .report import write_report
    from .run import discover

    name, _ = pipelines.get(pipeline)
    click.echo(str(write_report(name, discover(name), out)))


@main.command(cls=Command)
@PIPELINE
@SAES
@options(BrowseSettings)
@one_line_errors
def browse(pipeline: str | None, sae_dirs: tuple[str, ...], **given) -> None:
    """Write a static latent browser per SAE (opens from disk); prints each site's index.html."""
    from batchtopk.harvest import models

    from .browse import build as build_site
    from .browse import write_overview

    name, _ = pipelines.get(pipeline)
    dirs = list(sae_dirs) or latest_saes(name, "browse")
    if given["out"] and len(dirs) > 1:
        raise PipelineError(f"--out names one site but {len(dirs)} SAEs were given; drop --out or give one --sae")
    if given["tokens"] is not None and given["tokens"] < 1:
        raise PipelineError(f"--tokens must be positive, not {given['tokens']}")
    sites = []
    for d in dirs:
        s = build(BrowseSettings, given, sae=d, device=given["device"] or models.default_device(), pipeline=name)
        sites.append(build_site(s))
        click.echo(str(sites[-1]))
    if len(sites) > 1:  # last line: one page linking them all
        click.echo(str(write_overview(sites, pipelines.DATA_DIR / "browse" / name, name)))


@main.command(cls=Command)
@PIPELINE
@SAES
@options(AbsorptionSettings)
@one_line_errors
def absorption(pipeline: str | None, sae_dirs: tuple[str, ...], **given) -> None:
    """Feature absorption by SAEBench's first-letter method (offline: the model and the SAE only).

    Writes absorption.json beside each SAE (the absorption rates, the probe's own accuracy and whether it can be
    trusted on this model and layer) and prints their paths.
    """
    from .absorption import measure

    name, _ = pipelines.get(pipeline)
    s = build(AbsorptionSettings, given)
    for path in measure(list(sae_dirs) or latest_saes(name, "absorption"), s.words, s.device):
        click.echo(str(path))


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
