"""`make bench`: harvest, training and scaling figures, each against a baseline from the same run."""
from __future__ import annotations

import click

from . import records


@click.command()
@click.option("--part", "parts", multiple=True, type=click.Choice(["harvest", "train", "scaling"]),
              help="Run only these parts (default: all).")
@click.option("--harvest-tokens", default=8192, show_default=True)
@click.option("--steps", default=5, show_default=True, help="Training steps timed per implementation.")
def main(parts, harvest_tokens, steps) -> None:
    from . import harvest_bench, scaling_bench, train_bench

    todo = parts or ("harvest", "train", "scaling")
    for part in todo:
        recs = {"harvest": lambda: harvest_bench.run(tokens=harvest_tokens),
                "train": lambda: train_bench.run(steps=steps),
                "scaling": scaling_bench.run}[part]()
        path = records.write(part, recs)
        click.echo(f"\n== {part} ({path})\n{records.table(recs)}")


main(prog_name="python -m bench")
