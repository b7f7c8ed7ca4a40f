"""The docs tool's command: render every table, or check that each is up to date."""
from __future__ import annotations

import click

from batchtopk.core.errors import one_line_errors

from . import render


@click.command()
@click.option("--check", is_flag=True, help="Only check that every table is up to date (exit 1 if not).")
@one_line_errors
def main(check: bool) -> None:
    """Render the tables of README.md and docs/*.md from the JSON kept under docs/ (and the declared options)."""
    changed = render.render_all(write=not check)
    for f in changed:
        click.echo(f"{'out of date' if check else 'updated'}: {f}")
    if check and changed:
        raise SystemExit(1)
