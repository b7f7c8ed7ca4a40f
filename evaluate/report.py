"""The comparison report: markdown with PNG plots in the style of the BatchTopK paper's figures."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harvest.errors import PipelineError  # noqa: E402
from harvest.pipelines import DATA_DIR  # noqa: E402

from .run import METRICS_FILE  # noqa: E402

COLORS = {"batchtopk": "tab:blue", "topk": "tab:orange", "jumprelu": "tab:green", "relu": "tab:red"}
TABLE_KEYS = ("nmse", "explained_variance", "cosine_sim", "l0", "dead_fraction", "ce_clean", "ce_spliced",
              "ce_degradation", "ce_loss_recovered", "kl_div", "ce_zero_ablated", "ce_mean_ablated")


def load_metrics(dirs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        p = Path(d) / METRICS_FILE
        if p.exists():
            rows.append(json.loads(p.read_text()) | {"dir": str(d), "name": Path(d).name})
    if not rows:
        raise PipelineError("no evaluated SAEs (metrics.json) found; run `make eval` first")
    return rows


def _fixed(rows: list[dict], key: str, prefer: int | None = None) -> int | None:
    vals = [r[key] for r in rows if r["architecture"] in ("batchtopk", "topk") and r.get(key) is not None]
    if not vals:
        return None
    if prefer in vals:
        return prefer
    return Counter(vals).most_common(1)[0][0]


def _sweep_plot(rows, x_key, fixed_key, fixed_val, path: Path, title: str, logx: bool) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "nmse", "normalised MSE"), (axes[1], "ce_degradation", "CE degradation (nats)")):
        for arch in ("batchtopk", "topk"):
            pts = sorted((r[x_key], r[metric]) for r in rows
                         if r["architecture"] == arch and r.get(fixed_key) == fixed_val)
            if pts:
                ax.plot(*zip(*pts), "o-", color=COLORS[arch], label=arch)
        if x_key == "k":  # JumpReLU has no k: plot it at the L0 it reached
            jr = sorted((r["l0"], r[metric]) for r in rows if r["architecture"] == "jumprelu" and r["d_sae"] == fixed_val)
            if jr:
                ax.plot(*zip(*jr), "s--", color=COLORS["jumprelu"], label="jumprelu (at its L0)")
        ax.set_xlabel("k (JumpReLU: measured L0)" if x_key == "k" else "dictionary size")
        ax.set_ylabel(label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _l0_plot(rows, k, m, path: Path) -> None:
    """Distribution of active latents per token: variable for BatchTopK, exactly k for TopK."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x_max = 2 * (k or 1)
    for arch in ("batchtopk", "topk"):
        r = next((r for r in rows if r["architecture"] == arch and r.get("k") == k and r["d_sae"] == m), None)
        if r is None:
            continue
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


def _modes_plot(rows, path: Path) -> None:
    bt = [r for r in rows if r["architecture"] == "batchtopk"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("nmse", "ce_degradation")):
        names = [f"k{r['k']}/m{r['d_sae']}" for r in bt]
        xs = range(len(bt))
        ax.bar([x - 0.2 for x in xs], [r["modes"]["batch"][metric] for r in bt], 0.4, label="batch top-(n·k)")
        ax.bar([x + 0.2 for x in xs], [r["modes"]["threshold"][metric] for r in bt], 0.4, label="global threshold θ")
        ax.set_xticks(list(xs), names, rotation=30, fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle("BatchTopK at inference: batch mode against threshold mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frontier_plot(rows, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("nmse", "ce_degradation")):
        for arch, color in COLORS.items():
            pts = [(r["l0"], r[metric]) for r in rows if r["architecture"] == arch]
            if pts:
                ax.scatter(*zip(*pts), color=color, label=arch)
        ax.set_xlabel("L0 (measured)")
        ax.set_ylabel(metric)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Sparsity against fidelity, every SAE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(pipeline: str, dirs: list[str], out: str | None = None) -> Path:
    rows = load_metrics(dirs)
    out_dir = Path(out) if out else DATA_DIR / "reports" / pipeline
    out_dir.mkdir(parents=True, exist_ok=True)
    m_fixed = _fixed(rows, "d_sae")
    k_fixed = _fixed(rows, "k", prefer=32)
    # Figure 1 at the dictionary size with the most k values; figure 2 at k=32 where present.
    ks_per_m = Counter(r["d_sae"] for r in rows if r["architecture"] in ("batchtopk", "topk"))
    if ks_per_m:
        m_fixed = ks_per_m.most_common(1)[0][0]
    _sweep_plot(rows, "k", "d_sae", m_fixed, out_dir / "fig1_vs_k.png", f"Against k, dictionary size {m_fixed}", True)
    _sweep_plot(rows, "d_sae", "k", k_fixed, out_dir / "fig2_vs_dict.png", f"Against dictionary size, k={k_fixed}", True)
    _l0_plot(rows, k_fixed, m_fixed, out_dir / "fig3_l0_distribution.png")
    _modes_plot(rows, out_dir / "fig4_threshold_vs_batch.png")
    _frontier_plot(rows, out_dir / "fig5_frontier.png")
    first = rows[0]
    lines = [
        f"# SAE comparison: pipeline `{pipeline}`", "",
        f"- Model: `{first['model']}`, site `{first['site']}`",
        f"- Evaluation: {first['eval_tokens']:,} tokens ({json.dumps(first['eval_source'])}), "
        f"BOS positions {'excluded' if first['exclude_bos'] else 'included'}, massive-activation positions "
        + (f"(norm > {first['exclude_outliers_norm_above']:.0f}) excluded: {first.get('excluded_outlier_positions', 0)}"
           if first.get("exclude_outliers_norm_above") else "included"),
        "- Training tokens: " + ", ".join(sorted({f"{r['training_tokens']:,}" for r in rows if r.get("training_tokens")})),
        "- BatchTopK rows use threshold mode (JumpReLU with the global θ), the inference mode; "
        "batch mode is in figure 4 and the second table.",
        "- NMSE = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²; CE degradation = CE(spliced) − CE(clean), nats per token.", "",
        "![against k](fig1_vs_k.png)", "", "![against dictionary size](fig2_vs_dict.png)", "",
        "![active latents per token](fig3_l0_distribution.png)", "",
        "![threshold vs batch](fig4_threshold_vs_batch.png)", "", "![frontier](fig5_frontier.png)", "",
        "## Every SAE", "",
        "| SAE | arch | k | dict | " + " | ".join(TABLE_KEYS) + " |",
        "|" + "---|" * (4 + len(TABLE_KEYS)),
    ]
    for r in sorted(rows, key=lambda r: (r["architecture"], r["d_sae"], r.get("k") or 0, r.get("l0_coeff") or 0)):
        vals = " | ".join(f"{r[k]:.4g}" for k in TABLE_KEYS)
        lines.append(f"| {r['name']} | {r['architecture']} | {r.get('k') or '–'} | {r['d_sae']} | {vals} |")
    bt = [r for r in rows if r["architecture"] == "batchtopk"]
    if bt:
        lines += ["", "## BatchTopK: batch mode against threshold mode", "",
                  "| SAE | NMSE batch | NMSE θ | CE deg. batch | CE deg. θ | L0 batch | L0 θ |", "|---|---|---|---|---|---|---|"]
        for r in bt:
            b, t = r["modes"]["batch"], r["modes"]["threshold"]
            lines.append(f"| {r['name']} | {b['nmse']:.4g} | {t['nmse']:.4g} | {b['ce_degradation']:.4g} | "
                         f"{t['ce_degradation']:.4g} | {b['l0']:.1f} | {t['l0']:.1f} |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
