"""`make bench`: harvest, training, scaling and latent-browser figures, each against a baseline from the same run.
`python -m bench peers`: our SAEs against peer implementations on the same batches (data/bench/peers.json).
`python -m bench ablation`: our trainer with each peer recipe difference (data/bench/ablation.json).
`python -m bench theta SAE_DIR...`: BatchTopK threshold mode against when the training tokens were seen."""
from __future__ import annotations

import click

from batchtopk.core.errors import one_line_errors

from . import records


@click.group(invoke_without_command=True)
@click.option("--part", "parts", multiple=True, type=click.Choice(["harvest", "train", "scaling", "browse", "ops"]),
              help="Run only these parts (default: all).")
@click.option("--harvest-tokens", default=8192, show_default=True)
@click.option("--steps", default=5, show_default=True, help="Training steps timed per implementation.")
@click.option("--d-in", default=576, show_default=True, help="Train part: activation width (GPT-2 small: 768).")
@click.option("--d-sae", default=4608, show_default=True, help="Train part: latents (GPT-2 setting: 12288).")
@click.option("--k", default=32, show_default=True, help="Train part: k.")
@click.option("--batch", default=4096, show_default=True, help="Train part: tokens per batch.")
@click.option("--dead-fraction", default=0.25, show_default=True,
              help="Train part: share of latents marked dead, so the auxiliary loss runs.")
@click.option("--device", help="Train part: cuda or cpu (default: CUDA when present).")
@click.option("--out", "out_name", help="Write <part>-<OUT>.json instead of <part>.json (keeps other runs' files).")
@click.pass_context
def main(ctx, parts, harvest_tokens, steps, d_in, d_sae, k, batch, dead_fraction, device, out_name) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from . import browse_bench, harvest_bench, ops, scaling_bench, train_bench

    todo = parts or ("harvest", "train", "ops", "scaling", "browse")
    for part in todo:
        recs = {"harvest": lambda: harvest_bench.run(tokens=harvest_tokens),
                "train": lambda: train_bench.run(d_in, d_sae, k, batch, steps, device, dead_fraction),
                "ops": lambda: ops.run(steps, d_in, d_sae, k, batch),
                "scaling": scaling_bench.run, "browse": browse_bench.run}[part]()
        path = records.write(f"{part}-{out_name}" if out_name else part, recs)
        click.echo(f"\n== {part} ({path})\n{records.table(recs)}")


def _floats(value: str | None, what: str) -> tuple[float, ...]:
    """A comma-separated list of positive numbers (None: the empty tuple, the command's default)."""
    try:
        out = tuple(float(x) for x in (value or "").split(",") if x.strip())
    except ValueError:
        out = (0.0,)
    if not all(v > 0 for v in out):
        raise click.BadParameter(f"{value!r}: allowed: positive numbers separated by commas", param_hint=what)
    return out


@main.command()
@click.option("--pipeline", default="smollm2-135m-paper", show_default=True, help="Whose cache and budget.")
@click.option("--arch", "archs", default="batchtopk,topk", show_default=True, help="Architectures (jumprelu too).")
@click.option("--dict", "dict_mult", default=8, show_default=True, help="Dictionary size as a multiple of d_model.")
@click.option("--k", default=32, show_default=True, help="k (JumpReLU: its target L0).")
@click.option("--tokens", type=int, help="Training tokens (default 560,000: 547 steps of 1024).")
@click.option("--batch-size", type=int, help="Batch size (default: the pipeline's).")
@click.option("--seeds", default=1, show_default=True, help="Seeds per implementation (initial weights).")
@click.option("--peers", default="dictionary_learning,saelens", show_default=True)
@click.option("--heldout", type=click.Choice(["tail", "interleaved"]),
              help="Held-out layout (default: the pipeline's; cache/split.py Split).")
@click.option("--peer-lr", "peer_lrs", default="default,ours", show_default=True,
              help="Each peer's learning rate: its own default, ours, or both (a recipe told apart from its lr).")
@click.option("--gated-l1", callback=lambda _c, _p, v: _floats(v, "--gated-l1"),
              help="Gated: the L1 coefficients each implementation trains at, comma-separated, read at L0 = k between "
                   "two (default: 0.003,0.01,0.03,0.1).")
@click.option("--out", "out_name", help="Write peers-<OUT>.json instead of peers.json (keeps other runs' files).")
@one_line_errors
def peers(pipeline, archs, dict_mult, k, tokens, batch_size, seeds, peers, heldout, peer_lrs, gated_l1,
          out_name) -> None:
    """Train our SAEs and the peers' on exactly the same batches; NMSE on the same held-out rows."""
    from . import peers as p

    recs = p.run(pipeline, tuple(a for a in archs.split(",") if a), dict_mult, k, tokens, batch_size, seeds,
                 tuple(x for x in peers.split(",") if x), heldout, tuple(x for x in peer_lrs.split(",") if x),
                 gated_l1)
    path = records.write(f"peers-{out_name}" if out_name else "peers", recs)
    click.echo(f"\n== peers ({path})\n{records.table(recs)}")
    click.echo(str(path))


@main.command()
@click.option("--pipeline", default="smollm2-135m-paper", show_default=True, help="Whose cache and budget.")
@click.option("--arch", "archs", default="batchtopk,topk", show_default=True)
@click.option("--dict", "dict_mult", default=8, show_default=True, help="Dictionary size as a multiple of d_model.")
@click.option("--k", default=32, show_default=True)
@click.option("--seeds", default=1, show_default=True, help="Seeds per variant (initial weights).")
@click.option("--variant", "variants", multiple=True, help="Only these variants (default: all; see bench/ablation.py).")
@click.option("--tokens", type=int, help="Training tokens (default 560,000: 547 steps of 1024).")
@click.option("--out", "out_name", help="Write ablation-<OUT>.json instead of ablation.json (keeps earlier rounds).")
@click.option("--heldout", type=click.Choice(["tail", "interleaved"]),
              help="Held-out layout (default: the pipeline's; cache/split.py Split).")
@one_line_errors
def ablation(pipeline, archs, dict_mult, k, seeds, variants, tokens, out_name, heldout) -> None:
    """Our trainer with each peer recipe difference switched on, one pass over the same batches."""
    from . import ablation as a

    recs = a.run(pipeline, tuple(x for x in archs.split(",") if x), dict_mult, k, seeds, variants or None,
                 tokens=tokens, heldout=heldout)
    path = records.write(f"ablation-{out_name}" if out_name else "ablation", recs)
    click.echo(f"\n== ablation ({path})\n{records.table(recs)}")
    click.echo(str(path))


@main.command()
@click.argument("sae_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--every", default=1, show_default=True, help="Encode only every n-th batch of the run (long runs).")
@click.option("--out", "out_name", help="Write theta-<OUT>.json instead of theta.json.")
@one_line_errors
def theta(sae_dirs, every, out_name) -> None:
    """Threshold-mode L0 of saved BatchTopK SAEs by tenth of their run, and on held-out rows at θ from
    the middle of the run."""
    from . import theta_recency

    recs = [r for d in sae_dirs for r in theta_recency.measure(d, every)]
    path = records.write(f"theta-{out_name}" if out_name else "theta", recs)
    click.echo(f"\n== theta ({path})\n{records.table(recs)}")
    for r in recs:
        click.echo(f"{r.name}: L0/k by tenth of the run {r.settings['train_l0_over_k_by_tenth_of_run']}")
    click.echo(str(path))



@main.command("gpu-check")
@click.option("--device", help="cuda (default when present) or cpu.")
@click.option("--small", is_flag=True, help="Toy sizes (what the test suite runs on the CPU).")
@click.option("--part", "parts", multiple=True, type=click.Choice(["archs", "sweep", "figures"]),
              help="Run only these parts (default: all).")
@click.option("--out", "out_name", help="Write gpu-check-<OUT>.json instead of gpu-check.json.")
@one_line_errors
def gpu_check(device, small, parts, out_name) -> None:
    """Train every architecture on the GPU's default path (compiled, CUDA graphs, bf16) against float32 eager on
    the same batches, a sweep of 12 stacks, and the throughput figures; exit 1 on a crash, NaN or divergence."""
    from . import gpu_check as g

    recs, failures = g.run(device, small, parts or ("archs", "sweep", "figures"))
    path = records.write(f"gpu-check-{out_name}" if out_name else "gpu-check", recs)
    click.echo(f"\n== gpu-check ({path})\n{records.table(recs)}")
    for f in failures:
        click.echo(f"FAILED {f}", err=True)
    click.echo(str(path))
    if failures:
        raise SystemExit(1)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def docs(ctx: click.Context) -> None:
    """The docs tool's old spelling: `python -m docgen` (`make docs`) renders the tables of README.md and docs/*.md."""
    from batchtopk.docgen.cli import main as docgen

    docgen.main(ctx.args, prog_name="python -m bench docs")
