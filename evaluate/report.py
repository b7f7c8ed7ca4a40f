"""The comparison report: markdown with PNG plots in the style of the BatchTopK paper's figures.

Replicates of one configuration (seeds: different initial weights, same batches) are shown as
mean ± std; BatchTopK and TopK of the same shape and seed start from identical weights, so their
difference is reported pair by pair.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from batchtopk.core.errors import PipelineError  # noqa: E402
from batchtopk.core.pipelines import DATA_DIR  # noqa: E402
from batchtopk.train.archs import ARCHS  # noqa: E402
from batchtopk.train.sae import load_config, recipe_label  # noqa: E402

from .run import METRICS_FILE  # noqa: E402

COLORS = {"batchtopk": "tab:blue", "topk": "tab:orange", "quantile": "tab:purple", "matryoshka": "tab:cyan",
          "jumprelu": "tab:green", "relu": "tab:red", "gated": "tab:brown"}
TABLE_KEYS = ("nmse", "explained_variance", "cosine_sim", "l0", "dead_fraction", "ce_clean", "ce_spliced",
              "ce_degradation", "ce_loss_recovered", "kl_div", "ce_zero_ablated", "ce_mean_ablated")


def load_metrics(dirs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        p = Path(d) / METRICS_FILE
        if p.exists():
            r = json.loads(p.read_text()) | {"dir": str(d), "name": Path(d).name}
            r.setdefault("config", r["name"])  # metrics written before replicates existed
            r.setdefault("replicate", 0)
            if "recipe" not in r:  # metrics written before they carried the recipe: from the SAE's cfg.json
                r["recipe"] = load_config(d)[0].changed()
            if "include_bos" not in r:  # ... and before one spelling for BOS and outliers
                r["include_bos"] = not r.get("exclude_bos", True)
                r["outlier_norm_above"] = r.get("exclude_outliers_norm_above")
            r["dead_in_training"] = dead_in_training(Path(d), r["d_sae"])
            r |= absorption_of(Path(d))
            rows.append(r)
    if not rows:
        raise PipelineError("no evaluated SAEs (metrics.json) found; run `make eval` first")
    return rows


def absorption_of(d: Path) -> dict[str, Any]:
    """The SAE's absorption.json (`python -m evaluate absorption`) in brief, when it has one."""
    from .absorption import ABSORPTION_FILE

    p = d / ABSORPTION_FILE
    if not p.exists():
        return {}
    a = json.loads(p.read_text())
    return {"absorption_fraction": a["mean_absorption_fraction"], "full_absorption": a["mean_full_absorption"],
            "absorption": {"letters": a["letters"], "trusted": a["trusted"],
                           "probe_accuracy": a["probe"]["probe_accuracy"], "words": a["probe"]["words"],
                           "mean_main_latents": a["mean_main_latents"]}}


def absorption_table(gs: list[Group]) -> list[str]:
    """Absorption by configuration, with the probe's own accuracy and whether it can be trusted."""
    gs = [g for g in gs if all(r.get("absorption") for r in g.rows)]
    if not gs:
        return []
    lines = ["| configuration | arch | k | dict | seeds | absorption fraction | full absorption | main latents per "
             "letter | letters scored | probe accuracy | trusted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in gs:
        a = g.first["absorption"]
        main = statistics.fmean(r["absorption"]["mean_main_latents"] or 0 for r in g.rows)
        lines.append(f"| {g.config} | {g.arch} | {g.first.get('k') or '–'} | {g.first['d_sae']} | {len(g.rows)} | "
                     f"{g.fmt('absorption_fraction', digits=3)} | {g.fmt('full_absorption', digits=3)} | {main:.2f} | "
                     f"{min(r['absorption']['letters'] for r in g.rows)} | {a['probe_accuracy']:.3f} | "
                     f"{'yes' if all(r['absorption']['trusted'] for r in g.rows) else 'no'} |")
    return lines


def dead_in_training(d: Path, d_sae: int) -> dict[str, float] | None:
    """The fraction of latents dead (by the training window) halfway through training and at its last logged
    step, from the SAE's train_log.jsonl (None without one)."""
    from batchtopk.train.rundir import read_log

    log = [r for r in read_log(d) or () if "dead" in r]
    if not log:
        return None
    half = min(log, key=lambda e: abs(e["step"] - log[-1]["step"] / 2))
    return {"half": half["dead"] / d_sae, "half_step": half["step"], "end": log[-1]["dead"] / d_sae,
            "end_step": log[-1]["step"]}


def value(row: dict, metric: str, mode: str | None = None) -> float:
    """A metric of one SAE (in a mode of BatchTopK's when given); NaN where it was not measured."""
    src = row["modes"][mode] if mode and mode in row.get("modes", {}) else row
    v = src.get(metric)
    return float("nan") if v is None else float(v)


@dataclass
class Group:
    """Replicates of one configuration."""

    config: str
    rows: list[dict]

    @property
    def first(self) -> dict:
        return self.rows[0]

    @property
    def arch(self) -> str:
        return self.first["architecture"]

    @property
    def recipe(self) -> str:
        """The config's settings beyond architecture, k and size, as metrics.json records them ('' for the
        defaults)."""
        return recipe_label(self.first["recipe"])

    def values(self, metric: str, mode: str | None = None) -> list[float]:
        return [value(r, metric, mode) for r in self.rows]

    def mean(self, metric: str, mode: str | None = None) -> float:
        return statistics.fmean(self.values(metric, mode))

    def std(self, metric: str, mode: str | None = None) -> float:
        v = self.values(metric, mode)
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def fmt(self, metric: str, mode: str | None = None, digits: int = 4) -> str:
        m = f"{self.mean(metric, mode):.{digits}g}"
        return f"{m} ± {self.std(metric, mode):.2g}" if len(self.rows) > 1 else m


def _heldout_ratio(g: Group) -> str:
    """Mean L0 / k over the held-out rows ± the standard error over chunks (averaged over replicates)."""
    hs = [r.get("heldout_l0") for r in g.rows]
    if not all(hs):
        return "–"
    k = g.first["k"]
    return (f"{statistics.fmean(h['mean'] for h in hs) / k:.3f} ± "
            f"{statistics.fmean(h['standard_error'] for h in hs) / k:.3f} ({hs[0]['rows']:,} rows)")


def _estimator_table(bt: list[Group]) -> list[str]:
    """Held-out L0 / k at each θ estimate a BatchTopK SAE recorded (the one in use marked *)."""
    gs = [g for g in bt if all((r.get("heldout_l0") or {}).get("at_estimates") for r in g.rows)]
    if not gs:
        return []
    names = list(gs[0].first["heldout_l0"]["at_estimates"])
    lines = ["", "### θ estimators: L0 θ / k on the held-out rows at each estimate", "",
             "Every estimate is in each SAE's `cfg.json` (`theta_estimates`); * marks the one in use.", "",
             "| configuration | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for g in gs:
        at = [statistics.fmean(r["heldout_l0"]["at_estimates"].get(n, math.nan) for r in g.rows) for n in names]
        cells = [f"{v / g.first['k']:.3f}"
                 + (" *" if n == g.first.get("theta_estimator") else "") for n, v in zip(names, at)]
        lines.append(f"| {g.config} | " + " | ".join(cells) + " |")
    return lines


def groups_of(rows: list[dict]) -> list[Group]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["config"]].append(r)
    order = {a: i for i, a in enumerate(ARCHS)}
    gs = [Group(c, sorted(rs, key=lambda r: r["replicate"])) for c, rs in by.items()]
    return sorted(gs, key=lambda g: (order[g.arch], g.first["d_sae"], g.first.get("k") or 0,
                                     g.first.get("target_l0") or g.first.get("l0_coeff") or 0, g.config))


def _held_text(src: dict) -> str:
    """The evaluated held-out sequences in words: a range, every n-th of a range, or a count."""
    if "heldout_sequence_ids" in src:
        return f"({len(src['heldout_sequence_ids'])} listed in metrics.json)"
    a, b = src["heldout_sequences"]
    step = src.get("heldout_every") or 1
    return f"{a}–{b}" if step == 1 else f"{a}–{b}, every {_ordinal(step)}"


def _ordinal(n: int) -> str:
    """2nd, 3rd, 4th, 11th, 21st, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _main_recipe(gs: list[Group]) -> str:
    """The recipe most (Batch)TopK configurations share: plots compare those with each other."""
    c = Counter(g.recipe for g in gs if g.arch in ("batchtopk", "topk"))
    return c.most_common(1)[0][0] if c else ""


def _fixed(gs: list[Group], key: str, prefer: int | None = None) -> int | None:
    vals = [g.first[key] for g in gs if g.arch in ("batchtopk", "topk") and g.first.get(key) is not None]
    if not vals:
        return None
    return prefer if prefer in vals else Counter(vals).most_common(1)[0][0]


def _errorbar(ax, pts: list[tuple[float, float, float]], **kw) -> None:
    pts = sorted(pts)
    if pts:
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, capsize=3, **kw)


def _sweep_plot(gs: list[Group], x_key: str, fixed_key: str, fixed_val, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], "nmse", "normalised MSE"), (axes[1], "ce_degradation", "CE degradation (nats)"))
    for ax, metric, label in panels:
        for arch in ("batchtopk", "topk"):
            pts = [(g.first[x_key], g.mean(metric), g.std(metric)) for g in gs
                   if g.arch == arch and g.first.get(fixed_key) == fixed_val]
            _errorbar(ax, pts, fmt="o-", color=COLORS[arch], label=arch)
        if x_key == "k":  # JumpReLU has no k: plot it at the L0 it reached
            pts = [(g.mean("l0"), g.mean(metric), g.std(metric)) for g in gs
                   if g.arch == "jumprelu" and g.first["d_sae"] == fixed_val]
            _errorbar(ax, pts, fmt="s--", color=COLORS["jumprelu"], label="jumprelu (at its L0)")
        ax.set_xlabel("k (JumpReLU: measured L0)" if x_key == "k" else "dictionary size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _l0_plot(gs: list[Group], k, m, path: Path) -> None:
    """Distribution of active latents per token: variable for BatchTopK, exactly k for TopK."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x_max = 2 * (k or 1)
    for arch in ("batchtopk", "topk"):
        g = next((g for g in gs if g.arch == arch and g.first.get("k") == k and g.first["d_sae"] == m), None)
        if g is None:
            continue
        r = g.first
        hist = {int(a): b / r["n_tokens"] for a, b in r["l0_histogram"].items()}
        xs = sorted(hist)
        if len(xs) == 1:
            ax.axvline(xs[0], color=COLORS[arch], lw=2, label=f"{arch}: every token uses {xs[0]}")
            continue
        cdf = 0.0
        for x in xs:  # clip the long tail at the 99.5th percentile
            cdf += hist[x]
            if cdf >= 0.995:
                x_max = max(x_max, x)
                break
        ax.bar(xs, [hist[x] for x in xs], width=1.0, color=COLORS[arch], alpha=0.7,
               label=f"{arch}: mean {r['l0']:.1f}, median {r['l0_quantiles']['50']}, max {xs[-1]}")
    ax.set_xlim(0, x_max * 1.05)
    ax.set_xlabel("active latents per token")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"Active latents per token, k={k}, dictionary {m}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _modes_plot(gs: list[Group], path: Path) -> None:
    bt = [g for g in gs if g.arch == "batchtopk"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("nmse", "ce_degradation")):
        xs = range(len(bt))
        for dx, mode, label in ((-0.2, "batch", "batch top-(n·k)"), (0.2, "threshold", "global threshold θ")):
            ax.bar([x + dx for x in xs], [g.mean(metric, mode) for g in bt], 0.4,
                   yerr=[g.std(metric, mode) for g in bt], capsize=2, label=label)
        ax.set_xticks(list(xs), [f"k{g.first['k']}/m{g.first['d_sae']}" for g in bt], rotation=30, fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle("BatchTopK at inference: batch mode against threshold mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frontier_plot(gs: list[Group], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("nmse", "ce_degradation")):
        for arch, color in COLORS.items():
            mine = [g for g in gs if g.arch == arch]
            if mine:
                ax.errorbar([g.mean("l0") for g in mine], [g.mean(metric) for g in mine],
                            xerr=[g.std("l0") for g in mine], yerr=[g.std(metric) for g in mine],
                            fmt="o", capsize=3, color=color, label=arch)
        ax.set_xlabel("L0 (measured)")
        ax.set_ylabel(metric)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Sparsity against fidelity (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_differences(gs: list[Group]) -> list[dict[str, Any]]:
    """BatchTopK minus TopK, seed by seed, for every (size, k, recipe) both were trained with."""
    topk = {(g.first["d_sae"], g.first["k"], g.recipe): g for g in gs if g.arch == "topk"}
    out = []
    for g in gs:
        t = topk.get((g.first["d_sae"], g.first["k"], g.recipe)) if g.arch == "batchtopk" else None
        if t is None:
            continue
        by_rep = {r["replicate"]: r for r in t.rows}
        pairs = [(r, by_rep[r["replicate"]]) for r in g.rows if r["replicate"] in by_rep]
        if not pairs:
            continue
        row: dict[str, Any] = {"d_sae": g.first["d_sae"], "k": g.first["k"], "recipe": g.recipe, "n": len(pairs)}
        for key, mode in (("nmse", "threshold"), ("nmse", "batch"), ("ce_degradation", "threshold"),
                          ("ce_degradation", "batch"), ("standardized_mse", "batch")):
            ok = [(b, tk) for b, tk in pairs if key in b.get("modes", {}).get(mode, {}) and key in tk]
            diffs = [value(b, key, mode) - value(tk, key) for b, tk in ok]
            rel = [value(b, key, mode) / value(tk, key) - 1 for b, tk in ok]
            if diffs:
                row[f"{key}_{mode}"] = (statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                                        statistics.fmean(rel))
        out.append(row)
    return out


def variant_table(gs: list[Group]) -> list[str]:
    """Markdown lines: each configuration that changes one thing from a default one of the same size and k
    (a recipe setting such as span or aux_batch, or the quantile and Matryoshka architectures against BatchTopK),
    paired seed by seed with it: NMSE and CE degradation in the inference mode, L0, dead latents. Empty when none
    does."""
    base = {(g.arch, g.first["d_sae"], g.first.get("k")): g for g in gs if not g.recipe}
    lines = []
    for g in gs:
        against = "batchtopk" if g.arch in ("quantile", "matryoshka") else g.arch  # BatchTopK's variants
        ref = base.get((against, g.first["d_sae"], g.first.get("k")))
        if ref is None or ref is g or g.arch not in ("batchtopk", "topk", "quantile", "matryoshka"):
            continue
        by_rep = {r["replicate"]: r for r in ref.rows}
        pairs = [(r, by_rep[r["replicate"]]) for r in g.rows if r["replicate"] in by_rep]
        if not pairs:
            continue
        cells = []
        for key in ("nmse", "ce_degradation"):
            rel = [value(a, key, "threshold") / value(b, key, "threshold") - 1 for a, b in pairs]
            spread = f" ± {statistics.stdev(rel):.1%}" if len(rel) > 1 else ""
            cells += [f"{statistics.fmean(value(a, key, 'threshold') for a, _ in pairs):.4f}",
                      f"{statistics.fmean(rel):+.1%}{spread}"]
        dead = [(value(a, "dead_fraction", "threshold"), value(b, "dead_fraction", "threshold")) for a, b in pairs]
        training = [(a.get("dead_in_training"), b.get("dead_in_training")) for a, b in pairs]
        mid = ("–" if not all(x and y for x, y in training) else
               f"{statistics.fmean(x['half'] for x, _ in training):.1%} / "
               f"{statistics.fmean(y['half'] for _, y in training):.1%}")
        final = f"{statistics.fmean(d for d, _ in dead):.1%} / {statistics.fmean(d for _, d in dead):.1%}"
        change = g.recipe or g.arch
        lines.append(f"| {change} | {ref.config} | {g.first['d_sae']} | {g.first.get('k')} | {len(pairs)} | "
                     + " | ".join(cells)
                     + f" | {statistics.fmean(value(a, 'l0', 'threshold') for a, _ in pairs):.2f} | "
                     f"{mid} | {final} |")
    if not lines:
        return []
    return ["| change | against | dict | k | pairs | NMSE | Δ NMSE (paired) | CE degradation | Δ CE degradation | L0 | "
            "dead halfway through training (it / against) | dead on the evaluation tokens (it / against) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *lines]


SWAP_COLUMNS = (("topk", None, None), ("topk", "batchtopk", "batch"), ("topk", "batchtopk", "threshold"),
                ("batchtopk", None, None), ("batchtopk", "topk", "topk"))


def swapped_table(gs: list[Group]) -> list[str]:
    """Markdown lines: each (size, k, recipe) whose BatchTopK and TopK SAEs were also scored with the other's
    activation (`--encode-as`), NMSE / CE degradation, each swapped score's paired change from the SAE's own
    NMSE (mean ± std over seeds). Empty when none was."""
    by = {(g.first["d_sae"], g.first["k"], g.recipe, g.arch): g for g in gs
          if g.arch in ("batchtopk", "topk") and all(r.get("encoded_as") for r in g.rows)}
    keys = sorted({key[:3] for key in by if key[:3] + ("topk",) in by and key[:3] + ("batchtopk",) in by})
    if not keys:
        return []
    lines = ["| dict | k | seeds | TopK | TopK as BatchTopK, batch | TopK as BatchTopK, θ (its L0) | BatchTopK, θ | "
             "BatchTopK as TopK |", "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        cells = []
        for arch, as_arch, mode in SWAP_COLUMNS:
            g = by[key + (arch,)]
            own = [value(r, "nmse", "threshold") for r in g.rows]
            if as_arch is None:
                ce = statistics.fmean(value(r, "ce_degradation", "threshold") for r in g.rows)
                cells.append(f"{statistics.fmean(own):.4f} / {ce:.3f}")
                continue
            got = [r["encoded_as"][as_arch]["modes"][mode] for r in g.rows]
            rel = [m["nmse"] / o - 1 for m, o in zip(got, own)]
            spread = f" ± {statistics.stdev(rel):.1%}" if len(rel) > 1 else ""
            l0 = f", L0 {statistics.fmean(m['l0'] for m in got):.1f}" if mode == "threshold" else ""
            cells.append(f"{statistics.fmean(m['nmse'] for m in got):.4f} ({statistics.fmean(rel):+.1%}{spread}{l0})"
                         f" / {statistics.fmean(m['ce_degradation'] for m in got):.3f}")
        n = len(by[key + ("topk",)].rows)
        lines.append(f"| {key[0]} | {key[1]} | {n} | " + " | ".join(cells) + " |")
    return lines


def _pm(t: tuple[float, float, float] | None, n: int) -> str:
    if t is None:
        return "–"
    mean, sd, rel = t
    return f"{mean:+.4f} ± {sd:.4f} ({rel:+.1%})" if n > 1 else f"{mean:+.4f} ({rel:+.1%})"


def write_report(pipeline: str, dirs: list[str], out: str | None = None) -> Path:
    rows = load_metrics(dirs)
    gs = groups_of(rows)
    out_dir = Path(out) if out else DATA_DIR / "reports" / pipeline
    out_dir.mkdir(parents=True, exist_ok=True)
    main = [g for g in gs if g.arch not in ("batchtopk", "topk") or g.recipe == _main_recipe(gs)]
    k_fixed = _fixed(main, "k", prefer=32)
    ks_per_m = Counter(g.first["d_sae"] for g in main if g.arch in ("batchtopk", "topk"))
    m_fixed = ks_per_m.most_common(1)[0][0] if ks_per_m else _fixed(main, "d_sae")
    _sweep_plot(main, "k", "d_sae", m_fixed, out_dir / "fig1_vs_k.png", f"Against k, dictionary size {m_fixed}")
    _sweep_plot(main, "d_sae", "k", k_fixed, out_dir / "fig2_vs_dict.png", f"Against dictionary size, k={k_fixed}")
    _l0_plot(main, k_fixed, m_fixed, out_dir / "fig3_l0_distribution.png")
    _modes_plot(gs, out_dir / "fig4_threshold_vs_batch.png")
    _frontier_plot(gs, out_dir / "fig5_frontier.png")
    first = rows[0]
    src = first["eval_source"]
    where = (f"held-out sequences {_held_text(src)} of cache `{first.get('cache_id') or src.get('cache_id')}`"
             if "heldout_sequences" in src or "heldout_sequence_ids" in src
             else f"corpus `{Path(str(src.get('dataset'))).name}`")
    seeds = sorted({len(g.rows) for g in gs})
    lines = [
        f"# SAE comparison: pipeline `{pipeline}`", "",
        f"- Model: `{first['model']}`, site `{first['site']}`",
        f"- Evaluation: {first['eval_tokens']:,} tokens ({where}), "
        f"BOS positions {'included' if first['include_bos'] else 'excluded'}, massive-activation positions "
        + (f"(norm > {first['outlier_norm_above']:.0f}) excluded: {first.get('excluded_outlier_positions', 0)}"
           if first.get("outlier_norm_above") else "included"),
        "- Training tokens: "
        + ", ".join(sorted({f"{r['training_tokens']:,}" for r in rows if r.get("training_tokens")})),
        f"- Seeds per configuration: {', '.join(map(str, seeds))} (replicates start from different weights and see "
        "the same batches; ± is the standard deviation over them). BatchTopK and TopK of the same size and seed start "
        "from identical weights.",
        "- BatchTopK rows use threshold mode (JumpReLU with the global θ), the inference mode; "
        "batch mode is in figure 4 and the tables below.",
        "- NMSE = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²; standardised MSE = the paper's normalised MSE (each token standardised "
        "with its own mean and std; BatchTopK in batch mode); CE degradation = CE(spliced) − CE(clean), nats per "
        "token.",
        "", "![against k](fig1_vs_k.png)", "", "![against dictionary size](fig2_vs_dict.png)", "",
        "![active latents per token](fig3_l0_distribution.png)", "",
        "![threshold vs batch](fig4_threshold_vs_batch.png)", "", "![frontier](fig5_frontier.png)", "",
        "## Every configuration", "",
        "| configuration | arch | k | dict | seeds | NMSE | standardised MSE | L0 | dead fraction | CE degradation "
        "| KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in gs:
        paper_mode = "batch" if g.arch == "batchtopk" else None
        lines.append(f"| {g.config} | {g.arch} | {g.first.get('k') or '–'} | {g.first['d_sae']} | {len(g.rows)} | "
                     f"{g.fmt('nmse')} | {g.fmt('standardized_mse', paper_mode)} | {g.fmt('l0', digits=3)} | "
                     f"{g.fmt('dead_fraction', digits=2)} | {g.fmt('ce_degradation')} | {g.fmt('kl_div')} |")
    pairs = paired_differences(gs)
    if pairs:
        lines += ["", "## BatchTopK − TopK, pair by pair", "",
                  "Same size, k, recipe and seed (so the same initial weights and batches); mean ± std of the "
                  "differences over seeds, and the mean relative difference. Negative: BatchTopK is better.", "",
                  "| dict | k | recipe | pairs | Δ NMSE (θ mode) | Δ NMSE (batch mode) | Δ standardised MSE (batch) | "
                  "Δ CE degradation (θ mode) | Δ CE degradation (batch mode) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['d_sae']} | {p['k']} | {p['recipe'] or 'defaults'} | {p['n']} | "
                         + " | ".join(_pm(p.get(c), p["n"]) for c in ("nmse_threshold", "nmse_batch",
                                                                      "standardized_mse_batch",
                                                                      "ce_degradation_threshold",
                                                                      "ce_degradation_batch")) + " |")
    bt = [g for g in gs if g.arch == "batchtopk"]
    if bt:
        lines += ["", "## BatchTopK: batch mode against threshold mode", "",
                  "L0 θ / k is measured twice: on the evaluation tokens, and (from training) on the held-out rows, "
                  "with the standard error over held-out chunks: how much L0 moves with the text alone.", "",
                  "| configuration | θ estimator | NMSE batch | NMSE θ | CE deg. batch | CE deg. θ | L0 θ | L0 θ / k | "
                  "L0 θ / k, held-out rows |", "|---|---|---|---|---|---|---|---|---|"]
        for g in bt:
            ratio = statistics.fmean(v / g.first["k"] for v in g.values("l0", "threshold"))
            lines.append(f"| {g.config} | {g.first.get('theta_estimator') or 'running'} | {g.fmt('nmse', 'batch')} | "
                         f"{g.fmt('nmse', 'threshold')} | {g.fmt('ce_degradation', 'batch')} | "
                         f"{g.fmt('ce_degradation', 'threshold')} | {g.fmt('l0', 'threshold', 3)} | {ratio:.3f} | "
                         f"{_heldout_ratio(g)} |")
        lines += _estimator_table(bt + [g for g in gs if g.arch == "quantile"])
    variants = variant_table(gs)
    if variants:
        lines += ["", "## Changes from the defaults, pair by pair", "",
                  "Each configuration that changes one setting (or BatchTopK's architecture: the quantile "
                  "threshold, Matryoshka) against the default one of the same size and k, same seed (same initial "
                  "weights and batches); inference mode; ± is the std of the paired relative change over seeds.",
                  "", *variants]
    swapped = swapped_table(gs)
    if swapped:
        lines += ["", "## Swapped activations", "",
                  "Each SAE scored with the other architecture's activation at the same k (`--encode-as`): TopK SAEs "
                  "with BatchTopK's batch top-(n·k) and with a θ estimated for them as BatchTopK's is (on the "
                  "calibration sequences), BatchTopK SAEs with k per token. NMSE (its change from the SAE's own, "
                  "paired over seeds) / CE degradation.", "", *swapped]
    absorbed = absorption_table(gs)
    if absorbed:
        lines += ["", "## Feature absorption (first letters)", "",
                  "SAEBench's first-letter method (`python -m evaluate absorption`): the share of a word's "
                  "first-letter feature carried by latents other than the letter's main ones, and how often one latent "
                  "carries it all; letters whose probe reaches F1 0.6 on held-out words are scored, and the "
                  "measurement is trusted only with 20 of them. Lower is better.", "", *absorbed]
    lines += ["", "## Every SAE", "",
              "| SAE | arch | k | dict | seed | " + " | ".join(TABLE_KEYS) + " |",
              "|" + "---|" * (5 + len(TABLE_KEYS))]
    for g in gs:
        for r in g.rows:
            vals = " | ".join(f"{r[k]:.4g}" for k in TABLE_KEYS)
            lines.append(f"| {r['name']} | {r['architecture']} | {r.get('k') or '–'} | {r['d_sae']} | "
                         f"{r['replicate']} | {vals} |")
    (out_dir / SUMMARY_FILE).write_text(json.dumps([summary_row(r) for r in rows], indent=1))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


SUMMARY_FILE = "summary.json"
# what summary.json keeps of each SAE's metrics.json: enough to rebuild the report's tables (docs' results
# are rendered from it), not its histograms
SUMMARY_KEYS = ("name", "config", "architecture", "k", "d_sae", "replicate", "recipe", "l0_coeff", "target_l0",
                "l1_coeff", "theta_estimator", "heldout_l0", "training_tokens", "eval_tokens", "eval_source", "model",
                "site", "pipeline", "cache_id", "include_bos", "outlier_norm_above", "mode", "lr", *TABLE_KEYS,
                "standardized_mse", "n_tokens", "dead_in_training", "absorption_fraction", "full_absorption",
                "absorption")


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    """One SAE's metrics without histograms (its modes likewise)."""
    keep = {k: r[k] for k in SUMMARY_KEYS if k in r}
    keep["modes"] = {m: {k: v[k] for k in (*TABLE_KEYS, "standardized_mse") if k in v}
                     for m, v in r.get("modes", {}).items()}
    if r.get("encoded_as"):
        keep["encoded_as"] = {a: {k: v for k, v in e.items() if k != "modes"}
                              | {"modes": {m: {k: v[k] for k in (*TABLE_KEYS, "standardized_mse") if k in v}
                                           for m, v in e["modes"].items()}} for a, e in r["encoded_as"].items()}
    if keep.get("heldout_l0"):
        keep["heldout_l0"] = {k: v for k, v in keep["heldout_l0"].items() if k != "per_chunk"}
    return keep
