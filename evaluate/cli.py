"""`python -m evaluate`: write metrics.json for SAEs; `python -m evaluate report`: the comparison report."""
from __future__ import annotations

import click

from harvest import pipelines
from harvest.errors import one_line_errors


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", help="Named settings from pipelines.yaml (default: its `default`).")
@click.option("--sae", "sae_dirs", multiple=True, help="SAE directory (repeatable). Default: every SAE of the pipeline.")
@click.option("--tokens", type=int, help="Held-out tokens to evaluate on.")
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
    from .run import EvalSettings, discover, evaluate

    name, pipe = pipelines.get(pipeline)
    ev = pipe["eval"]
    s = EvalSettings(saes=list(sae_dirs) or discover(name), tokens=tokens or int(ev.get("tokens", 4096)),
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
