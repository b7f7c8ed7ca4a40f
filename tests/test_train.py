"""Training end to end on synthetic caches: recovery, resume, SAELens export, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from batchtopk.cache.format import write_cache
from batchtopk.core.errors import PipelineError
from batchtopk.train.cli import main as train_cli
from batchtopk.train.sae import load_sae
from batchtopk.train.settings import TrainSettings
from batchtopk.train.stack import StackTrainer
from batchtopk.train.trainer import Trainer

SITE = "blocks.0.hook_resid_pre"


def sparse_dictionary_data(n_seq=96, ctx=64, d=32, atoms=64, per_token=3, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    n = n_seq * ctx
    f = np.zeros((n, atoms))
    for i in range(n):
        f[i, rng.choice(atoms, per_token, replace=False)] = rng.uniform(1.0, 3.0, per_token)
    return (f @ D).astype(np.float32), D


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    x, D = sparse_dictionary_data()
    loc = tmp_path_factory.mktemp("syn") / "cache"
    tokens = np.ones((96, 64), dtype=np.int32)
    tokens[:, 0] = 0  # BOS
    write_cache(str(loc), tokens, {SITE: x}, dtype="float32", chunk_seqs=8)
    return str(loc), D


def settings(cache, out, **kw):
    base = dict(cache=cache, out=str(out), saes=[{"arch": "batchtopk", "d_sae": 128, "k": 3}], tokens=4096 * 12,
                batch_size=512, lr=3e-3, log_every=4, checkpoint_every=5, device="cpu", val_fraction=0.1)
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "quantile"])
def test_recovers_known_dictionary(synthetic_cache, tmp_path, arch):
    cache, D = synthetic_cache
    [d] = Trainer(settings(cache, tmp_path / arch, saes=[{"arch": arch, "d_sae": 128, "k": 3}],
                           tokens=512 * 400)).run()
    sae, meta = load_sae(d)
    W = sae.W_dec.detach().numpy()
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    best = (D @ W.T).max(axis=1)  # for each true atom, the best-matching latent
    assert (best > 0.9).mean() > 0.9, np.sort(best)[:10]
    log = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
    # a quantile SAE's threshold follows the batches' quantile a few steps late: about k, not exactly
    assert log[-1]["nmse"] < 0.1 and abs(log[-1]["l0"] - 3) < (0.3 if arch == "quantile" else 1e-6)
    assert meta["metadata"]["architecture"] == arch and meta["metadata"]["heldout_sequences"][1] == 96
    if arch in ("batchtopk", "quantile"):
        assert meta["metadata"]["theta"] > 0 and meta["architecture"] == "jumprelu"
        assert meta["metadata"]["val_nmse_threshold"] < 0.1
        assert abs(meta["metadata"]["heldout_l0"]["mean"] / 3 - 1) < 0.02  # θ from the final weights: k
    if arch == "quantile":  # the training threshold is recorded beside the inference θ, and close to it
        est = meta["metadata"]["theta_estimates"]
        assert est["running"] == pytest.approx(est["unseen"], rel=0.1)


def test_matryoshka_prefixes_reconstruct_on_their_own(synthetic_cache, tmp_path):
    """Matryoshka BatchTopK: one group is BatchTopK exactly; with the default groups, the first quarter and half
    of the dictionary reconstruct far better alone than a BatchTopK SAE's, at a cost to the whole, and θ keeps
    k latents per held-out token."""
    cache, _ = synthetic_cache
    sweep = [{"arch": "batchtopk", "d_sae": 128, "k": 3}, {"arch": "matryoshka", "d_sae": 128, "k": 3},
             {"arch": "matryoshka", "d_sae": 128, "k": 3, "groups": (1.0,)}]
    dirs = Trainer(settings(cache, tmp_path / "m", saes=sweep, tokens=512 * 200)).run()
    (bt, _), (mat, meta), (one, _) = [load_sae(d) for d in dirs]
    for name, p in bt.state_dict().items():
        torch.testing.assert_close(p, one.state_dict()[name], rtol=0, atol=0, msg=name)

    from batchtopk.cache.format import Cache
    from batchtopk.cache.split import Rows
    from batchtopk.train.sae import nmse
    x = Rows.from_metadata(Cache.open(cache), meta["metadata"]).take(4096)

    def prefix_nmse(sae, end):
        f = sae.encode(x)
        return nmse(x, f[:, :end] @ sae.W_dec[:end] + sae.b_dec)

    assert mat.cfg.group_sizes == (8, 8, 16, 32, 64)
    # (here every feature is as frequent as any other: the prefixes cannot hold the frequent ones, and the
    # whole pays more than on real activations)
    assert prefix_nmse(mat, 32) < 0.6 * prefix_nmse(bt, 32) and prefix_nmse(mat, 64) < 0.6 * prefix_nmse(bt, 64)
    assert nmse(x, bt(x)) < nmse(x, mat(x)) < 0.25
    assert abs(meta["metadata"]["heldout_l0"]["mean"] / 3 - 1) < 0.02
    assert meta["architecture"] == "jumprelu" and meta["metadata"]["theta"] > 0


def test_resume_equals_uninterrupted(synthetic_cache, tmp_path, monkeypatch):
    cache, _ = synthetic_cache
    sweep = [{"arch": "batchtopk", "d_sae": 64, "k": 3}, {"arch": "topk", "d_sae": 64, "k": 3},
             {"arch": "jumprelu", "d_sae": 64}, {"arch": "gated", "d_sae": 64, "l1_coeff": 3.0, "lr": 0.3, "resample": 0.25}]
    full = Trainer(settings(cache, tmp_path / "full", saes=sweep, tokens=512 * 23)).run()
    real = StackTrainer.step

    def interrupt_at_13(self, x, step_t, log=False):
        if int(step_t) == 13:
            raise KeyboardInterrupt
        return real(self, x, step_t, log)

    monkeypatch.setattr(StackTrainer, "step", interrupt_at_13)
    with pytest.raises(PipelineError, match="interrupted at step 13"):
        Trainer(settings(cache, tmp_path / "cut", saes=sweep, tokens=512 * 23)).run()
    monkeypatch.setattr(StackTrainer, "step", real)
    resumed = Trainer(settings(cache, tmp_path / "cut", saes=sweep, tokens=512 * 23)).run()
    for a, b in zip(full, resumed):
        sa, ma = load_sae(a)
        sb, mb = load_sae(b)
        for name, p in sa.state_dict().items():
            torch.testing.assert_close(p, sb.state_dict()[name], rtol=0, atol=0, msg=name)  # bit-identical on CPU
        assert ma["metadata"]["theta"] == mb["metadata"]["theta"]
        last = [json.loads((d / "train_log.jsonl").read_text().splitlines()[-1]) for d in (a, b)]
        assert last[0].get("resampled") == last[1].get("resampled")  # counted on across the resume
    assert last[0]["resampled"] > 0  # (the Gated SAE, last)


def test_saelens_loads_and_encodes_the_same(synthetic_cache, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cache, _ = synthetic_cache
    sweep = [{"arch": "batchtopk", "d_sae": 64, "k": 3}, {"arch": "topk", "d_sae": 64, "k": 3},
             {"arch": "jumprelu", "d_sae": 64}, {"arch": "relu", "d_sae": 64},
             # the reference code's choices: each token standardised, the encoder reading x - b_dec
             {"arch": "batchtopk", "d_sae": 64, "k": 3, "norm": "token", "center": True},
             {"arch": "topk", "d_sae": 64, "k": 3, "norm": "token"}, {"arch": "relu", "d_sae": 64, "center": True},
             {"arch": "quantile", "d_sae": 64, "k": 3}, {"arch": "matryoshka", "d_sae": 64, "k": 3},
             {"arch": "gated", "d_sae": 64, "l1_coeff": 0.003}, {"arch": "gated", "d_sae": 64, "center": True}]
    dirs = Trainer(settings(cache, tmp_path / "r", saes=sweep, tokens=512 * 6)).run()
    x = torch.randn(50, 32) * 3.0 + torch.linspace(-2, 2, 32)  # raw (unnormalised) activations
    for d in dirs:
        ours, meta = load_sae(d)
        theirs = sae_lens.SAE.load_from_disk(str(d))
        # the metadata SAELens-based tools read (SAEBench, Neuronpedia uploads)
        m = theirs.cfg.metadata
        assert (m.model_name, m.hook_name, m.context_size, m.prepend_bos, m.dataset_path) == \
            ("imported", SITE, 64, True, "imported")
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-4, atol=1e-4)
        assert meta["architecture"] == {"batchtopk": "jumprelu", "topk": "topk", "jumprelu": "jumprelu",
                                        "relu": "standard", "quantile": "jumprelu", "matryoshka": "jumprelu",
                                        "gated": "gated"}[meta["metadata"]["architecture"]]
        if ours.cfg.arch == "gated":  # trained: its magnitude path is not the gate's
            assert float(ours.r_mag.abs().max()) > 1e-3 and float(ours.b_mag.abs().max()) > 1e-3
        assert meta["normalize_activations"] == ("layer_norm" if ours.cfg.norm == "token" else "none")
        assert meta["apply_b_dec_to_input"] == ours.cfg.center
        # the saved SAE reconstructs the held-out rows exactly as the trained one did before saving
        from batchtopk.cache.format import Cache
        from batchtopk.cache.split import Rows
        val = Rows.from_metadata(Cache.open(cache), meta["metadata"]).take(8192)
        nmse = float((val - ours(val)).pow(2).sum() / (val - val.mean(0)).pow(2).sum())
        assert nmse == pytest.approx(meta["metadata"]["val_nmse_threshold"], rel=1e-4) and nmse < 0.9, d.name


def run_cli(*args):
    r = CliRunner().invoke(train_cli, list(args))
    return r


def error_of(r) -> str:
    assert r.exit_code == 2, (r.output, r.exception)
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    return line


def test_bad_input(synthetic_cache, tmp_path):
    cache, _ = synthetic_cache
    common = ["--cache", cache, "--batch-size", "512", "--tokens", "1024", "--device", "cpu"]
    assert "0 < k" in error_of(run_cli(*common, "--k", "0", "--dict", "64", "--out", str(tmp_path / "a")))
    assert "0 < k" in error_of(run_cli(*common, "--k", "65", "--dict", "64", "--out", str(tmp_path / "a")))
    assert "at least 1" in error_of(run_cli(*common, "--dict", "0", "--out", str(tmp_path / "a")))
    assert "unknown architecture" in error_of(run_cli(*common, "--arch", "gatd", "--out", str(tmp_path / "a")))
    assert error_of(run_cli(*common, "--arch", "gated", "--k", "32", "--out", str(tmp_path / "a"))) == (
        "error: k is a setting of batchtopk, topk, quantile, matryoshka SAEs; this run trains gated (drop k, or "
        "choose an architecture that has it)")
    assert "groups=0.5/0.25: Matryoshka groups are latent counts summing to the dictionary size (64) or fractions " \
        "summing to 1" in error_of(run_cli(*common, "--arch", "matryoshka", "--k", "3", "--dict", "64", "--set",
                                           "groups=0.5/0.25", "--out", str(tmp_path / "a")))
    assert "no cache at" in error_of(run_cli("--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "a")))
    assert "no site blocks.9.hook_resid_pre" in error_of(run_cli(*common, "--site", "blocks.9.hook_resid_pre",
                                                                 "--out", str(tmp_path / "a")))
    ok = run_cli(*common, "--k", "3", "--dict", "64", "--out", str(tmp_path / "b"))
    assert ok.exit_code == 0, ok.output
    before = (tmp_path / "b" / "batchtopk_k3_m64" / "sae_weights.safetensors").read_bytes()
    msg = error_of(run_cli(*common, "--k", "4", "--dict", "64", "--out", str(tmp_path / "b")))
    assert "different training run" in msg
    assert (tmp_path / "b" / "batchtopk_k3_m64" / "sae_weights.safetensors").read_bytes() == before
    again = run_cli(*common, "--k", "3", "--dict", "64", "--out", str(tmp_path / "b"))  # finished run: no-op
    assert again.exit_code == 0 and again.stdout.strip().endswith("batchtopk_k3_m64")


def test_incomplete_and_corrupt_caches(synthetic_cache, tmp_path):
    import shutil

    import zarr

    cache, _ = synthetic_cache
    part = tmp_path / "partial"
    shutil.copytree(cache, part)
    g = zarr.open_group(str(part), mode="r+")
    g.attrs["complete"] = False
    assert "incomplete" in error_of(run_cli("--cache", str(part), "--out", str(tmp_path / "o1")))
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    chunk = bad / "activations" / SITE / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    msg = error_of(run_cli("--cache", str(bad), "--out", str(tmp_path / "o2"), "--batch-size", "512",
                           "--tokens", "8192", "--device", "cpu"))
    assert "chunk 2" in msg and "fails its checksum" in msg
    chunk.write_bytes(bytes(data[:-6]))  # a truncated chunk file: named, not a crash in the memory map
    msg = error_of(run_cli("--cache", str(bad), "--out", str(tmp_path / "o3"), "--batch-size", "512",
                           "--tokens", "8192", "--device", "cpu"))
    assert "chunk 2" in msg and "corrupt cache" in msg and "bytes, not the" in msg, msg


def test_nan_loss_stops_and_keeps_checkpoint(synthetic_cache, tmp_path):
    cache, _ = synthetic_cache
    out = tmp_path / "nan"
    s = settings(cache, out, lr=1e30, tokens=512 * 20, checkpoint_every=1)
    with pytest.raises(PipelineError, match=r"loss became (nan|inf) at step \d+ .*last good checkpoint"):
        Trainer(s).run()
    assert (out / "state.pt").exists()


def test_outlier_rows_are_listed_and_skipped(tmp_path):
    from batchtopk.cache.format import Cache, synthetic_tokens
    from batchtopk.cache.split import Rows, Split
    from batchtopk.train.stream import ActivationStream

    rng = np.random.default_rng(3)
    x = rng.standard_normal((64 * 32, 16)).astype(np.float32)
    massive = [70, 511, 1900]  # non-BOS positions (row % 32 != 0)
    x[massive] *= 100.0
    x[::32] *= 500.0  # BOS rows: huge too, but they are BOS, not outliers
    c = write_cache(str(tmp_path / "c"), synthetic_tokens(64, 32), {SITE: x}, chunk_seqs=8)
    rows, thr = Cache.open(c.location).outliers(SITE)
    assert rows.tolist() == massive and thr == pytest.approx(10 * np.linalg.norm(np.delete(x, np.r_[0:len(x):32], 0), axis=1).mean())
    s = ActivationStream(Rows(c, SITE, Split.of(c, 0.0)), 64, 1.0)
    assert sum(s.rows_in.values()) == 64 * 31 - 3
    seen = torch.cat([b for b, _ in zip(s.batches(0), range(s.batches_per_epoch))])
    assert len(seen) == s.batches_per_epoch * 64 and float(seen.norm(dim=1).max()) < thr


def test_theta_from_final_weights_hits_k_on_heldout_tokens(synthetic_cache, tmp_path):
    """The default θ (pooled over the held-out sequences set aside for it, final weights) keeps k latents
    per token of the other held-out sequences, within 2%; all four estimates are recorded, each with
    its held-out L0."""
    from batchtopk.cache.format import Cache
    from batchtopk.cache.split import Rows, Split

    x, _ = sparse_dictionary_data(n_seq=192, seed=1)
    tokens = np.ones((192, 64), dtype=np.int32)
    tokens[:, 0] = 0
    cache = write_cache(str(tmp_path / "c"), tokens, {SITE: x}, dtype="float32", chunk_seqs=8).location
    [d] = Trainer(settings(cache, tmp_path / "t", saes=[{"arch": "batchtopk", "d_sae": 128, "k": 3}],
                           tokens=512 * 120, lr=3e-3, theta_tokens=8192, val_fraction=0.25)).run()
    sae, meta = load_sae(d)
    md = meta["metadata"]
    assert md["theta_estimator"] == "unseen" and set(md["theta_estimates"]) == {"unseen", "pooled", "mean", "running"}
    assert md["theta"] == pytest.approx(md["theta_estimates"]["unseen"])
    assert "range(144, 192, 2)" in md["theta_estimate"]  # the tail's first, third, ... sequences
    c = Cache.open(cache)
    split = Split.from_metadata(c, md)
    assert list(split.sequences(c, "heldout")) == list(range(145, 192, 2)) == list(range(*md["heldout_sequences"], 2))
    x = Rows(c, SITE, split, include_outliers=True).take(10 ** 6)
    assert len(x) == 24 * 63
    l0 = float((sae.encode(x, "threshold") > 0).sum(1).float().mean())
    assert abs(l0 / 3 - 1) < 0.02, l0
    # the trainer measured the same, chunk by chunk over the 6 held-out chunks
    h = md["heldout_l0"]
    assert h["rows"] == len(x) and len(h["per_chunk"]) == 6 and h["mode"] == "threshold"
    assert h["mean"] == pytest.approx(l0, rel=1e-4) and 0 < h["standard_error"] < 0.1
    assert h["at_estimates"]["unseen"] == pytest.approx(l0, rel=1e-4)
    for name, theta in md["theta_estimates"].items():  # each estimate's held-out L0, counted by hand
        assert h["at_estimates"][name] == pytest.approx(float((sae.pre(sae.normalize(x)[0]) > theta).sum(1).float().mean()), rel=1e-4)


def test_jumprelu_lands_on_its_target_l0(tmp_path):
    """A target-L0 penalty brings JumpReLU near its target and the final threshold factor puts it on it:
    held-out L0 within 15% of the target, from thresholds that started at 4x the target."""
    from batchtopk.cache.format import Cache
    from batchtopk.cache.split import Rows, Split

    x, _ = sparse_dictionary_data(n_seq=192, seed=2)
    tokens = np.ones((192, 64), dtype=np.int32)
    tokens[:, 0] = 0
    cache = write_cache(str(tmp_path / "c"), tokens, {SITE: x}, dtype="float32", chunk_seqs=8).location
    target = 6
    [d] = Trainer(settings(cache, tmp_path / "j", saes=[{"arch": "jumprelu", "d_sae": 128, "target_l0": target,
                                                          "l0_coeff": 1.0, "jumprelu_init_l0": 4 * target,
                                                          "threshold_lr": 0.02}],
                           tokens=512 * 120, lr=3e-3, theta_tokens=8192, val_fraction=0.25)).run()
    sae, meta = load_sae(d)
    factor = meta["metadata"]["target_l0_calibration"]["threshold_factor"]
    assert 0.5 < factor < 2  # the penalty alone already got close
    c = Cache.open(cache)
    assert meta["metadata"]["calibration_sequences"] == [144, 192]  # the factor was found on unseen sequences
    x = Rows(c, SITE, Split.from_metadata(c, meta["metadata"]), include_outliers=True).take(10 ** 6)
    l0 = float((sae.encode(x, "threshold") > 0).sum(1).float().mean())
    assert abs(l0 / target - 1) < 0.15, l0
    assert meta["metadata"]["heldout_l0"]["mean"] == pytest.approx(l0, rel=1e-4)


def test_run_id_counts_every_sae_field_with_its_default():
    """The run id (and the identity a resume checks) holds each SAE's whole configuration: naming a
    default changes nothing, changing any field (so also a default of a later version) makes a new run."""
    from batchtopk.train.sae import SAEConfig
    from batchtopk.train.settings import run_id

    def rid(**cfg):
        return run_id("cache", TrainSettings(cache="c", saes=[{"arch": "topk", "k": 4, "d_sae": 64} | cfg], out="o"))

    assert rid() == rid(dead_tokens=8192, aux_coeff=SAEConfig.aux_coeff) == rid(dead_tokens=None)
    assert len({rid(), rid(dead_tokens=1), rid(aux_coeff=0.5), rid(aux_k=8)}) == 4
    saes = TrainSettings(cache="c", saes=[{"arch": "topk", "k": 4, "d_sae": 64}], out="o").identity()["saes"]
    assert saes[0]["dead_tokens"] == 8192 and "d_in" not in saes[0]
    # a field added later (declared identity=IF_SET: Matryoshka's groups) leaves the earlier runs' ids as they were
    assert rid() == rid(groups=None) == "topk_k4_m64-c69b65a542" and "groups" not in saes[0]


def test_dead_latent_window_defaults_by_architecture():
    """TopK counts a latent dead after 8192 silent tokens, the others after 4096 (bench/ablation.py rounds
    4-5); the default is not spelled in the name, a different window is, and a window below 1 is refused."""
    from batchtopk.train.sae import SAEConfig

    assert SAEConfig("topk", 8, 64, k=4).dead_tokens == 8192
    assert SAEConfig("batchtopk", 8, 64, k=4).dead_tokens == SAEConfig("jumprelu", 8, 64).dead_tokens == 4096
    assert SAEConfig("topk", 8, 64, k=4, dead_tokens=8192).name == "topk_k4_m64"
    assert SAEConfig("topk", 8, 64, k=4, dead_tokens=4096).name == "topk_k4_m64_dead_tokens-4096"
    assert SAEConfig("batchtopk", 8, 64, k=4, dead_tokens=8192).name == "batchtopk_k4_m64_dead_tokens-8192"
    with pytest.raises(PipelineError, match="dead_tokens=0 must be at least 1"):
        SAEConfig("topk", 8, 64, k=4, dead_tokens=0)


def test_bench_theta_replays_the_training_batches(synthetic_cache, tmp_path):
    """`bench theta` rebuilds the run's batches from cfg.json: for one epoch of whole batches (10 of
    504 = every training row) with θ estimated over a whole epoch (`pooled`), the replayed tokens keep k latents
    each on average, and its held-out L0 at the saved θ is the trainer's own."""
    from batchtopk.bench.theta_recency import measure

    cache, _ = synthetic_cache
    s = settings(cache, tmp_path / "t", tokens=None, batch_size=504, theta_tokens=5040, theta_estimator="pooled",
                 saes=[{"arch": "batchtopk", "d_sae": 128, "k": 3}, {"arch": "topk", "d_sae": 128, "k": 3}])
    d, topk = Trainer(s).run()
    with pytest.raises(PipelineError, match="topk SAE; `bench theta` reads BatchTopK SAEs"):
        measure(topk)
    [rec] = measure(d)
    sae, meta = load_sae(d)
    meta = meta["metadata"]
    it = Trainer(s).stream.batches(0)  # the batches as the trainer streams them, in its order
    with torch.no_grad():
        want = [float((sae.pre(sae.normalize(next(it))[0]) > meta["theta"]).sum()) / 504 / 3 for _ in range(10)]
    it.close()
    assert rec.settings["train_l0_over_k_by_tenth_of_run"] == pytest.approx(want, abs=1e-4)
    assert rec.settings["steps"] == 10 and rec.settings["middle_steps"] == [1, 7]
    assert rec.settings["theta"] == pytest.approx(meta["theta"])
    tenths = rec.settings["train_l0_over_k_by_tenth_of_run"]
    assert np.mean(tenths) == pytest.approx(1.0, abs=1e-3)  # each tenth is one batch of 504 here
    assert rec.settings["heldout_rows"] == meta["heldout_l0"]["rows"] == 2 * 8 * 63
    assert rec.baseline_value == pytest.approx(meta["heldout_l0"]["mean"] / 3, abs=2 / 1008)
    assert 0.5 < rec.value < 2
    sparse = measure(d, every=3)[0].settings["train_l0_over_k_by_tenth_of_run"]  # steps 0, 3, 6, 9 only
    assert sparse[::3] == pytest.approx(want[::3], abs=1e-4) and sparse[1] is None
    with pytest.raises(PipelineError, match="every=0 must be at least 1"):
        measure(d, every=0)


def test_no_heldout_part_trains_saves_and_estimates_theta_on_training_tokens(synthetic_cache, tmp_path):
    """val_fraction 0: the run saves its SAE (no held-out metrics) and θ falls back to `pooled` over
    training batches, with a warning and the estimator used in the metadata."""
    cache, _ = synthetic_cache
    with pytest.warns(UserWarning, match=r"no held-out part \(val_fraction 0\): θ is estimated on training tokens"):
        [d] = Trainer(settings(cache, tmp_path / "t", tokens=512 * 4, val_fraction=0.0)).run()
    md = load_sae(d)[1]["metadata"]
    assert md["theta_estimator"] == "pooled" and md["theta"] == pytest.approx(md["theta_estimates"]["pooled"])
    assert md["heldout_sequences"] is None and "unseen" not in md["theta_estimates"] and "heldout_l0" not in md


def test_a_checkpoint_of_the_old_layout_gets_one_line(synthetic_cache, tmp_path):
    """A run checkpointed by the version that trained SAEs one by one is not resumed into stacks: one line
    says what to do, and nothing is overwritten."""
    from batchtopk.train import checkpoint
    from batchtopk.train.rundir import RUN_FILE, STATE_FILE

    cache, _ = synthetic_cache
    s = settings(cache, tmp_path / "old", tokens=512 * 6)
    t = Trainer(s)
    t.out.mkdir(parents=True)
    (t.out / RUN_FILE).write_text(json.dumps({"identity": t.identity, "complete": False}))
    sae = t.unstack()[0]
    checkpoint.save({"step": 3, "identity": t.identity, "saes": [sae.state_dict()], "opts": [{}],
                     "since_fired": [torch.zeros(128, dtype=torch.long)], "theta_sum": [0.0], "theta_n": [0],
                     "torch_rng": torch.get_rng_state()}, t.out / STATE_FILE)
    before = (t.out / STATE_FILE).read_bytes()
    with pytest.raises(PipelineError, match=r"written by an earlier version, which trained SAEs one by one; finish "
                                            r"the run with that version, or delete the checkpoint"):
        Trainer(s).run()
    assert (t.out / STATE_FILE).read_bytes() == before


def test_resuming_with_other_stacks_says_which_stack_size(synthetic_cache, tmp_path):
    """A checkpoint's stacks decide a resumed run's unless --stack-size asks for others: then one line."""
    from batchtopk.train.rundir import RUN_FILE

    cache, _ = synthetic_cache
    sweep = [{"arch": "topk", "d_sae": 128, "k": 3, "replicate": r} for r in range(2)]
    for size, out in ((2, "r"), (1, "r1")):
        t = Trainer(settings(cache, tmp_path / out, saes=sweep, tokens=512 * 6, stack_size=size))
        t.out.mkdir(parents=True)
        (t.out / RUN_FILE).write_text(json.dumps({"identity": t.identity, "complete": False}))
        t.save_state()
    with pytest.raises(PipelineError, match=r"holds stacks of up to 2 SAEs, this run would make stacks of up to 1; "
                                            r"resume with --stack-size 2"):
        Trainer(settings(cache, tmp_path / "r", saes=sweep, tokens=512 * 6, stack_size=1)).run()
    # stacks of 1 (the CPU's default before 2026-12-02), resumed without --stack-size: it goes on in them
    t = Trainer(settings(cache, tmp_path / "r1", saes=sweep, tokens=512 * 6))
    assert t.groups == [[0, 1]]
    t.run()
    assert t.groups == [[0], [1]] and json.loads((t.out / RUN_FILE).read_text())["complete"]
