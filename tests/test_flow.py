"""The user's own three commands, through `make`, on a model other than the pipeline's: `make harvest
MODEL=...` then `make train K=...` then `make eval` (and `make browse`) work on what the previous command made."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make(target: str, *variables: str, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(["make", "--no-print-directory", target, *variables], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"make {target}: {r.stderr[-3000:]}"
    return r


def last_line(r: subprocess.CompletedProcess) -> str:
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_harvest_train_eval_chain_through_make(tmp_path, tiny_models, corpus_file):
    data = tmp_path / "data"
    env = dict(os.environ, BATCHTOPK_DATA=str(data), HF_HUB_OFFLINE="1")
    model = str(tiny_models["llama"])
    # the default pipeline is SmolLM2 at layer 15; this harvest names another model, layer and corpus
    h = make("harvest", f"MODEL={model}", "LAYER=1", "TOKENS=65536", f"DATASET={corpus_file}", env=env)
    cache = last_line(h)
    assert cache.startswith(str(data / "cache")) and "-L1-" in cache
    assert json.loads((data / "latest" / "smollm2-135m" / "harvest.json").read_text())["cache"] == cache

    t = make("train", "K=8", "DICT=256", "TOKENS=8192", env=env)
    assert "train: on the cache of the latest `make harvest` of pipeline smollm2-135m" in t.stderr
    sae = Path(last_line(t))
    cfg = json.loads((sae / "cfg.json").read_text())
    md = cfg["metadata"]
    assert md["cache"] == cache and md["hook_name"] == "blocks.1.hook_resid_pre" and md["model_name"] == model
    assert md["dataset_path"] == str(corpus_file) and md["dataset"]["dataset"] == str(corpus_file)
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 256 and md["k"] == 8 and md["training_tokens"] == 8192
    assert [p.name for p in (data / "cache").iterdir() if not p.name.startswith(".")] == [Path(cache).name]

    e = make("eval", env=env)
    assert "evaluate: the 1 SAE(s) of the latest `make train` of pipeline smollm2-135m" in e.stderr
    assert Path(last_line(e)) == sae / "metrics.json"
    m = json.loads((sae / "metrics.json").read_text())
    assert m["architecture"] == "batchtopk" and m["k"] == 8 and m["eval_source"]["cache"] == cache
    assert m["model"] == model and 0 < m["nmse"] < 2 and m["eval_tokens"] == 4096

    b = make("browse", "TOKENS=2048", env=env)
    assert Path(last_line(b)).name == "index.html" and sae.name in last_line(b)

    # a second harvest of the same pipeline (another layer) is what the next `make train` takes
    h2 = make("harvest", f"MODEL={model}", "LAYER=2", "TOKENS=65536", f"DATASET={corpus_file}", env=env)
    t2 = make("train", "K=4", "DICT=128", "TOKENS=4096", env=env)
    md2 = json.loads((Path(last_line(t2)) / "cfg.json").read_text())["metadata"]
    assert md2["cache"] == last_line(h2) != cache and md2["hook_name"] == "blocks.2.hook_resid_pre"


def test_train_says_when_the_latest_cache_is_gone(tmp_path, monkeypatch):
    from batchtopk.core import latest, pipelines
    from batchtopk.core.errors import PipelineError
    from batchtopk.train.cli import _default_cache

    monkeypatch.setattr(pipelines, "DATA_DIR", tmp_path)
    latest.record("p", "harvest", cache=str(tmp_path / "cache" / "gone"), model="m")
    with pytest.raises(PipelineError, match=r"latest `make harvest` of pipeline p wrote .*gone.*CACHE="):
        _default_cache("p")


def test_pointers_are_whole_under_concurrent_writers(tmp_path, monkeypatch):
    """Two commands writing the same pointer at once: a reader always sees one of them whole."""
    import threading
    import time

    from batchtopk.core import latest, pipelines

    monkeypatch.setattr(pipelines, "DATA_DIR", tmp_path)
    stop = threading.Event()
    seen: set[str] = set()

    def write(tag: str) -> None:
        while not stop.is_set():
            latest.record("p", "train", run=tag, saes=[tag] * 200)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for th in threads:
        th.start()
    try:  # read until 300 pointers were seen (the writers may not have written yet at first)
        reads, deadline = 0, time.monotonic() + 60
        while reads < 300 and time.monotonic() < deadline:
            ptr = latest.read("p", "train")
            if ptr is not None:
                assert ptr["saes"] == [ptr["run"]] * 200
                seen.add(ptr["run"])
                reads += 1
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert seen <= {"a", "b"} and seen
    assert not [p for p in (tmp_path / "latest" / "p").iterdir() if p.suffix == ".tmp"]


def test_eval_defaults_to_the_latest_run_then_every_sae(tmp_path, monkeypatch, capsys):
    from batchtopk.core import latest, pipelines
    from batchtopk.evaluate.cli import latest_saes

    monkeypatch.setattr(pipelines, "DATA_DIR", tmp_path)
    import batchtopk.evaluate.run as run
    monkeypatch.setattr(run, "DATA_DIR", tmp_path)
    runs = tmp_path / "saes" / "p"
    for d in ("r1/a", "r1/b", "r2/c"):
        (runs / d).mkdir(parents=True)
        (runs / d / "cfg.json").write_text("{}")
    assert latest_saes("p", "evaluate") == [str(runs / d) for d in ("r1/a", "r1/b", "r2/c")]
    assert "every SAE of pipeline p (3)" in capsys.readouterr().err
    latest.record("p", "train", run=str(runs / "r2"), saes=[str(runs / "r2/c")])
    assert latest_saes("p", "evaluate") == [str(runs / "r2/c")]
    assert "the 1 SAE(s) of the latest `make train` of pipeline p" in capsys.readouterr().err


def test_model_name_is_what_other_tools_load():
    from batchtopk.harvest.models import hub_name

    assert hub_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_name("gemma-2-2b") == "google/gemma-2-2b" and hub_name("gpt2") == "openai-community/gpt2"
    assert hub_name("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m" and hub_name("/models/x") == "/models/x"
