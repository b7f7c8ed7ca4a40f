"""The paper pipeline, scaled down: tiny model, a few thousand tokens, through `make pipeline-run`."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # `make test-fast` leaves these to the whole suite

ROOT = Path(__file__).resolve().parent.parent


def test_scaled_down_paper_pipeline(tmp_path, tiny_models, corpus_file):
    real = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]["smollm2-135m-paper"]
    pipe = {
        "harvest": {**real["harvest"], "model": str(tiny_models["llama"]), "layers": [2], "dataset": str(corpus_file),
                    "dataset_fallback": None, "tokens": 200 * 32, "ctx_len": 32, "chunk_mb": 0.05},
        "train": {**real["train"], "tokens": 256 * 40, "batch_size": 256},
        "eval": {"tokens": 256},  # 8 of the 10 sequences evaluation may read (19, 39, ...)
    }
    # the same grids, shrunk: dictionary multiples of d_model=64 stay as they are, k scaled down
    pipe["train"]["sweep"] = [
        {"arch": ["batchtopk", "topk"], "k": [4], "dict": ["2x"], "seeds": 2},
        {"arch": ["batchtopk", "topk"], "k": [4], "dict": ["4x"]},
        {"arch": ["batchtopk", "topk"], "k": [2, 8], "dict": ["2x"]},
        {"arch": ["jumprelu"], "dict": ["2x"], "target_l0": [4], "l0_coeff": [1]},
    ]
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(yaml.safe_dump({"default": "tiny-paper", "pipelines": {"tiny-paper": pipe}}))
    env = dict(os.environ, BATCHTOPK_PIPELINES=str(cfg), BATCHTOPK_DATA=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    r = subprocess.run(["make", "--no-print-directory", "pipeline-run", "PIPELINE=tiny-paper"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = Path(r.stdout.strip().splitlines()[-1])
    assert report == tmp_path / "data" / "reports" / "tiny-paper" / "report.md"
    text = report.read_text()
    for fig in ("fig1_vs_k.png", "fig2_vs_dict.png", "fig3_l0_distribution.png", "fig4_threshold_vs_batch.png",
                "fig5_frontier.png"):
        assert f"({fig})" in text and (report.parent / fig).stat().st_size > 5000, fig
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "data" / "saes" / "tiny-paper").rglob("metrics.json")]
    assert len(metrics) == 11  # 6 + 4 (Top)K SAEs (two seeds of the 2x k=4 pair) and one JumpReLU
    by_arch = {m["architecture"] for m in metrics}
    assert by_arch == {"batchtopk", "topk", "jumprelu"}
    for m in metrics:
        assert m["pipeline"] == "tiny-paper" and m["d_sae"] in (128, 256)
        assert 0 <= m["nmse"] < 2 and m["l0"] > 0
    assert sum(f"| {m['architecture']} |" in text for m in metrics) >= 3
    # the pipeline's interleaved held-out part (every tenth sequence), less the half that calibrated θ
    # (9, 29, ...), is what evaluation read
    assert {(tuple(m["eval_source"]["heldout_sequences"]), m["eval_source"]["heldout_every"]) for m in metrics} \
        == {((19, 160), 20)} and "19–160, every 20th" in text
    assert "±" in text  # two seeds: mean ± std
    # every θ estimate's held-out L0, the one in use (unseen) marked
    assert "### θ estimators" in text and "| pooled | mean | unseen | running |" in text
    assert re.search(r"\| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \* \| \d\.\d{3} \|", text)
    [jr] = [m for m in metrics if m["architecture"] == "jumprelu"]
    assert abs(jr["l0"] / 4 - 1) < 0.3, jr["l0"]  # on its target, on 256 evaluation tokens
