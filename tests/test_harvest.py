"""Harvest: activations equal the model's hidden states; manifest, statistics, resume, verify."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from batchtopk.cache.format import Cache, to_float32
from batchtopk.harvest.run import harvest

ROOT = Path(__file__).resolve().parent.parent


def hidden_states(model_dir: Path, tokens: np.ndarray) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens.astype(np.int64)), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_activations_equal_hidden_states(family, harvest_settings, tiny_models):
    loc = harvest(harvest_settings(family, layers=[1, 2], site_kinds=["resid_pre", "resid_post"]))
    c = Cache.open(loc)
    assert c.sites == ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post",
                       "blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    toks = c.tokens[:]
    assert toks.shape == (64, 32) and (toks[:, 0] == 0).all()  # every context starts with BOS
    hs = hidden_states(tiny_models[family], toks)
    # hidden_states[L] is the input of block L (resid_pre); hidden_states[L+1] its output.
    for site, idx in [("blocks.1.hook_resid_pre", 1), ("blocks.1.hook_resid_post", 2),
                      ("blocks.2.hook_resid_pre", 2), ("blocks.2.hook_resid_post", 3)]:
        got = c.activations(site)[:]
        want = hs[idx].reshape(-1, hs[idx].shape[-1]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=site)


def test_bfloat16_and_float16_storage(harvest_settings, tiny_models):
    ref = Cache.open(harvest(harvest_settings(dtype="float32")))
    x = torch.from_numpy(ref.activations("blocks.1.hook_resid_pre")[:])
    bf = Cache.open(harvest(harvest_settings(dtype="bfloat16")))
    arr = bf.activations("blocks.1.hook_resid_pre")
    assert arr.dtype == np.uint16 and arr.attrs["dtype"] == "bfloat16"
    np.testing.assert_array_equal(to_float32(arr[:], "bfloat16"), x.to(torch.bfloat16).float().numpy())
    f16 = Cache.open(harvest(harvest_settings(dtype="float16")))
    np.testing.assert_array_equal(f16.activations("blocks.1.hook_resid_pre")[:], x.to(torch.float16).numpy())


def test_manifest_and_statistics(harvest_settings):
    s = harvest_settings()
    loc = harvest(s)
    c = Cache.open(loc)
    a = c.attrs
    for key in ("model", "ctx_len", "n_tokens", "sites", "dataset", "complete", "cache_id", "model_identity",
                "code_version", "dtype", "layers"):
        assert key in a, key
    assert a["complete"] is True and a["n_tokens"] == 64 * 32 and a["ctx_len"] == 32
    assert a["dataset"]["files_sha256"] and a["model_identity"]["local_sha256"]
    assert c.n_chunks > 1  # small chunks: several
    x = c.activations("blocks.1.hook_resid_pre")[:].astype(np.float64)
    st = c.stats("blocks.1.hook_resid_pre")
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(st["abs_max"], np.abs(x).max(0))
    np.testing.assert_allclose(st["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
    np.testing.assert_allclose(st["mean_centered_sq_norm"], ((x - x.mean(0)) ** 2).sum(1).mean(), rtol=1e-7)
    # Same settings -> same location, and a second run is a no-op.
    mtime = os.path.getmtime(Path(loc) / "zarr.json")
    assert harvest(harvest_settings()) == loc
    assert os.path.getmtime(Path(loc) / "zarr.json") == mtime
    # Other settings -> another location.
    assert harvest(harvest_settings(tokens=32 * 32)) != loc


def test_verify_reports_flipped_byte(harvest_settings):
    loc = harvest(harvest_settings())
    c = Cache.open(loc)
    assert c.verify() == []
    chunk = Path(loc) / "activations" / "blocks.1.hook_resid_pre" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = c.verify()
    assert len(problems) == 1 and "chunk 1 of blocks.1.hook_resid_pre" in problems[0]
    r = subprocess.run([sys.executable, "-m", "harvest", "verify", loc], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "checksum mismatch" in r.stdout


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harvest", *args]


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(harvest_settings, tiny_models, corpus_file, tmp_path):
    common = ["--model", str(tiny_models["llama"]), "--layer", "1", "--dataset", str(corpus_file),
              "--tokens", str(400 * 32), "--ctx-len", "32", "--dtype", "float32", "--device", "cpu",
              "--batch-size", "2", "--chunk-mb", "0.01"]
    full = subprocess.run(_cli(*common, "--cache-root", str(tmp_path / "a")), capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(_cli(*common, "--cache-root", str(tmp_path / "b")), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    name = Path(full).name
    part = tmp_path / "b" / name
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int((zarr.open_array(part / "checksums", mode="r")[:] != 0).all(1).sum())
        except Exception:
            done = 0
        if done >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Cache.open(str(part), need_complete=False)
    assert not partial.complete and 0 < partial.done_chunks().sum() < partial.n_chunks
    assert (part / ".harvest.lock").exists()  # left behind by the killed writer; stale now
    again = subprocess.run(_cli(*common, "--cache-root", str(tmp_path / "b")), capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
    assert Path(again) == part
    a, b = Cache.open(full), Cache.open(again)
    np.testing.assert_array_equal(a.tokens[:], b.tokens[:])
    np.testing.assert_array_equal(a.activations("blocks.1.hook_resid_pre")[:], b.activations("blocks.1.hook_resid_pre")[:])
    np.testing.assert_array_equal(a.checksums[:], b.checksums[:])
    assert b.verify() == [] and not (part / ".harvest.lock").exists()


def test_stops_after_deepest_layer(tiny_models):
    from transformers import AutoModelForCausalLM

    from batchtopk.harvest.models import SiteCapture, decoder_layers

    m = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ran = []
    for i, block in enumerate(decoder_layers(m)):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))  # runs only if the block ran
    with SiteCapture(m, ["blocks.1.hook_resid_post"]) as cap, torch.no_grad():
        assert cap(torch.zeros(1, 8, dtype=torch.long)) is None
    assert ran == [0, 1]
    ran.clear()
    with SiteCapture(m, ["blocks.2.hook_resid_pre"]) as cap, torch.no_grad():
        cap(torch.zeros(1, 8, dtype=torch.long))
    assert ran == [0, 1]  # block 2 itself never runs


@pytest.mark.slow
def test_smollm2_matches_hidden_states(tmp_path):
    from batchtopk.harvest.models import load_model, resolve_model
    from batchtopk.harvest.settings import HarvestSettings

    loc = harvest(HarvestSettings(tokens=4 * 128, dtype="float32", device="cpu", cache_root=str(tmp_path)))
    c = Cache.open(loc)
    assert c.sites == ["blocks.15.hook_resid_pre"] and c.attrs["model"] == "smollm2-135m"
    m = load_model(resolve_model("smollm2-135m"), "cpu", torch.float32)
    with torch.no_grad():
        hs = m(torch.from_numpy(c.tokens[:].astype(np.int64)), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(c.activations("blocks.15.hook_resid_pre")[:], hs[15].reshape(-1, 576).numpy(),
                               rtol=1e-4, atol=1e-3)


def test_decoder_blocks_and_final_norm_of_each_family(tiny_models):
    """One lookup of a model's parts serves every supported family: its decoder blocks, and the elementwise
    scale of its final norm (Gemma's RMSNorm multiplies by 1 + weight); an unknown model gets one line."""
    from transformers import AutoModelForCausalLM

    from batchtopk.core.errors import PipelineError
    from batchtopk.evaluate.browse import final_norm_scale
    from batchtopk.harvest.models import decoder_layers

    for family, norm in (("gpt2", "transformer.ln_f"), ("llama", "model.norm"), ("gemma2", "model.norm")):
        m = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
        assert len(decoder_layers(m)) == m.config.num_hidden_layers
        w = m.get_submodule(norm).weight.detach().float()
        torch.testing.assert_close(final_norm_scale(m), 1.0 + w if family == "gemma2" else w)
    with pytest.raises(PipelineError, match="unsupported architecture Linear: no decoder block list found"):
        decoder_layers(torch.nn.Linear(2, 2))
