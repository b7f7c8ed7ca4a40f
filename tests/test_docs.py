"""The docs: tables rendered from JSON (never copied by hand), a README a newcomer can use, and every
command and snippet it shows working."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from batchtopk.docgen import render as docs

ROOT = Path(__file__).resolve().parent.parent


def record(name, value, baseline, base_value, **settings):
    return {"name": name, "value": value, "unit": "NMSE", "baseline": baseline, "baseline_value": base_value,
            "ratio": value / base_value, "device": "cpu (2 cores)", "settings": settings}


def peers_fixture() -> list[dict]:
    common = dict(pipeline="p", site="blocks.1.hook_resid_pre", d_sae=512, k=8, steps=10, batch_size=256,
                  training_tokens=2560, heldout_rows=1000, seeds=1, standardized_mse=0.1, l0=8.0, dead_fraction=0.0)
    out = []
    for impl, lr, bt, tk in (("ours", 1e-3, 0.20, 0.21), ("dictionary_learning 0.1.0", 3.8e-4, 0.25, 0.26),
                             ("dictionary_learning 0.1.0 at our lr 0.001", 1e-3, 0.2002, 0.2101)):
        s = common | {"implementation": impl, "lr": lr}
        out.append(record(f"{impl} batchtopk (batch mode)", bt, "ours batchtopk (batch mode)", 0.20,
                          **s, arch="batchtopk", mode="batch"))
        out.append(record(f"{impl} batchtopk (threshold mode)", bt - 0.001, "ours batchtopk (batch mode)", 0.20,
                          **(s | {"l0": 8.1}), arch="batchtopk", mode="threshold"))
        out.append(record(f"{impl} topk", tk, "ours topk", 0.21, **s, arch="topk", mode="topk"))
    return out


def metrics(arch, k, m, rep, nmse, ce, **kw):
    modes = {"threshold": {"nmse": nmse, "ce_degradation": ce, "l0": float(k), "dead_fraction": 0.01,
                           "standardized_mse": nmse / 2}}
    if arch == "batchtopk":
        modes["batch"] = {"nmse": nmse + 0.001, "ce_degradation": ce, "l0": float(k), "dead_fraction": 0.01,
                          "standardized_mse": nmse / 2}
    row = {"name": f"{arch}_k{k}_m{m}" + (f"_replicate-{rep}" if rep else ""), "config": f"{arch}_k{k}_m{m}",
           "architecture": arch, "k": k if arch != "jumprelu" else None, "d_sae": m, "replicate": rep, "recipe": {},
           "model": "tiny", "site": "blocks.1.hook_resid_pre", "training_tokens": 2560, "eval_tokens": 1024,
           "lr": 1e-3, "nmse": nmse, "ce_degradation": ce, "l0": float(k), "dead_fraction": 0.01,
           "standardized_mse": nmse / 2, "kl_div": 0.1, "modes": modes, "theta_estimator": "unseen"}
    if arch == "batchtopk":
        row["heldout_l0"] = {"mean": k * 1.005, "standard_error": 0.01 * k, "rows": 900,
                             "at_estimates": {"pooled": k * 1.02, "unseen": k * 1.005}}
    return row | kw


def summary_fixture() -> list[dict]:
    rows = []
    for rep, (b, t) in enumerate(((0.200, 0.210), (0.202, 0.211), (0.201, 0.213))):
        rows += [metrics("batchtopk", 8, 512, rep, b, 0.3), metrics("topk", 8, 512, rep, t, 0.32)]
    rows.append(metrics("jumprelu", 8, 512, 0, 0.22, 0.35, target_l0=8, l0=8.05))
    return rows


@pytest.fixture
def fixture_root(tmp_path):
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    (tmp_path / "docs" / "paper").mkdir(parents=True)
    (tmp_path / "docs" / "bench" / "peers.json").write_text(json.dumps(peers_fixture()))
    (tmp_path / "docs" / "paper" / "summary.json").write_text(json.dumps(summary_fixture()))
    (tmp_path / "docs" / "bench" / "ablation.json").write_text(json.dumps(
        [record("batchtopk: defaults", 0.2, "batchtopk: defaults", 0.2),
         record("batchtopk: --norm token", 0.19, "batchtopk: defaults", 0.2)]))
    return tmp_path


def rows_of(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_tables_render_from_json_and_only_between_markers(fixture_root):
    md = fixture_root / "README.md"
    md.write_text("intro 0.9999\n<!-- table: headline -->\nstale 0.1234\n<!-- /table -->\n"
                  "<!-- table: peers docs/bench/peers.json -->\n<!-- /table -->\n"
                  "<!-- table: pairs docs/paper/summary.json -->\n<!-- /table -->\n"
                  "<!-- table: ablation docs/bench/ablation.json -->\n<!-- /table -->\noutro\n")
    assert docs.render_all(fixture_root, files=("README.md",)) == ["README.md"]
    text = md.read_text()
    assert text.startswith("intro 0.9999\n") and text.endswith("outro\n") and "stale" not in text
    # headline: every peer at its lr and at ours, and the paired BatchTopK - TopK of the paper run
    assert rows_of(text, "dictionary_learning 0.1.0 at our lr")[0][:4] == \
        ["dictionary_learning 0.1.0 at our lr 0.001", "0.001", "0.2002", "0.2101"]
    assert rows_of(text, "dictionary_learning 0.1.0 |")[0][1] == "0.00038"
    paper, pair = rows_of(text, "512 | 8 | 3")  # the headline's row, then the pairs table's
    diffs = np.array([0.200 - 0.210, 0.202 - 0.211, 0.201 - 0.213])
    rel = np.mean(np.array([0.200, 0.202, 0.201]) / np.array([0.210, 0.211, 0.213]) - 1)
    assert paper[3] == "0.2010" and paper[4] == f"{np.mean([0.210, 0.211, 0.213]):.4f}"
    assert paper[5].startswith(f"{rel:+.1%}")
    # the pairs table: mean ± sd of the three paired differences
    assert pair[3].startswith(f"{diffs.mean():+.4f} ± {diffs.std(ddof=1):.4f}")
    # the generated sentence on equal learning rates: a tie within 1%
    assert ("At our learning rate: dictionary_learning 0.1.0's BatchTopK 0.2002 against our 0.2000 (+0.1%), "
            "TopK 0.2101 against our 0.2100 (+0.0%). Within 1%, the recipes tie") in text
    # the peers table keeps threshold mode with its L0
    assert rows_of(text, "ours |")[1][3] == "0.1990 (8.1)"  # [0] is the headline's row
    assert rows_of(text, "batchtopk: --norm token")[0][1:] == ["0.1900", "batchtopk: defaults", "-5.0%"]
    # rendering again changes nothing; a changed JSON changes the table
    assert docs.render_all(fixture_root, files=("README.md",)) == []
    recs = peers_fixture()
    recs[0]["value"] = 0.1990
    (fixture_root / "docs" / "bench" / "peers.json").write_text(json.dumps(recs))
    assert docs.render_all(fixture_root, files=("README.md",), write=False) == ["README.md"]


def test_equal_lr_sentence_claims_a_tie_only_within_the_tolerance(fixture_root):
    recs = peers_fixture()
    assert "and at ours, so a recipe is told apart" in docs.render_headline(root=fixture_root)
    (fixture_root / "docs" / "bench" / "peers.json").write_text(json.dumps(
        [r for r in recs if "at our lr" not in r["settings"]["implementation"]]))
    head = docs.render_headline(root=fixture_root)  # without runs at our lr, no claim that there are
    assert "this file has no run at ours" in head and "and at ours" not in head and "At our learning rate" not in head
    assert "the recipes tie" in docs.equal_lr(recs)
    # the runs at our lr made apart (--peer-lr ours --out ours-lr): the sentence comes from that file
    (fixture_root / "docs" / "bench" / "peers-ours-lr.json").write_text(json.dumps(
        [r for r in recs if "at our lr" in r["settings"]["implementation"] or
         r["settings"]["implementation"] == "ours"]))
    head = docs.render_headline(root=fixture_root)
    assert "a run of each at ours on the same batches (`docs/bench/peers-ours-lr.json`)" in head
    assert "At our learning rate: dictionary_learning 0.1.0's BatchTopK 0.2002 against our 0.2000" in head
    assert "this file has no run at ours" not in head and not rows_of(head, "dictionary_learning 0.1.0 at our lr")
    recs[6]["value"] = 0.2100  # dictionary_learning's BatchTopK at our lr: 5% behind ours
    text = docs.equal_lr(recs)
    assert "BatchTopK 0.2100 against our 0.2000 (+5.0%)" in text and "tie" not in text
    assert docs.equal_lr([r for r in recs if "at our lr" not in r["settings"]["implementation"]]) == ""


def test_committed_docs_are_rendered_from_the_committed_json():
    """README.md and docs/*.md hold exactly what `make docs` renders: no table is edited by hand or stale."""
    assert docs.render_all(write=False) == [], "run `make docs`"


def test_swapped_activations_table(fixture_root):
    """Each SAE's own NMSE / CE beside the other architecture's activation, the change paired over seeds."""
    rows = summary_fixture()
    for r in rows:
        if r["architecture"] == "topk":
            r["encoded_as"] = {"batchtopk": {"theta": 1.0, "modes": {
                "batch": {"nmse": r["nmse"] * 1.10, "ce_degradation": 0.5, "l0": 8.0},
                "threshold": {"nmse": r["nmse"] * 1.20, "ce_degradation": 0.6, "l0": 8.3}}}}
        elif r["architecture"] == "batchtopk":
            r["encoded_as"] = {"topk": {"modes": {"topk": {"nmse": r["nmse"] * (1.3 + r["replicate"] / 100),
                                                           "ce_degradation": 0.7, "l0": 8.0}}}}
    (fixture_root / "docs" / "paper" / "summary.json").write_text(json.dumps(rows))
    [row] = rows_of(docs.render_swapped("docs/paper/summary.json", fixture_root), "512 | 8 | 3")
    own_topk = np.mean([0.210, 0.211, 0.213])
    assert row[3] == f"{own_topk:.4f} / 0.320"
    assert row[4] == f"{own_topk * 1.1:.4f} (+10.0% ± 0.0%) / 0.500"
    assert row[5] == f"{own_topk * 1.2:.4f} (+20.0% ± 0.0%, L0 8.3) / 0.600"
    assert row[6] == f"{np.mean([0.200, 0.202, 0.201]):.4f} / 0.300"
    assert row[7].startswith("0.2633 (+31.0% ± 1.0%)")
    from batchtopk.core.errors import PipelineError

    (fixture_root / "docs" / "paper" / "summary.json").write_text(json.dumps(summary_fixture()))
    with pytest.raises(PipelineError, match="no SAE scored with another architecture's activation"):
        docs.render_swapped("docs/paper/summary.json", fixture_root)


def test_variants_table_pairs_each_change_with_its_default(fixture_root):
    rows = summary_fixture()
    for rep, (b, q) in enumerate(((0.210, 0.205), (0.212, 0.207), (0.211, 0.206))):
        rows.append(metrics("batchtopk", 8, 512, rep, b, 0.33, config="batchtopk_k8_m512_span-16",
                            recipe={"span": 16}, name=f"span{rep}"))
        rows.append(metrics("quantile", 8, 512, rep, q, 0.29, name=f"q{rep}"))
    for r in rows:  # dead latents halfway through training, from the SAEs' training logs
        if r["architecture"] == "batchtopk":
            r["dead_in_training"] = {"half": 0.04 if r["recipe"] else 0.02, "end": 0.0}
    (fixture_root / "docs" / "paper" / "summary.json").write_text(json.dumps(rows))
    text = docs.render_variants("docs/paper/summary.json", fixture_root)
    [span] = rows_of(text, "span-16")
    [quantile] = rows_of(text, "quantile")
    own = [0.200, 0.202, 0.201]  # the default BatchTopK's NMSE, seed by seed
    rel = np.array([0.210, 0.212, 0.211]) / own - 1
    assert span[1:5] == ["batchtopk_k8_m512", "512", "8", "3"]
    assert span[5] == "0.2110" and span[6] == f"{rel.mean():+.1%} ± {rel.std(ddof=1):.1%}"
    assert quantile[1] == "batchtopk_k8_m512" and quantile[5] == "0.2060"
    assert span[10] == "4.0% / 2.0%" and span[11] == "1.0% / 1.0%"
    assert quantile[8].startswith(f"{0.29 / 0.3 - 1:+.1%}") and quantile[10] == "–" and quantile[11] == "1.0% / 1.0%"
    assert not rows_of(text, "batchtopk_k8_m512 |")  # a default configuration is no change


def test_unknown_table_and_missing_json_are_one_line_errors(fixture_root):
    from batchtopk.core.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown table kind 'plots'; allowed: headline"):
        docs.rendered("<!-- table: plots x -->\n<!-- /table -->", "x.md", fixture_root)
    with pytest.raises(PipelineError, match="missing.json does not exist"):
        docs.rendered("<!-- table: peers docs/missing.json -->\n<!-- /table -->", "x.md", fixture_root)


def test_options_tables_come_from_the_declarations():
    text = docs.render_options("train")
    [k] = rows_of(text, "`k`")
    assert k[1] == "`--k`" and k[2] == "main" and k[5] == "yes"
    [norm] = rows_of(text, "`norm`")
    assert norm[2] == "recipe" and norm[3] == "`global`"
    [shuffle] = rows_of(text, "`shuffle_mb`")
    assert shuffle[1] == "pipelines.yaml only" and shuffle[5] == "when set"
    assert not rows_of(text, "`cache`")  # set by the command itself, not a user setting
    harvest = docs.render_options("harvest")
    assert rows_of(harvest, "`sites`")[0][1] == "pipelines.yaml only"  # the file's `sites` are kinds
    assert rows_of(harvest, "`cache_root`")[0][3] == "`data/cache`"


def test_readme_is_short_and_its_commands_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    makefile = (ROOT / "Makefile").read_text()
    for target in sorted(set(re.findall(r"`make ([a-z-]+)", text))):
        assert re.search(rf"^{target}:", makefile, re.M), f"README shows `make {target}`, the Makefile has no target"
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md|LICENSE)\)", text):
        assert (ROOT / link).exists(), link
    assert "<!-- table: headline -->" in text and "make demo" in text and "make test" in text


def test_readme_python_snippets_run(tmp_path):
    """The README's two snippets, run on a tiny trained SAE: ours and SAELens's load it and agree."""
    pytest.importorskip("sae_lens")
    import torch

    from batchtopk.cache.format import write_cache
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens = np.ones((48, 32), dtype=np.int32)
    tokens[:, 0] = 0
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.0.hook_resid_pre": rng.standard_normal(
        (48 * 32, 16)).astype(np.float32)}, dtype="float32", chunk_seqs=8).location
    [sae_dir] = Trainer(TrainSettings(cache=cache, out=str(tmp_path / "run"), batch_size=256, tokens=256 * 4,
                                      saes=[{"arch": "batchtopk", "d_sae": 64, "k": 4}], device="cpu",
                                      val_fraction=0.25)).run()
    text = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 2
    x = torch.randn(10, 16)
    env = {"x": x}
    for code in snippets:
        exec(re.sub(r'"data/saes/[^"]+"', repr(str(sae_dir)), code), env)  # noqa: S102
    assert env["f"].shape == (10, 64) and env["x_hat"].shape == (10, 16)
    torch.testing.assert_close(env["sae"].encode(x), env["f"], rtol=1e-4, atol=1e-4)  # SAELens's, then ours


def test_peers_table_adds_matryoshka_and_gated_rows_when_measured():
    from batchtopk.docgen.render import _newer_archs

    def rec(impl, arch, mode, value, **settings):
        return {"value": value, "settings": {"implementation": impl, "arch": arch, "mode": mode, "lr": 1e-3,
                                             "l0": 32.0, "dead_fraction": 0.01} | settings}
    assert _newer_archs([rec("ours", "batchtopk", "batch", 0.2)]) == ""
    out = _newer_archs([rec("ours", "matryoshka", "batch", 0.21), rec("ours", "matryoshka", "threshold", 0.2),
                        rec("ours", "gated", "gated", 0.25, coeff_brackets=[[0.03, 0.01]]),
                        rec("dl", "gated", "gated", float("nan"), coeff_brackets=[None])])
    lines = out.splitlines()
    assert lines[2] == "| ours | 0.001 | 0.2100 | 0.2000 (32.0) | 1.0% | 0.2500 | 1.0% | 0.03–0.01 |"
    assert lines[3] == "| dl | 0.001 | – | – | – | – | – | – |"
    assert "against the best peer" not in out  # the peer's Gated never reached L0 = k: nothing to compare
    out = _newer_archs([rec("ours", "matryoshka", "batch", 0.21), rec("dl", "matryoshka", "batch", 0.2, dead_fraction=0.05),
                        rec("sl", "matryoshka", "batch", 0.3)])
    assert out.rstrip().endswith(" Matryoshka: ours 0.2100 against the best peer's 0.2000 (dl, +5.0%); latents silent "
                                 "1.0% against 5.0%.")


def test_a_peers_file_of_matryoshka_only_renders_its_own_table(tmp_path):
    import json

    from batchtopk.docgen.render import render_peers

    common = {"pipeline": "p", "site": "s", "d_sae": 64, "k": 4, "steps": 3, "batch_size": 8, "training_tokens": 24,
              "seeds": 1, "heldout_rows": 10, "lr": 1e-3, "l0": 4.0, "dead_fraction": 0.0, "standardized_mse": 0.1}
    recs = [{"value": v, "settings": common | {"implementation": impl, "arch": "matryoshka", "mode": "batch"}}
            for impl, v in (("ours", 0.2), ("dl", 0.3))]
    (tmp_path / "m.json").write_text(json.dumps(recs))
    out = render_peers("m.json", root=tmp_path)
    assert "BatchTopK NMSE" not in out and "| ours | 0.001 | 0.2000 | – | 0.0% | – | – | – |" in out
    assert out.rstrip().endswith("p cache, s, 64 latents, k = 4, 3 steps of 8 (24 tokens), one seed, NMSE on the same "
                                 "10 held-out rows; `m.json`.")


def test_a_later_peers_file_replaces_the_rows_it_measured_again(tmp_path):
    import json

    from batchtopk.core.errors import PipelineError
    from batchtopk.docgen.render import render_peers

    common = {"pipeline": "p", "site": "s", "d_sae": 64, "k": 4, "steps": 3, "batch_size": 8, "training_tokens": 24,
              "seeds": 1, "heldout_rows": 10, "lr": 1e-3, "l0": 4.0, "dead_fraction": 0.0, "standardized_mse": 0.1}

    def rec(impl, arch, mode, v, **kw):
        return {"value": v, "settings": common | {"implementation": impl, "arch": arch, "mode": mode} | kw}
    (tmp_path / "a.json").write_text(json.dumps([rec("ours", "matryoshka", "batch", 0.2),
                                                 rec("ours", "gated", "gated", 0.25, dead_fraction=0.2),
                                                 rec("dl", "gated", "gated", 0.3, dead_fraction=0.01,
                                                     dead_in_training_fraction=0.0009)]))
    (tmp_path / "b.json").write_text(json.dumps([rec("ours", "gated", "gated", 0.24, dead_fraction=0.001,
                                                     dead_in_training_fraction=0.0004)]))
    out = render_peers("a.json b.json", root=tmp_path)
    lines = out.splitlines()
    assert lines[2] == "| ours | 0.001 | 0.2000 | – | 0.0% | 0.2400 | 0.1% (0.04%) | – |" and "0.2500" not in out
    assert lines[3] == "| dl | 0.001 | – | – | – | 0.3000 | 1.0% (0.09%) | – |"
    assert ("Gated: ours 0.2400 against the best peer's 0.3000 (dl, -20.0%); latents silent 0.1% against 1.0%, "
            "never fired in training 0.04% against 0.09%.") in out
    assert out.rstrip().endswith("10 held-out rows; `a.json`, `b.json`.")
    (tmp_path / "c.json").write_text(json.dumps([rec("ours", "gated", "gated", 0.24) | {
        "settings": common | {"implementation": "ours", "arch": "gated", "mode": "gated", "steps": 5}}]))
    with pytest.raises(PipelineError, match="c.json measures another budget than a.json .*5 steps of 8"):
        render_peers("a.json c.json", root=tmp_path)
