"""`make docs` (`python -m docgen`; the old spelling `python -m bench docs` works too): the tables of README.md
and docs/*.md, rendered from the JSON kept under docs/ (what `make bench`, `make peers`, `bench ablation` and
`make paper` wrote) and from the options as the code declares them. A figure then exists in one place, its
JSON file.

A table lives between two markers in a markdown file; everything between them is rewritten:

    <!-- table: KIND [ARGUMENT] -->
    ...
    <!-- /table -->

Kinds: headline (README), peers FILE [FILE ...] (a later file's rows replace an earlier one's), paper FILE,
pairs FILE, jumprelu FILE, estimators FILE, change FILE FILE, ablation FILE, records FILE, options COMMAND,
swapped FILE, variants FILE, absorption FILE. FILE is relative to the repository root.
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchtopk.core.errors import PipelineError
from batchtopk.core.options import declared, option_name

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/usage.md", "docs/results.md")
PEERS = "docs/bench/peers.json"
PEERS_OURS_LR = "docs/bench/peers-ours-lr.json"  # the peers at our lr, when run apart (--peer-lr ours --out ours-lr)
PAPER = "docs/paper/summary.json"
MARKER = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(path: str | Path, root: Path = ROOT) -> list[dict[str, Any]]:
    p = Path(path) if Path(path).is_absolute() else root / path
    if not p.exists():
        raise PipelineError(f"{p} does not exist; it is written by the command its table names (see docs/results.md)")
    return json.loads(p.read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def pct(x: float) -> str:
    return f"{x:+.1%}"


def mean_sd(xs: list[float], digits: int = 4) -> str:
    if len(xs) > 1:
        return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"
    return f"{xs[0]:.{digits}f}"


# ---------------------------------------------------------------- peers
def _peer_rows(recs: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(implementation, arch) -> mode -> record."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in recs:
        s = r["settings"]
        out.setdefault((s["implementation"], s["arch"]), {})[s["mode"]] = r
    return out


def _impls(recs: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in recs:
        if r["settings"]["implementation"] not in seen:
            seen.append(r["settings"]["implementation"])
    return seen


def _lr(rows: dict[str, dict]) -> str:
    lr = next(iter(rows.values()))["settings"].get("lr")
    return f"{lr:.2g}" if lr is not None else "–"


def _budget(recs: list[dict]) -> str:
    s = recs[0]["settings"]
    return (f"{s['pipeline']} cache, {s['site']}, {s['d_sae']} latents, k = {s['k']}, {s['steps']} steps of "
            f"{s['batch_size']} ({s['training_tokens']:,} tokens), {_seeds(s['seeds'])}, NMSE on the same "
            f"{s['heldout_rows']:,} held-out rows")


def _seeds(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds (mean)"


def equal_lr(recs: list[dict], tie: float = 0.01) -> str:
    """A sentence on the peers run at our learning rate: how far each lands from ours on the same batches
    (NMSE); where every one is within `tie`, it says the lead at default learning rates is the lr's."""
    by = _peer_rows(recs)
    parts, gaps = [], []
    for impl in (i for i in _impls(recs) if " at our lr" in i):
        diffs = []
        for arch, mode, label in (("batchtopk", "batch", "BatchTopK"), ("topk", "topk", "TopK")):
            peer, ours = by.get((impl, arch), {}).get(mode), by.get(("ours", arch), {}).get(mode)
            if peer and ours:
                gaps.append(peer["value"] / ours["value"] - 1)
                diffs.append(f"{label} {peer['value']:.4f} against our {ours['value']:.4f} ({pct(gaps[-1])})")
        if diffs:
            parts.append(f"{impl.split(' at our lr')[0]}'s " + ", ".join(diffs))
    if not parts:
        return ""
    return ("At our learning rate: " + "; ".join(parts) + "."
            + (f" Within {tie:.0%}, the recipes tie: the lead at default learning rates is the learning rate's, "
               "not the trainer's." if all(abs(g) <= tie for g in gaps) else "") + "\n")


def _para(text: str) -> str:
    return f"\n{text}" if text else ""


def load_peers(spec: str, root: Path = ROOT) -> tuple[list[dict], str]:
    """The records of one or more peers files (`FILE [FILE ...]`), each later file's (implementation,
    architecture) rows replacing an earlier one's (a run that re-measured some of them), and the files as
    the table names them. All must hold one budget."""
    paths = spec.split()
    recs: list[dict] = []
    order: dict[str, int] = {}  # implementations in the order they first appear, in whichever file
    for p in paths:
        new = load(p, root)
        if recs and _budget(new) != _budget(recs):
            raise PipelineError(f"{p} measures another budget than {paths[0]} ({_budget(new)}, not "
                                f"{_budget(recs)}): one peers table holds one budget")
        again = {(r["settings"]["implementation"], r["settings"]["arch"]) for r in new}
        recs = [r for r in recs if (r["settings"]["implementation"], r["settings"]["arch"]) not in again] + new
        for r in new:
            order.setdefault(r["settings"]["implementation"], len(order))
    return sorted(recs, key=lambda r: order[r["settings"]["implementation"]]), ", ".join(f"`{p}`" for p in paths)


def render_peers(spec: str, root: Path = ROOT) -> str:
    recs, path = load_peers(spec, root)
    by = _peer_rows(recs)
    if not any(arch in ("batchtopk", "topk") for _, arch in by):  # a file of the newer architectures only
        return _newer_archs(recs) + f"\n{_budget(recs)}; {path}.\n"
    rows = []
    for impl in _impls(recs):
        bt, tk = by.get((impl, "batchtopk"), {}), by.get((impl, "topk"), {})
        batch, theta, top = bt.get("batch"), bt.get("threshold"), tk.get("topk")
        cell = lambda r: f"{r['value']:.4f}" if r else "–"  # noqa: E731
        dead = lambda r: f"{r['settings']['dead_fraction']:.1%}" if r else "–"  # noqa: E731
        rows.append([impl, _lr(bt or tk), cell(batch),
                     f"{theta['value']:.4f} ({theta['settings']['l0']:.1f})" if theta else "–", cell(top),
                     " / ".join(f"{r['settings']['standardized_mse']:.4f}" if r else "–" for r in (batch, top)),
                     f"{dead(batch)} / {dead(top)}"])
    return (table(["implementation", "lr", "BatchTopK NMSE, batch mode", "threshold mode (its L0)", "TopK NMSE",
                   "standardised MSE (BatchTopK / TopK)", "latents silent on the held-out rows (BatchTopK / TopK)"],
                  rows) + f"\n{_budget(recs)}; {path}"
            + ("" if any(" at our lr" in i for i in _impls(recs)) else " (no peer run at our learning rate in it)")
            + ".\n" + _para(equal_lr(recs)) + _para(_newer_archs(recs)))


def _silent(r: dict) -> str:
    """A run's latents silent on the held-out rows, and (where measured) those that never fired in training."""
    s = r["settings"]
    never = s.get("dead_in_training_fraction")
    return f"{s['dead_fraction']:.1%}" + (f" ({never:.2%})" if never is not None else "")


def _newer_archs(recs: list[dict]) -> str:
    """The Matryoshka and Gated rows of a peers file, as a second table ('' when it has none)."""
    by = _peer_rows(recs)
    impls = [i for i in _impls(recs) if (i, "matryoshka") in by or (i, "gated") in by]
    if not impls:
        return ""
    rows = []
    for impl in impls:
        mat, gated = by.get((impl, "matryoshka"), {}), by.get((impl, "gated"), {}).get("gated")
        batch, theta = mat.get("batch"), mat.get("threshold")
        brackets = (gated or {}).get("settings", {}).get("coeff_brackets") or []
        lr_of = mat or ({"gated": gated} if gated else {})
        measured = gated and gated["value"] == gated["value"]
        rows.append([impl, _lr(lr_of) if lr_of else "–",
                     f"{batch['value']:.4f}" if batch else "–",
                     f"{theta['value']:.4f} ({theta['settings']['l0']:.1f})" if theta else "–",
                     _silent(batch) if batch else "–",
                     f"{gated['value']:.4f}" if measured else "–",
                     _silent(gated) if measured else "–",
                     ", ".join("–" if b is None else f"{b[0]:g}–{b[1]:g}" for b in brackets) or "–"])
    return (table(["implementation", "lr", "Matryoshka NMSE, batch mode", "threshold mode (its L0)",
                   "Matryoshka latents silent (never fired in training)", "Gated NMSE at L0 = k",
                   "Gated latents silent (never fired in training)", "Gated L1 coefficients bracketing k"], rows)
            + "\nMatryoshka with our default groups in every implementation; Gated trained at each L1 coefficient "
            "and read at L0 = k between the two that bracket it (– where none do; its latent counts are the "
            "nearer run's). Silent: on the held-out rows; never fired: on any training batch." + _against_best_peer(by)
            + "\n")


def _against_best_peer(by: dict[tuple[str, str], dict[str, dict]]) -> str:
    """' Matryoshka: ours ... against the best peer's ... (who, gap); silent latents ...' for each newer arch
    that ours and a peer both measured."""
    out = []
    for arch, mode, label in (("matryoshka", "batch", "Matryoshka"), ("gated", "gated", "Gated")):
        measured = {impl: modes[mode] for (impl, a), modes in by.items()  # NaN: never reached L0 = k
                    if a == arch and mode in modes and modes[mode]["value"] == modes[mode]["value"]}
        ours = measured.pop("ours", None)
        if not ours or not measured:
            continue
        impl, best = min(measured.items(), key=lambda kv: kv[1]["value"])
        never = [r["settings"].get("dead_in_training_fraction") for r in (ours, best)]
        out.append(f" {label}: ours {ours['value']:.4f} against the best peer's {best['value']:.4f} ({impl}, "
                   f"{pct(ours['value'] / best['value'] - 1)}); latents silent "
                   f"{ours['settings']['dead_fraction']:.1%} against {best['settings']['dead_fraction']:.1%}"
                   + (f", never fired in training {never[0]:.2%} against {never[1]:.2%}" if None not in never else "")
                   + ".")
    return "".join(out)


# ---------------------------------------------------------------- make paper (report summary.json)
def _groups(path: str, root: Path):
    from batchtopk.evaluate.report import groups_of

    rows = load(path, root)
    for r in rows:
        r.setdefault("recipe", {})
    return rows, groups_of(rows)


def _main(gs) -> list:
    return [g for g in gs if g.arch in ("batchtopk", "topk") and not g.recipe]


def render_paper(path: str, root: Path = ROOT) -> str:
    rows, gs = _groups(path, root)
    topk = {(g.first["d_sae"], g.first["k"]): g for g in _main(gs) if g.arch == "topk"}
    out = []
    for g in (g for g in _main(gs) if g.arch == "batchtopk"):
        t = topk.get((g.first["d_sae"], g.first["k"]))
        theta = lambda m: [r["modes"]["threshold"][m] for r in g.rows]  # noqa: E731
        batch = lambda m: [r["modes"]["batch"][m] for r in g.rows]  # noqa: E731
        tk = (lambda m: [r[m] for r in t.rows]) if t else None
        out.append([f"{g.first['d_sae']}", f"{g.first['k']}", f"{len(g.rows)}",
                    f"{mean_sd(theta('nmse'))} ({statistics.fmean(theta('l0')):.1f})", mean_sd(batch("nmse")),
                    mean_sd(tk("nmse")) if tk else "–", mean_sd(theta("ce_degradation"), 3),
                    mean_sd(tk("ce_degradation"), 3) if tk else "–",
                    f"{statistics.fmean(theta('dead_fraction')):.1%} / "
                    + (f"{statistics.fmean(tk('dead_fraction')):.1%}" if tk else "–")])
    first = rows[0]
    note = (f"\n{first['model']}, `{first['site']}`, {first['training_tokens']:,} training tokens; "
            f"evaluated on {first['eval_tokens']:,} held-out tokens; `{path}`.\n")
    return table(["dictionary", "k", "seeds", "NMSE BatchTopK θ (its L0)", "NMSE BatchTopK batch", "NMSE TopK",
                  "CE degradation BatchTopK θ", "CE degradation TopK", "dead (BatchTopK / TopK)"], out) + note


def render_pairs(path: str, root: Path = ROOT) -> str:
    from batchtopk.evaluate.report import paired_differences

    _, gs = _groups(path, root)
    out = []
    for p in paired_differences(_main(gs)):
        cell = lambda key: (f"{p[key][0]:+.4f}" + (f" ± {p[key][1]:.4f}" if p["n"] > 1 else "")  # noqa: E731
                            + f" ({pct(p[key][2])})") if key in p else "–"
        out.append([f"{p['d_sae']}", f"{p['k']}", f"{p['n']}", cell("nmse_threshold"), cell("nmse_batch"),
                    cell("standardized_mse_batch"), cell("ce_degradation_threshold")])
    return table(["dictionary", "k", "pairs", "Δ NMSE (θ mode)", "Δ NMSE (batch mode)", "Δ standardised MSE (batch)",
                  "Δ CE degradation (θ mode)"], out) + (
        "\nBatchTopK − TopK from identical initial weights and batches, mean ± std over seeds (relative "
        "difference in brackets); negative: BatchTopK is better.\n")


def _report_table(path: str, root: Path, lines_of: Callable[[list], list[str]], missing: str, note: str) -> str:
    """One of the report's tables (evaluate/report.py) rendered from a summary.json, with its caption."""
    rows, gs = _groups(path, root)
    lines = lines_of(gs)
    if not lines:
        raise PipelineError(f"{path} has no {missing}")
    first = rows[0]
    return ("\n".join(lines) + f"\n\n{first['model']} `{first['site']}`, {first['training_tokens']:,} training tokens, "
            f"{first['eval_tokens']:,} held-out evaluation tokens; {note}; `{path}`.\n")


def render_swapped(path: str, root: Path = ROOT) -> str:
    from batchtopk.evaluate.report import swapped_table

    return _report_table(path, root, swapped_table,
                         "SAE scored with another architecture's activation (evaluate --encode-as)",
                         "NMSE (change from the SAE's own activation, paired over seeds) / CE degradation")


def render_variants(path: str, root: Path = ROOT) -> str:
    from batchtopk.evaluate.report import variant_table

    return _report_table(path, root, variant_table, "configuration that changes a setting from a default one",
                         "inference mode (θ); Δ: mean ± std over seeds of the paired relative change")


def render_absorption(path: str, root: Path = ROOT) -> str:
    from batchtopk.evaluate.report import absorption_table

    return _report_table(path, root, absorption_table, "SAE with a measured absorption (evaluate absorption)",
                         "first-letter absorption (SAEBench's method), mean ± std over seeds; the probe's own "
                         "held-out accuracy, and whether 20 letters reach F1 0.6")


def render_jumprelu(path: str, root: Path = ROOT) -> str:
    _, gs = _groups(path, root)
    bt = {g.first["k"]: g for g in _main(gs) if g.arch == "batchtopk" and g.first["d_sae"] == _jr_size(gs)}
    tk = {g.first["k"]: g for g in _main(gs) if g.arch == "topk" and g.first["d_sae"] == _jr_size(gs)}
    out = []
    for g in (g for g in gs if g.arch == "jumprelu"):
        t = round(g.first.get("target_l0") or 0)
        rel = lambda other: pct(g.mean("nmse") / other.mean("nmse") - 1) if other else "–"  # noqa: E731
        out.append([f"{g.first['d_sae']}", f"{t}", f"{g.mean('l0'):.2f}", f"{g.mean('nmse'):.4f}",
                    f"{g.mean('ce_degradation'):.3f}", rel(bt.get(t)), rel(tk.get(t)),
                    f"{g.mean('dead_fraction'):.0%}"])
    return table(["dictionary", "target L0", "L0", "NMSE", "CE degradation", "NMSE vs BatchTopK (θ) at k = target",
                  "vs TopK", "dead"], out)


def _jr_size(gs) -> int | None:
    return next((g.first["d_sae"] for g in gs if g.arch == "jumprelu"), None)


def render_estimators(path: str, root: Path = ROOT) -> str:
    _, gs = _groups(path, root)
    bt = [g for g in _main(gs) if g.arch == "batchtopk" and all(r.get("heldout_l0") for r in g.rows)]
    if not bt:
        return "(no BatchTopK SAE with a held-out L0 in this summary)\n"
    names = list(bt[0].first["heldout_l0"].get("at_estimates", {}))
    out = []
    for g in bt:
        k = g.first["k"]
        cells = [f"{statistics.fmean(r['heldout_l0']['at_estimates'][n] for r in g.rows) / k:.3f}"
                 + (" *" if n == g.first.get("theta_estimator") else "") for n in names]
        out.append([f"{g.first['d_sae']}", f"{k}", *cells,
                    f"± {statistics.fmean(r['heldout_l0']['standard_error'] for r in g.rows) / k:.3f}"])
    rows_seen = bt[0].first["heldout_l0"]["rows"]
    return table(["dictionary", "k", *names, "standard error over chunks"], out) + (
        f"\nL0 / k on the {rows_seen:,} held-out rows at each θ estimate (mean over seeds; * the one in use).\n")


def render_change(args: str, root: Path = ROOT) -> str:
    """Two make paper summaries of the same SAEs (the same batches and seeds), configuration by
    configuration: NMSE and CE degradation before and after, and the change against the seed spread."""
    before_path, after_path = args.split()
    _, before = _groups(before_path, root)
    _, after = _groups(after_path, root)
    old = {g.config: g for g in before}
    out = []
    for g in after:
        b = old.get(g.config)
        if b is None:
            continue
        diffs = [ra["nmse"] / rb["nmse"] - 1 for ra, rb in zip(g.rows, b.rows)]
        spread = f" ± {statistics.stdev(diffs):.1%}" if len(diffs) > 1 else ""
        out.append([g.config.split("_threshold")[0], f"{len(g.rows)}", f"{b.mean('nmse'):.4f}", f"{g.mean('nmse'):.4f}",
                    f"{statistics.fmean(diffs):+.1%}{spread}", f"{b.std('nmse'):.4f}" if len(g.rows) > 1 else "–",
                    f"{b.mean('ce_degradation'):.3f}", f"{g.mean('ce_degradation'):.3f}",
                    f"{b.mean('dead_fraction'):.1%} / {g.mean('dead_fraction'):.1%}"])
    return table(["configuration", "seeds", "NMSE before", "NMSE after", "change (paired)", "seed spread before (sd)",
                  "CE degradation before", "after", "dead before / after"], out) + (
        f"\n`{before_path}` against `{after_path}`.\n")


# ---------------------------------------------------------------- bench records
def render_ablation(path: str, root: Path = ROOT) -> str:
    recs = load(path, root)
    out = [[r["name"], f"{r['value']:.4f}", r["baseline"], pct(r["ratio"] - 1)] for r in recs]
    return table(["variant", "NMSE", "against", "difference"], out) + f"\n`{path}`.\n"


def render_records(path: str, root: Path = ROOT) -> str:
    recs = load(path, root)
    fmt = lambda v, u: (f"{v:,.0f} {u}" if abs(v) >= 100 else f"{v:.4g} {u}")  # noqa: E731
    ratio = lambda x: f"{x:.3g}" if x == x else "–"  # noqa: E731  (no baseline value: no ratio)
    out = [[r["name"], fmt(r["value"], r["unit"]), r["baseline"], ratio(r["ratio"])] for r in recs]
    return table(["benchmark", "value", "baseline (same run)", "ratio"], out) + (
        f"\n{recs[0]['device']}; `{path}`.\n" if recs else "")


# ---------------------------------------------------------------- README headline
def render_headline(_: str = "", root: Path = ROOT) -> str:
    recs = load(PEERS, root)
    by = _peer_rows(recs)
    peer_rows = []
    for impl in _impls(recs):
        bt, tk = by.get((impl, "batchtopk"), {}), by.get((impl, "topk"), {})
        peer_rows.append([impl, _lr(bt or tk), f"{bt['batch']['value']:.4f}" if "batch" in bt else "–",
                          f"{tk['topk']['value']:.4f}" if "topk" in tk else "–"])
    at_ours = any(" at our lr" in i for i in _impls(recs))
    apart = load(PEERS_OURS_LR, root) if not at_ours and (root / PEERS_OURS_LR).exists() else []
    intro = ("runs at its own default learning rate and at ours, so a recipe is told apart from its lr:" if at_ours
             else "runs at its own default learning rate in the table; the sentence under it is a run of each at "
             f"ours on the same batches (`{PEERS_OURS_LR}`), so a recipe is told apart from its lr:" if apart
             else "runs at its own default learning rate (this file has no run at ours: the rows compare recipes "
             "and learning rates together):")
    out = ("**Against peers, on exactly the same batches** (`make peers`; lower NMSE is better). Each peer "
           + intro + "\n\n" + table(["implementation", "lr", "BatchTopK NMSE (batch mode)", "TopK NMSE"], peer_rows)
           + f"\n{_budget(recs)}.\n" + _para(equal_lr(recs) or equal_lr(apart)) + "\n")
    rows, gs = _groups(PAPER, root)
    topk = {(g.first["d_sae"], g.first["k"]): g for g in _main(gs) if g.arch == "topk"}
    from batchtopk.evaluate.report import paired_differences

    pairs = {(p["d_sae"], p["k"]): p for p in paired_differences(_main(gs))}
    paper_rows = []
    for g in (g for g in _main(gs) if g.arch == "batchtopk"):
        t, p = topk.get((g.first["d_sae"], g.first["k"])), pairs.get((g.first["d_sae"], g.first["k"]))
        if t is None or p is None:
            continue
        d = p["nmse_threshold"]
        paper_rows.append([f"{g.first['d_sae']}", f"{g.first['k']}", f"{len(g.rows)}",
                           f"{g.mean('nmse', 'threshold'):.4f}", f"{t.mean('nmse'):.4f}",
                           f"{pct(d[2])}" + (f" (± {d[1] / t.mean('nmse'):.1%})" if p["n"] > 1 else ""),
                           f"{g.mean('ce_degradation', 'threshold'):.3f}", f"{t.mean('ce_degradation'):.3f}"])
    first = rows[0]
    lr = first.get("lr")
    out += ("**BatchTopK against TopK** (`make paper`: the paper's comparison at small scale; BatchTopK in its "
            "inference mode, JumpReLU with the global θ):\n\n"
            + table(["dictionary", "k", "seeds", "NMSE BatchTopK", "NMSE TopK", "BatchTopK − TopK (paired, ± sd)",
                     "CE degradation BatchTopK", "CE degradation TopK"], paper_rows)
            + f"\n{first['model']} `{first['site']}`, {first['training_tokens']:,} training tokens (one epoch), "
            f"{first['eval_tokens']:,} held-out evaluation tokens, both architectures at the same recipe"
            + (f" (lr {lr:g})" if lr else "") + "; details in docs/results.md.\n")
    return out


# ---------------------------------------------------------------- options (docs/usage.md)
def render_options(command: str, root: Path = ROOT) -> str:
    from batchtopk.evaluate.settings import BrowseSettings, EvalSettings
    from batchtopk.harvest.settings import HarvestSettings
    from batchtopk.train.sae import SAEConfig
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.sweep import Grid

    classes = {"harvest": [HarvestSettings], "train": [SAEConfig, Grid, TrainSettings],
               "evaluate": [EvalSettings], "browse": [BrowseSettings]}
    if command not in classes:
        raise PipelineError(f"no options table for {command!r}; allowed: {', '.join(classes)}")
    from batchtopk.harvest.cli import YAML_NAMES

    yaml_key = {field: key for key, field in YAML_NAMES.items()} if command == "harvest" else {}
    yaml_key |= {"sites": None} if command == "harvest" else {}  # the file's `sites` are kinds
    out = []
    for cls in classes[command]:
        for f in declared(cls):
            name = option_name(f)
            key = yaml_key.get(f.name, f.name)
            default = _default(f)
            if not f.metadata["help"]:  # set by the command itself (the cache, the sweep, the run directory)
                continue
            if name:
                where = f"`--{name}`"
            else:
                where = f"`--set {f.name}=`" if cls is SAEConfig else "pipelines.yaml only"
            ident = {"always": "yes", "if_set": "when set"}.get(f.metadata["identity"] or "",
                                                                 "yes" if cls in (SAEConfig, Grid) else "")
            out.append([f"`{key}`" if key else "(command line only)", where, f.metadata["group"], default,
                        f.metadata["help"]]
                       + ([ident] if command == "train" else []))
    return table(["setting (pipelines.yaml key)", "command line", "group", "default", "what it does"]
                 + (["run identity"] if command == "train" else []), out)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "required"
    from batchtopk.core.pipelines import DATA_DIR

    if isinstance(v, str) and v.startswith(str(DATA_DIR)):  # the data folder, as a fresh checkout spells it
        v = "data" + v[len(str(DATA_DIR)):]
    return "–" if v is None else f"`{v}`"


RENDERERS: dict[str, Callable[..., str]] = {
    "headline": render_headline, "peers": render_peers, "paper": render_paper, "pairs": render_pairs,
    "jumprelu": render_jumprelu, "estimators": render_estimators, "ablation": render_ablation,
    "records": render_records, "options": render_options, "change": render_change, "swapped": render_swapped,
    "variants": render_variants, "absorption": render_absorption}


def rendered(text: str, where: str = "", root: Path = ROOT) -> str:
    """A markdown text with every table between markers rendered anew."""
    def sub(m: re.Match) -> str:
        kind, _, arg = m.group("spec").strip().partition(" ")
        if kind not in RENDERERS:
            raise PipelineError(f"{where}: unknown table kind {kind!r}; allowed: {', '.join(RENDERERS)}")
        return m.group(1) + RENDERERS[kind](arg.strip(), root=root) + m.group(4)
    return MARKER.sub(sub, text)


def render_all(root: Path = ROOT, files: tuple[str, ...] = DOCS, write: bool = True) -> list[str]:
    """Render every table of the docs (writing the files when `write`); the files whose tables changed."""
    changed = []
    for f in files:
        path = root / f
        if not path.exists():
            continue
        text = path.read_text()
        new = rendered(text, f, root)
        if new != text:
            changed.append(f)
            if write:
                path.write_text(new)
    return changed
