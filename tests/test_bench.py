"""Benchmark plumbing: records as CONTRACT.md names them, and each measurement runs (tiny sizes)."""
from __future__ import annotations

import json

import pytest
import torch

from batchtopk.bench import records, train_bench


def test_records_follow_the_contract(tmp_path):
    r = records.Record("x", 30.0, "tok/s", "base", 20.0, "cpu", {"a": 1})
    path = records.write("part", [r], tmp_path)
    [rec] = json.loads(path.read_text())
    assert set(rec) == {"name", "value", "unit", "baseline", "baseline_value", "ratio", "device", "settings"}
    assert rec["ratio"] == pytest.approx(1.5)
    assert "1.500" in records.table([r])


@pytest.mark.parametrize("arch", train_bench.ARCHS)
def test_train_step_measurements_run(arch):
    for impl in ("ours", "dense", "saelens"):
        out = train_bench.step_time(arch, impl, d=16, m=64, k=4, batch=128, steps=1, device="cpu")
        assert out["tokens_per_s"] > 0 and out["peak_mib"] > 0


def test_each_implementation_keeps_its_fastest_round_and_they_take_turns(monkeypatch):
    calls, speeds = [], {"ours": iter([5.0, 9.0, 7.0]), "dense": iter([3.0, 2.0, 4.0])}

    def isolated(arch, impl, *args):
        calls.append(impl)
        return {"tokens_per_s": next(speeds[impl]), "peak_mib": 10.0 * len(calls)}
    monkeypatch.setattr(train_bench, "_isolated", isolated)
    best = train_bench._best("batchtopk", ("ours", "dense"), 3)
    assert calls == ["ours", "dense"] * 3  # alternating, so a slow spell weighs on both
    assert best["ours"]["tokens_per_s"] == 9.0 and best["dense"]["tokens_per_s"] == 4.0
    assert best["ours"]["peak_mib"] == 50.0 and best["dense"]["peak_mib"] == 60.0  # the highest of the rounds


def test_loader_and_fed_training_records(tmp_path):
    rec = train_bench.loader_record(16, 64, "cpu", tokens=128 * 40)
    assert rec.value > 0 and rec.baseline_value > 0 and rec.settings["bytes_per_token"] == 32
    fed = train_bench.fed_training_record(16, 64, 4, 64, "cpu", "cpu", steps=4)
    assert fed.value > 0 and fed.baseline_value > 0 and fed.settings["steps"] >= 1


def test_score_tells_dead_latents_from_ones_only_the_training_text_uses():
    from batchtopk.bench.peers import score

    def rec(xb):  # an identity "SAE" whose latents are the columns: latent j fires where column j > 0
        return xb, (xb > 0).sum(1), (xb > 0).sum(0)

    held = torch.tensor([[1.0, -1.0, -1.0], [2.0, -1.0, -1.0], [3.0, -1.0, -1.0], [4.0, -1.0, -1.0]])
    train = [torch.tensor([[1.0, 2.0, -1.0]] * 3), torch.tensor([[1.0, -2.0, -1.0]] * 5)]
    s = score(rec, held, 2, 1.0, iter(train))
    assert s["nmse"] == 0.0 and s["l0"] == 1.0
    assert s["dead_fraction"] == pytest.approx(2 / 3)  # latents 1 and 2 are silent on the held-out rows
    assert s["dead_in_training_fraction"] == pytest.approx(1 / 3)  # only latent 2 never fires in training
    assert s["heldout_dead_training_firings"] == [0, 0, 3]  # latent 1 fired on 3 training rows
    assert s["median_training_firings"] == 3


def test_gated_runs_are_read_at_the_target_l0():
    """Runs at several coefficients: NMSE at L0 = k interpolated log-log between the two that bracket k; NaN
    when none do."""
    import math

    from batchtopk.bench.peers import at_l0

    runs = [{"l0": 64.0, "nmse": 0.1, "standardized_mse": 0.2, "coeff": 0.003, "dead_fraction": 0.0},
            {"l0": 16.0, "nmse": 0.4, "standardized_mse": 0.8, "coeff": 0.03, "dead_fraction": 0.5},
            {"l0": 4.0, "nmse": 0.8, "standardized_mse": 0.9, "coeff": 0.1, "dead_fraction": 0.9}]
    r = at_l0(runs, 32)
    assert r["nmse"] == pytest.approx(0.2) and r["standardized_mse"] == pytest.approx(0.4)  # halfway in log L0
    assert r["l0"] == 32 and r["l0_bracket"] == [16.0, 64.0] and r["coeff_bracket"] == [0.03, 0.003]
    assert at_l0(runs, 20)["dead_fraction"] == 0.5 and at_l0(runs, 50)["dead_fraction"] == 0.0  # the nearer run's
    assert math.isnan(at_l0(runs, 100)["nmse"]) and at_l0(runs, 100)["coeff_bracket"] is None


def test_the_gated_grid_option_takes_positive_numbers_only():
    from click.testing import CliRunner

    from batchtopk.bench.cli import _floats, main

    assert _floats("0.003, 0.005,0.01", "--gated-l1") == (0.003, 0.005, 0.01) and _floats(None, "x") == ()
    for bad in ("0.01,x", "0.01,-1"):
        r = CliRunner().invoke(main, ["peers", "--gated-l1", bad])
        assert r.exit_code == 2 and f"Invalid value for --gated-l1: '{bad}': allowed: positive numbers" in r.output
