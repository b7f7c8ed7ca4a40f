"""Evaluation: splicing, metrics against brute force, modes, report, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from batchtopk.cache.format import Cache
from batchtopk.core.errors import PipelineError
from batchtopk.evaluate.cli import main as eval_cli
from batchtopk.evaluate.metrics import token_ce
from batchtopk.evaluate.run import evaluate, evaluate_site, sae_reconstructor
from batchtopk.evaluate.settings import EvalSettings
from batchtopk.evaluate.splice import Splicer
from batchtopk.harvest.run import harvest
from batchtopk.train.sae import load_sae
from batchtopk.train.settings import TrainSettings
from batchtopk.train.trainer import Trainer

SITE = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_models, corpus_file):
    """Tiny Llama: harvest 8192 tokens, train a BatchTopK and a TopK SAE."""
    from batchtopk.harvest.settings import HarvestSettings

    tmp = tmp_path_factory.mktemp("evalrun")
    loc = harvest(HarvestSettings(model=str(tiny_models["llama"]), layers=[2], dataset=str(corpus_file),
                                  tokens=256 * 32, ctx_len=32, dtype="float32", device="cpu", batch_size=16,
                                  chunk_mb=0.05, cache_root=str(tmp / "cache")))
    dirs = Trainer(TrainSettings(cache=loc, out=str(tmp / "run"), batch_size=512, tokens=512 * 30, lr=1e-3,
                                 saes=[{"arch": "batchtopk", "d_sae": 128, "k": 4},
                                       {"arch": "topk", "d_sae": 128, "k": 4}], device="cpu",
                                 val_fraction=0.25, pipeline="tiny")).run()
    return loc, dirs, tiny_models["llama"]


def load_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batches_of(loc, n=2):
    c = Cache.open(loc)
    toks = torch.from_numpy(c.tokens[-16:].astype(np.int64))
    return list(toks.split(8))[:n]


def identity(x):
    return x, torch.zeros(len(x), dtype=torch.long), torch.zeros(1)


def test_identity_splice_costs_nothing(pipeline_run):
    loc, _, model_dir = pipeline_run
    m = load_model(model_dir)
    mean = torch.zeros(64)
    r = evaluate_site(m, SITE, batches_of(loc), {"id": (identity, 1)}, mean, bos_id=0, progress=False)["id"]
    assert abs(r["ce_degradation"]) < 1e-5 and abs(r["kl_div"]) < 1e-6 and r["nmse"] == 0
    # ce_clean is the model's own loss on those tokens
    ids = torch.cat(batches_of(loc))
    with torch.no_grad():
        assert r["ce_clean"] == pytest.approx(float(m(ids, labels=ids).loss), rel=1e-5)


def manual_spliced_ce(m, ids, layer, values_fn):
    """CE with a plain forward pre-hook on block `layer` (no skipping), replacing non-BOS positions."""
    def hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        mask = ids != 0
        h[mask] = values_fn(h[mask])
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    handle = m.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = m(ids).logits
    finally:
        handle.remove()
    return logits


def test_zero_ablation_and_metrics_match_brute_force(pipeline_run):
    loc, dirs, model_dir = pipeline_run
    m = load_model(model_dir)
    sae, _ = load_sae(dirs[1])  # topk
    batches = batches_of(loc)
    mean = torch.randn(64)
    r = evaluate_site(m, SITE, batches, {"s": (sae_reconstructor(sae, "threshold"), 128)}, mean, 0, False)["s"]
    ids = torch.cat(batches)
    with torch.no_grad():
        clean = m(ids, output_hidden_states=True)
    x = clean.hidden_states[2][ids != 0].numpy().astype(np.float64)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x).float(), "threshold").numpy()
        x_hat = sae(torch.from_numpy(x).float(), "threshold").numpy().astype(np.float64)
    e = x - x_hat
    assert r["nmse"] == pytest.approx(((e ** 2).sum()) / ((x - x.mean(0)) ** 2).sum(), rel=1e-6)
    std = x.std(1, ddof=1, keepdims=True) + 1e-5  # the paper's MSE of standardised tokens
    assert r["standardized_mse"] == pytest.approx(((e / std) ** 2).mean(), rel=1e-6)
    assert r["explained_variance"] == pytest.approx(1 - ((e - e.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-6)
    cos = (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert r["cosine_sim"] == pytest.approx(cos.mean(), rel=1e-6)
    assert r["l0"] == pytest.approx((f != 0).sum(1).mean())
    assert r["dead_fraction"] == pytest.approx(((f != 0).sum(0) == 0).mean())
    ce = lambda logits: float(token_ce(logits, ids).double().mean())
    assert r["ce_zero_ablated"] == pytest.approx(ce(manual_spliced_ce(m, ids, 2, torch.zeros_like)), rel=1e-5)
    assert r["ce_mean_ablated"] == pytest.approx(ce(manual_spliced_ce(m, ids, 2, lambda h: mean.expand_as(h))), rel=1e-5)
    spl = manual_spliced_ce(m, ids, 2, lambda h: torch.from_numpy(x_hat).float())
    assert r["ce_spliced"] == pytest.approx(ce(spl), rel=1e-5)
    p = clean.logits[:, :-1].log_softmax(-1).double()
    q = spl[:, :-1].log_softmax(-1).double()
    assert r["kl_div"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    assert r["ce_loss_recovered"] == pytest.approx((r["ce_zero_ablated"] - r["ce_spliced"]) /
                                                   (r["ce_zero_ablated"] - r["ce_clean"]))


def test_skipping_early_blocks_gives_the_same_logits(pipeline_run):
    loc, _, model_dir = pipeline_run
    m = load_model(model_dir)
    ids = batches_of(loc, 1)[0]
    sp = Splicer(m, SITE)
    with torch.no_grad():
        _, act = sp.clean(ids)
        fast = sp.spliced(ids, lambda h: h * 0.5)
        slow = manual_spliced_ce(m, ids, 2, lambda h: h * 0.5)  # BOS kept clean here; compare non-BOS-free case
    sp.close()
    sp2 = Splicer(m, SITE)
    with torch.no_grad():
        sp2.clean(ids)
        fast_all = sp2.spliced(ids, lambda h: torch.where((ids != 0)[..., None], h * 0.5, h))
    sp2.close()
    torch.testing.assert_close(fast_all, slow, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, slow)  # scaling BOS too changes the logits: the comparison can fail


def test_batch_and_threshold_modes_agree_with_theta_from_batch(pipeline_run):
    loc, dirs, model_dir = pipeline_run
    m = load_model(model_dir)
    sae, _ = load_sae(dirs[0])
    [ids] = batches_of(loc, 1)
    with torch.no_grad():
        _, act = Splicer(m, SITE).clean(ids)
        f = sae.encode(act[ids != 0], "batch")
        sae.theta.fill_(float(f[f > 0].min()) - 1e-7)
    recons = {mode: (sae_reconstructor(sae, mode), 128) for mode in ("batch", "threshold")}
    r = evaluate_site(m, SITE, [ids], recons, torch.zeros(64), 0, False)
    for key in ("nmse", "l0", "ce_spliced", "kl_div", "cosine_sim"):
        assert r["batch"][key] == pytest.approx(r["threshold"][key], rel=1e-6), key


def test_cli_metrics_and_report(pipeline_run, tmp_path):
    loc, dirs, _ = pipeline_run
    args = [x for d in dirs for x in ("--sae", str(d))] + ["--tokens", "1024", "--device", "cpu"]
    r = CliRunner().invoke(eval_cli, args)
    assert r.exit_code == 0, r.output
    bt = json.loads((dirs[0] / "metrics.json").read_text())
    for key in ("nmse", "l0", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_degradation", "ce_loss_recovered",
                "kl_div", "dead_fraction", "architecture", "k", "d_sae", "pipeline"):
        assert key in bt, key
    assert set(bt["modes"]) == {"batch", "threshold"} and bt["architecture"] == "batchtopk" and bt["k"] == 4
    assert bt["modes"]["batch"]["l0"] == pytest.approx(4.0) and bt["include_bos"] is False
    assert bt["eval_tokens"] == 1024 and bt["pipeline"] == "tiny"
    assert bt["ce_degradation"] == pytest.approx(bt["ce_spliced"] - bt["ce_clean"])
    from batchtopk.evaluate.report import write_report

    path = write_report("tiny", [str(d) for d in dirs], str(tmp_path / "rep"))
    text = path.read_text()
    for fig in ("fig1_vs_k.png", "fig2_vs_dict.png", "fig3_l0_distribution.png", "fig4_threshold_vs_batch.png",
                "fig5_frontier.png"):
        assert f"]({fig})" in text and (tmp_path / "rep" / fig).stat().st_size > 5000
    assert "batchtopk_k4_m128" in text and "topk_k4_m128" in text


def test_bad_input(pipeline_run, tmp_path, tiny_models):
    loc, dirs, _ = pipeline_run
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="not an SAE directory: missing cfg.json, sae_weights.safetensors"):
        evaluate(EvalSettings(saes=[str(empty)]))
    with pytest.raises(PipelineError, match="fewer than the 100000 asked"):
        evaluate(EvalSettings(saes=[str(dirs[0])], tokens=100000, device="cpu"))
    import shutil
    bad = tmp_path / "wide"
    shutil.copytree(dirs[0], bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.9.hook_resid_pre"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="layer 9 out of range"):
        evaluate(EvalSettings(saes=[str(bad)], tokens=256, device="cpu"))
    from safetensors.torch import load_file, save_file
    wide = tmp_path / "wide2"
    shutil.copytree(dirs[1], wide)
    w = load_file(str(wide / "sae_weights.safetensors"))
    w = {"W_enc": torch.zeros(32, 128), "b_enc": w["b_enc"], "W_dec": torch.zeros(128, 32), "b_dec": torch.zeros(32)}
    save_file(w, str(wide / "sae_weights.safetensors"))
    cfg = json.loads((wide / "cfg.json").read_text())
    cfg["d_in"] = 32
    cfg["metadata"]["sae_config"]["d_in"] = 32
    del cfg["metadata"]["weights_blake2b"]  # a hand-made SAE: no digest of its weights to check
    (wide / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="d_in=32 but .* has width 64"):
        evaluate(EvalSettings(saes=[str(wide)], tokens=256, device="cpu"))


def test_interleaved_heldout_part_is_what_evaluation_reads(pipeline_run, tmp_path):
    from batchtopk.evaluate.report import _held_text
    from batchtopk.evaluate.run import common_heldout, eval_tokens

    loc, dirs, _ = pipeline_run
    [inter] = Trainer(TrainSettings(cache=loc, out=str(tmp_path / "run"), batch_size=512, tokens=512 * 6, lr=1e-3,
                                    saes=[{"arch": "batchtopk", "d_sae": 128, "k": 4}], device="cpu",
                                    val_fraction=0.25, heldout="interleaved", pipeline="tiny")).run()
    md = load_sae(inter)[1]["metadata"]
    # every other held-out sequence (3, 11, ...) calibrated θ; evaluation reads the others (7, 15, ...)
    assert (md["heldout_sequences"], md["heldout_every"]) == ([7, 256], 8)
    assert (md["calibration_sequences"], md["calibration_every"]) == ([3, 256], 8)
    c = Cache.open(loc)
    rows = sum(int(((c.tokens[s] != 0) & (np.arange(32) > 0)).sum()) for s in range(7, 256, 8))  # no BOS
    assert md["heldout_l0"]["rows"] == rows - int(np.isin(c.outliers(SITE)[0] // 32, range(7, 256, 8)).sum())
    evaluate(EvalSettings(saes=[str(inter)], tokens=256, device="cpu"))
    src = json.loads((inter / "metrics.json").read_text())["eval_source"]
    assert (src["heldout_sequences"], src["heldout_every"]) == ([7, 64], 8)
    assert _held_text(src) == "7–64, every 8th"
    assert [_held_text({"heldout_sequences": [1, 99], "heldout_every": n}) for n in (2, 3, 11, 22)] == \
        ["1–99, every 2nd", "1–99, every 3rd", "1–99, every 11th", "1–99, every 22nd"]
    ids, _ = common_heldout([("i", md)])
    got = torch.cat(eval_tokens(c, ids, 256, 8)).numpy()
    np.testing.assert_array_equal(got, c.tokens[7:64:8])
    # a pipeline's default asks for at most its tokens: a smaller held-out part is read whole; asked for
    # explicitly, more than there is is an error
    np.testing.assert_array_equal(torch.cat(eval_tokens(c, ids, 10**6, 8, exact=False)).numpy(), c.tokens[7:256:8])
    with pytest.raises(PipelineError, match=r"has only 1024 tokens.*fewer than the 1000000"):
        eval_tokens(c, ids, 10**6, 8)
    # with a tail-split SAE in the group (it evaluates on the odd sequences of its tail), only the
    # sequences both evaluate on
    tail = load_sae(dirs[0])[1]["metadata"]
    assert tail["heldout_every"] == 2 and tail["heldout_sequences"][0] % 2 == 1
    first = tail["heldout_sequences"][0] + (7 - tail["heldout_sequences"][0]) % 8
    evaluate(EvalSettings(saes=[str(inter), str(dirs[0])], tokens=256, device="cpu"))
    src = json.loads((inter / "metrics.json").read_text())["eval_source"]
    assert (src["heldout_sequences"], src["heldout_every"]) == ([first, first + 57], 8)


def test_with_activation_shares_weights_and_selects_by_the_other_rule(pipeline_run):
    from batchtopk.train.sae import SAE, SAEConfig, with_activation

    _, dirs, _ = pipeline_run
    bt, tk = load_sae(dirs[0])[0], load_sae(dirs[1])[0]
    x = torch.randn(300, 64) * 3
    as_topk = with_activation(bt, "topk")
    assert as_topk.W_enc is bt.W_enc and as_topk.cfg.arch == "topk" and as_topk.cfg.k == 4
    pre = bt.pre(bt.normalize(x)[0])
    f = as_topk.encode(x)
    assert ((f > 0).sum(1) == (pre > 0).sum(1).clamp(max=4)).all()  # k per token, where k are positive
    torch.testing.assert_close(f.max(1).values, pre.relu().max(1).values)
    as_bt = with_activation(tk, "batchtopk")
    assert float(as_bt.theta) == 0.0  # no θ until one is estimated for it
    g = as_bt.encode(x, "batch")
    assert int((g > 0).sum()) == 300 * 4 and float(tk.theta) == 0.0
    # the other rule, not the SAE's own: TopK's per-token counts vary under batch selection
    assert (g > 0).sum(1).float().std() > 0
    with pytest.raises(PipelineError, match="a jumprelu SAE cannot be encoded as topk: only batchtopk and topk"):
        with_activation(SAE(SAEConfig(arch="jumprelu", d_in=8, d_sae=16)), "topk")
    # a BatchTopK SAE trained with a selection span is TopK without it (the span is BatchTopK's setting)
    spanned = SAE(SAEConfig(arch="batchtopk", d_in=8, d_sae=16, k=2, span=4))
    assert with_activation(spanned, "topk").cfg.span is None
    assert with_activation(with_activation(spanned, "topk"), "batchtopk").cfg.span is None


def test_encode_as_scores_each_sae_with_the_others_activation(pipeline_run, tmp_path):
    import shutil

    from batchtopk.cache.split import Rows

    loc, dirs, _ = pipeline_run
    saes = [tmp_path / d.name for d in dirs]
    for src, dst in zip(dirs, saes):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics.json"))
    evaluate(EvalSettings(saes=[str(d) for d in saes], tokens=512, device="cpu"))
    plain = [json.loads((d / "metrics.json").read_text()) for d in saes]
    r = CliRunner().invoke(eval_cli, [x for d in saes for x in ("--sae", str(d))]
                           + ["--tokens", "512", "--device", "cpu", "--encode-as", "batchtopk,topk"])
    assert r.exit_code == 0, r.output
    bt, tk = (json.loads((d / "metrics.json").read_text()) for d in saes)
    # the SAEs' own modes are untouched; each gets the other's activation only
    assert bt["modes"] == plain[0]["modes"] and tk["modes"] == plain[1]["modes"]
    assert list(bt["encoded_as"]) == ["topk"] and list(tk["encoded_as"]) == ["batchtopk"]
    assert bt["encoded_as"]["topk"]["modes"]["topk"]["l0"] == pytest.approx(4.0)
    swapped = tk["encoded_as"]["batchtopk"]
    assert set(swapped["modes"]) == {"threshold", "batch"} and swapped["modes"]["batch"]["l0"] == pytest.approx(4.0)
    # θ: the pooled estimate over the TopK SAE's calibration rows, by brute force
    sae, meta = load_sae(saes[1])
    cal = Rows.from_metadata(Cache.open(loc), meta["metadata"]).take(65536, "calibration")
    with torch.no_grad():
        pre = sae.pre(sae.normalize(cal)[0]).relu().flatten().sort(descending=True).values
    assert swapped["theta_rows"] == len(cal) and swapped["theta"] == pytest.approx(float(pre[len(cal) * 4 - 1]))
    assert swapped["modes"]["threshold"]["l0"] == pytest.approx(4.0, rel=0.25)
    # the report's table, and summary.json keeps what the docs' table is rendered from
    from batchtopk.evaluate.report import write_report

    report = write_report("tiny", [str(d) for d in saes], str(tmp_path / "rep")).read_text()
    [row] = [line for line in report.splitlines() if line.startswith("| 128 | 4 | 1 |")]
    assert f"{tk['nmse']:.4f} / " in row and f"{swapped['modes']['batch']['nmse']:.4f} (" in row
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary[1]["encoded_as"]["batchtopk"]["theta"] == swapped["theta"]
    log = [json.loads(line) for line in (saes[0] / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [10, 20, 30]  # halfway: step 15, of which step 10 is the first closest
    assert summary[0]["dead_in_training"] == {"half": log[0]["dead"] / 128, "half_step": 10,
                                              "end": log[-1]["dead"] / 128, "end_step": log[-1]["step"]}
    # a run that set no calibration sequences aside: one line saying what is missing
    cfg = json.loads((saes[1] / "cfg.json").read_text())
    for key in ("calibration_sequences", "calibration_every"):
        cfg["metadata"].pop(key, None)
    (saes[1] / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="estimates a θ for a topk SAE on its calibration sequences"):
        evaluate(EvalSettings(saes=[str(saes[1])], tokens=512, device="cpu", encode_as=("batchtopk",)))
    with pytest.raises(PipelineError, match="--encode-as relu: .* allowed: batchtopk, topk"):
        EvalSettings(saes=[], encode_as=("relu",))
