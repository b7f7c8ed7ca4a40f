"""Feature absorption (SAEBench's first-letter method) on synthetic activations where it is known, and end to
end on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from batchtopk.evaluate.absorption import LETTERS, absorption, train_probe, word_absorption

D, MARKERS = 64, 10  # letters in dims 0..25, absorbing-token markers in 26..35, noise beyond


def synthetic(per_letter: int = 40, absorbed: int = MARKERS, seed: int = 0):
    """Words of 26 letters: x = 3 e_letter + noise. The last `absorbed` test words of 'a' also carry a token of
    their own (a marker dimension): for them the SAE's latent of that token fires instead of 'a''s main
    latent, with a decoder row along 3 e_a + 2 e_marker (it reconstructs them exactly: full absorption)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(LETTERS)).repeat_interleave(per_letter)
    x = torch.zeros(len(y), D)
    x[torch.arange(len(y)), y] = 3.0
    x[:, 26 + MARKERS:] = 0.3 * torch.randn(len(y), D - 26 - MARKERS, generator=g)
    test = (torch.arange(len(y)) % per_letter) >= per_letter // 2  # half of each letter's words held out
    a_test = torch.nonzero(test & (y == 0)).squeeze(1)
    hit = a_test[-absorbed:]
    x[hit, 26 + torch.arange(absorbed)] = 2.0
    W_dec = torch.zeros(26 + MARKERS, D)
    W_dec[:26, :26] = torch.eye(26)
    for j in range(MARKERS):
        v = torch.zeros(D)
        v[0], v[26 + j] = 3.0, 2.0
        W_dec[26 + j] = v / v.norm()

    def encode(x: torch.Tensor) -> torch.Tensor:
        marked = x[:, 26:26 + MARKERS]
        tokens = marked.relu() / 2.0 * (3 ** 2 + 2 ** 2) ** 0.5       # the token latents, at their exact size
        letters = x[:, :26].relu() * (marked.abs().sum(1, keepdim=True) == 0)  # silent where a token latent fires
        return torch.cat([letters, tokens], 1)
    return x, y, test, encode, W_dec, len(hit)


def test_absorption_is_found_exactly_where_it_was_put():
    x, y, test, encode, W_dec, n_hit = synthetic()
    probe = train_probe(x[~test], y[~test], x[test], y[test])
    assert probe.accuracy == 1.0 and min(probe.f1) == 1.0
    out = absorption(encode, W_dec, probe, x[~test], y[~test], x[test], y[test])
    a = out["per_letter"]["a"]
    assert a["main_latents"] == [0] and a["words"] == 20  # the token latents never fire on training words
    assert a["full_absorption"] == pytest.approx(n_hit / 20) and a["absorption_fraction"] == pytest.approx(n_hit / 20)
    others = [v for k, v in out["per_letter"].items() if k != "a"]
    assert all(v["full_absorption"] == 0 == v["absorption_fraction"] and v["main_latents"] == [LETTERS.index(k)]
               for k, v in out["per_letter"].items() if k != "a") and len(others) == 25
    assert out["trusted"] and out["letters"] == 26
    assert out["mean_full_absorption"] == pytest.approx(n_hit / 20 / 26)


def test_partial_absorption_counts_the_share_the_main_latents_miss():
    """A main latent at a quarter of its size beside an absorbing latent carrying the rest: fraction 3/4, and
    no full absorption (the main latent is not silent)."""
    p = torch.zeros(4)
    p[0] = 1.0
    W_dec = torch.eye(4)
    W_dec[1] = torch.tensor([0.8, 0.6, 0.0, 0.0])
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0]])
    f = torch.tensor([[1.0, 3.75, 0.0, 0.0]])  # main: 1 along p; the absorber: 3.75 * 0.8 = 3 along p
    frac, full = word_absorption(f, x, p, W_dec, [0])
    assert float(frac[0]) == pytest.approx(0.75) and not bool(full[0])
    frac, full = word_absorption(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), x, p, W_dec, [0])
    assert float(frac[0]) == 1.0 and bool(full[0])
    # an absorber that carries too little of the probe's projection (< 40%) is not absorption
    frac, full = word_absorption(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), x, p, W_dec, [0])
    assert float(frac[0]) == 0.0 and not bool(full[0])


@pytest.fixture(scope="module")
def tiny_cache_and_sae(tmp_path_factory, corpus_file):
    """A Matryoshka SAE trained on layer 2 of a tiny random Llama whose tokenizer has enough whole words (a BPE
    of 2048 tokens learned on the corpus)."""
    from conftest import make_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from batchtopk.harvest.run import harvest
    from batchtopk.harvest.settings import HarvestSettings
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("absorption")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus_file)], trainers.BpeTrainer(vocab_size=2048, special_tokens=["<bos>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = make_config("llama")
    config.vocab_size = 2048
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(tmp / "model")
    loc = harvest(HarvestSettings(model=str(tmp / "model"), layers=[2], dataset=str(corpus_file),
                                  tokens=64 * 32, ctx_len=32, dtype="float32", device="cpu", batch_size=16,
                                  chunk_mb=0.05, cache_root=str(tmp / "cache")))
    [d] = Trainer(TrainSettings(cache=loc, out=str(tmp / "run"), batch_size=256, tokens=256 * 4, device="cpu",
                                saes=[{"arch": "matryoshka", "d_sae": 128, "k": 4}], val_fraction=0.25)).run()
    return d


@pytest.mark.slow
def test_absorption_command_on_a_tiny_model(tiny_cache_and_sae):
    """`python -m evaluate absorption` writes absorption.json beside the SAE, with the probe's own accuracy and
    whether it can be trusted (a random model: it cannot)."""
    from click.testing import CliRunner

    from batchtopk.evaluate.cli import main

    sae_dir = tiny_cache_and_sae
    r = CliRunner().invoke(main, ["absorption", "--sae", str(sae_dir), "--words", "600", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads((sae_dir / "absorption.json").read_text())
    assert r.stdout.strip().splitlines()[-1] == str(sae_dir / "absorption.json")
    assert out["probe"]["words"] >= 100 and 0 <= out["probe"]["probe_accuracy"] <= 1
    assert out["trusted"] is False and out["letters"] < 20
    # the report shows it beside the probe's accuracy
    from batchtopk.evaluate.report import write_report
    assert CliRunner().invoke(main, ["--sae", str(sae_dir), "--tokens", "256", "--device", "cpu"]).exit_code == 0
    report = write_report("tiny", [str(sae_dir)], str(sae_dir.parent / "report")).read_text()
    section = report.split("## Feature absorption")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| matryoshka_k4_m128 | matryoshka |"))
    frac = out["mean_absorption_fraction"]  # none when no letter's probe reaches F1 0.6
    assert f"| {frac if frac is not None else float('nan'):.3g} |" in row and row.endswith(
        f"| {out['letters']} | {out['probe']['probe_accuracy']:.3f} | no |")
    bad = CliRunner().invoke(main, ["absorption", "--sae", str(sae_dir), "--words", "20"])
    assert bad.exit_code == 2 and "--words 20: the first-letter probe needs at least 100 words" in bad.stderr
