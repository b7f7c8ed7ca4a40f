"""Shared fixtures: tiny random models (GPT-2, Llama, Gemma-2) saved as real model folders."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# commands the tests run write their caches, SAEs and latest-run pointers here, never into the checkout's
# data/ (a pointer left there would make the user's next `make train` pick a test's cache)
os.environ.setdefault("BATCHTOPK_DATA", tempfile.mkdtemp(prefix="batchtopk-test-data-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # two workers: a core each


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first ~3000 lines of WikiText-2 (about 100k characters)."""
    lines = WIKI.read_text(encoding="utf-8").splitlines(keepends=True)[:3000]
    p = tmp_path_factory.mktemp("corpus") / "wiki_small.txt"
    p.write_text("".join(lines), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(d)
    return d


def make_config(family: str):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=1)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma2":
        return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=64,
                            **common)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """family -> folder holding a tiny randomly initialised model and the tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = {}
    for family in ("gpt2", "llama", "gemma2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(family))
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(d)
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        out[family] = d
    return out


@pytest.fixture
def harvest_settings(tmp_path, tiny_models, corpus_file):
    """A factory of HarvestSettings for a tiny model writing under tmp_path."""
    from batchtopk.harvest.settings import HarvestSettings

    def make(family: str = "llama", **kw) -> HarvestSettings:
        base = dict(model=str(tiny_models[family]), layers=[1], site_kinds=["resid_pre"], dataset=str(corpus_file),
                    tokens=64 * 32, ctx_len=32, dtype="float32", device="cpu", batch_size=8, chunk_mb=0.03,
                    cache_root=str(tmp_path / "cache"))
        base.update(kw)
        return HarvestSettings(**base)

    return make
