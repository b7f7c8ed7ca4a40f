"""Latent browser speed: a whole site built from the cache, against encoding the same tokens alone.

The SAEs timed are the paper pipeline's 8×d k=32 BatchTopK (4608 latents, over the whole cache:
~300k tokens) and the demo's SAEs (over their held-out part), whichever exist (`make paper`,
`make demo`). The baseline is the SAE's encoder alone on batches already in memory, measured in
the same run: the ratio says how close the whole build (reads, statistics, contexts, logit
effects, files) comes to the cost of just encoding every token once.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchtopk.cache.format import Cache
from batchtopk.core.pipelines import DATA_DIR
from batchtopk.train.sae import load_sae

from .records import Record, device_name

SAMPLE_TOKENS = 65536


def _saes() -> list[tuple[Path, bool]]:
    """(SAE dir, whole cache?) for the paper's 8×d BatchTopK and the demo's SAEs that exist."""
    found: list[tuple[Path, bool]] = []
    paper = sorted((DATA_DIR / "saes" / "smollm2-135m-paper").glob("*/batchtopk_k32_m4608"))
    found += [(paper[-1], True)] if paper else []
    found += [(d.parent, False) for d in sorted((DATA_DIR / "saes" / "smollm2-135m").glob("*/*/cfg.json"))]
    return found


def _encode_rate(sae_dir: Path) -> float:
    """Tokens/s of the SAE's inference encoding alone on rows already in memory."""
    sae, meta = load_sae(sae_dir)
    c = Cache.open(meta["metadata"]["cache"])
    x = torch.from_numpy(c.activations(meta["metadata"]["hook_name"])[:SAMPLE_TOKENS]).float()
    with torch.inference_mode():
        sae.reconstruct(x[:4096], "threshold")
        t = time.perf_counter()
        for i in range(0, len(x), 4096):
            sae.reconstruct(x[i:i + 4096], "threshold")
        return len(x) / (time.perf_counter() - t)


def run() -> list[Record]:
    from batchtopk.evaluate.browse import build
    from batchtopk.evaluate.settings import BrowseSettings

    todo = _saes()
    if not todo:
        print("bench browse: no SAEs to browse yet (run `make paper` or `make demo` first)", file=sys.stderr)
        return []
    recs = []
    for d, whole in todo:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            index = build(BrowseSettings(sae=str(d), out=tmp, whole_cache=whole))
            seconds = time.perf_counter() - t
            summary = json.loads((index.parent / "data" / "summary.json").read_text())
        base = _encode_rate(d)
        recs.append(Record(f"browse {d.name} ({summary['tokens']:,} tok)", summary["tokens"] / seconds, "tok/s",
                           "encoding alone, rows in memory", base, device_name("cpu"),
                           {"sae": str(d), "latents": summary["latents"], "alive": summary["alive"],
                            "tokens": summary["tokens"], "part": "whole cache" if whole else "held-out",
                            "total_seconds": seconds, "scan_seconds": summary["scan_seconds"],
                            "site_bytes": summary["site_bytes"],
                            "mean_latent_file_bytes": summary["mean_latent_file_bytes"]}))
    return recs
