"""Bad input to harvest: a one-line error naming the problem, exit code 2, nothing lost."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from batchtopk.cache.format import Cache
from batchtopk.harvest.cli import main


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def base_args(tiny_models, corpus_file, tmp_path):
    return ["--model", str(tiny_models["llama"]), "--dataset", str(corpus_file), "--tokens", "1024",
            "--ctx-len", "32", "--device", "cpu", "--cache-root", str(tmp_path / "cache")]


def test_unknown_model(base_args):
    msg = error_line(run_cli(*base_args, "--model", "no-such-model"))
    assert "unknown model 'no-such-model'" in msg and "smollm2-135m" in msg


def test_layer_out_of_range(base_args):
    msg = error_line(run_cli(*base_args, "--layer", "7"))
    assert "layer 7 out of range" in msg and "0..3" in msg


def test_unknown_site(base_args):
    assert "unknown site kind 'resid_mid'" in error_line(run_cli(*base_args, "--layer", "1", "--site", "resid_mid"))
    assert "unknown site 'blocks.1.hook_foo'" in error_line(run_cli(*base_args, "--site", "blocks.1.hook_foo"))


def test_missing_text_column(base_args, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"content": "hello world " * 50, "id": i}) for i in range(5)))
    msg = error_line(run_cli(*base_args, "--layer", "1", "--dataset", str(f)))
    assert "no column 'text'" in msg and "content, id" in msg


def test_empty_corpus(base_args, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert "is empty" in error_line(run_cli(*base_args, "--layer", "1", "--dataset", str(f)))


def test_too_few_tokens(base_args):
    msg = error_line(run_cli(*base_args, "--layer", "1", "--tokens", "100000000"))
    assert "fewer than the 100000000 asked for" in msg and "TOKENS=all" in msg


def test_ctx_len_beyond_model(base_args):
    assert "exceeds the model's maximum context of 256" in error_line(run_cli(*base_args, "--layer", "1",
                                                                              "--ctx-len", "512"))


def test_location_with_other_settings_is_refused(base_args, tmp_path):
    out = str(tmp_path / "mine")
    first = run_cli(*base_args, "--layer", "1", "--out", out)
    assert first.exit_code == 0, first.output
    before = Cache.open(out).activations("blocks.1.hook_resid_pre")[:]
    msg = error_line(run_cli(*base_args, "--layer", "2", "--out", out))
    assert "different settings" in msg and "refusing" in msg
    c = Cache.open(out)
    assert c.sites == ["blocks.1.hook_resid_pre"] and (c.activations("blocks.1.hook_resid_pre")[:] == before).all()
    other = tmp_path / "notacache"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert "is not a cache" in error_line(run_cli(*base_args, "--layer", "1", "--out", str(other)))
    assert (other / "precious.txt").read_text() == "keep me"


def test_float16_overflow_names_site(base_args, tiny_models, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path / "hot-model"
    shutil.copytree(tiny_models["llama"], d)
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(1e6)  # residual stream far beyond float16's 65504
    m.save_pretrained(d)
    msg = error_line(run_cli(*base_args, "--model", str(d), "--layer", "1", "--dtype", "float16"))
    assert "non-finite activations" in msg and "blocks.1.hook_resid_pre" in msg and "float32 or bfloat16" in msg
    assert run_cli(*base_args, "--model", str(d), "--layer", "1", "--dtype", "float32").exit_code == 0


def test_full_disk_keeps_what_was_written(base_args, monkeypatch):
    import batchtopk.harvest.run as run

    calls = {"n": 0}
    real = run.chunk_hash

    def failing(block, *algorithm):
        calls["n"] += block.dtype.kind == "f"
        if calls["n"] > 3:  # three activation chunks written, then the disk fills up
            raise OSError(28, "No space left on device", "chunk")
        return real(block, *algorithm)

    monkeypatch.setattr(run, "chunk_hash", failing)
    msg = error_line(run_cli(*base_args, "--layer", "1", "--chunk-mb", "0.01"))
    assert "disk full" in msg and "resumes" in msg
    monkeypatch.setattr(run, "chunk_hash", real)
    ok = run_cli(*base_args, "--layer", "1", "--chunk-mb", "0.01")
    assert ok.exit_code == 0
    assert Cache.open(ok.stdout.strip().splitlines()[-1]).verify() == []


def test_bad_tokens_value(base_args):
    assert "positive integer or 'all'" in error_line(run_cli(*base_args, "--tokens", "lots"))


def test_a_waiting_harvest_takes_another_writers_first_files_for_work_in_progress(tmp_path):
    """Two harvests of one cache at once: the one waiting for the lock sees the writer's first files (no
    metadata yet, or metadata without the manifest) and keeps waiting; only a writer holding the lock refuses
    a location that holds something else."""
    import types

    import zarr

    from batchtopk.core.errors import PipelineError
    from batchtopk.harvest.run import _existing

    p = types.SimpleNamespace(location=str(tmp_path / "c"), identity={"model": "m"})
    (tmp_path / "c" / "tokens").mkdir(parents=True)
    (tmp_path / "c" / "tokens" / "c0").write_bytes(b"x")
    assert _existing(p, strict=False) is None
    with pytest.raises(PipelineError, match="exists and is not a cache"):
        _existing(p)
    zarr.open_group(str(tmp_path / "c"), mode="a")  # the writer's group, before its manifest
    assert _existing(p, strict=False) is None
    with pytest.raises(PipelineError):
        _existing(p)
