"""`make gpu-check` (bench/gpu_check.py): its code runs here, at toy sizes on the CPU."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_gpu_check_runs_here_and_fails_loudly(tmp_path, monkeypatch):
    """`make gpu-check`'s code runs on the CPU at toy sizes (one case, a sweep of 2, the figures): it writes its
    records, and a divergence beyond its tolerance exits 1 naming the case. (One run, with the tolerance below
    any difference: each compile costs seconds here.)"""
    import json

    from click.testing import CliRunner

    from batchtopk.bench import gpu_check
    from batchtopk.bench.cli import main

    monkeypatch.setattr(gpu_check, "CASES", [("batchtopk", {})])  # its shape recurs in the sweep and the figures
    monkeypatch.setattr(gpu_check, "SWEEP_STACKS", 2)
    monkeypatch.setattr(gpu_check, "SMALL", gpu_check.Sizes(d=16, m=64, k=4, batch=128, steps=6, perf_m=64,
                                                            perf_batch=128, perf_steps=2))
    monkeypatch.setattr("batchtopk.bench.records.DATA_DIR", tmp_path)
    monkeypatch.setattr(gpu_check, "NMSE_TOL", -1.0)  # every difference is a divergence
    res = CliRunner().invoke(main, ["gpu-check", "--device", "cpu", "--small"])
    assert res.exit_code == 1 and "FAILED batchtopk: held-out NMSE" in res.output, res.output
    recs = {r["name"]: r for r in json.loads((tmp_path / "bench" / "gpu-check.json").read_text())}
    case = recs["held-out NMSE, batchtopk"]["settings"]
    assert case["ok"] is False and case["compiles"] == 1  # the records are written, failures included
    assert recs["compiles, a sweep of 2 stacks"]["value"] == 2
    assert recs["host syncs per step"]["value"] == 0 and recs["tokens/s, loader-fed"]["value"] > 0
    assert recs["tokens/s, one SAE"]["settings"]["executor"] == "fixed-shape, compiled, bf16 on cpu"


def test_gpu_check_covers_every_architecture_and_the_span_case():
    from batchtopk.bench.gpu_check import CASES
    from batchtopk.train.archs import ARCHS

    assert {a for a, _ in CASES} == set(ARCHS)
    assert ("batchtopk", {"span": None, "aux_batch": True}) in CASES
