"""A typo in pipelines.yaml, in --set or in a sweep entry stops the command with one line naming the key, where it
is, a close match and the allowed keys (before: `val_fractoin: 0.2` under train was dropped, and 0.05 used)."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from batchtopk.core import pipelines

BASE = {"harvest": {"model": "gpt2", "layers": [1], "tokens": 1024},
        "train": {"arch": "batchtopk", "k": 4, "dict": 64, "val_fraction": 0.25},
        "eval": {"tokens": 256}}


def write_pipeline(tmp_path, monkeypatch, **changes) -> None:
    pipe = {s: dict(v) for s, v in BASE.items()}
    for where, value in changes.items():
        section, _, key = where.partition("__")
        if key:
            pipe[section][key] = value
        else:
            pipe[section] = value
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"default": "p", "pipelines": {"p": pipe}}))
    monkeypatch.setattr(pipelines, "PIPELINES_FILE", path)


def one_line_error(main, args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("section,key,close", [("harvest", "tokns", "tokens"), ("train", "val_fractoin", "val_fraction"),
                                               ("eval", "tokenz", "tokens")])
def test_a_typo_in_each_pipelines_section_is_named(tmp_path, monkeypatch, section, key, close):
    from batchtopk.evaluate.cli import main as evaluate
    from batchtopk.harvest.cli import main as harvest
    from batchtopk.train.cli import main as train

    write_pipeline(tmp_path, monkeypatch, **{f"{section}__{key}": 1})
    main = {"harvest": harvest, "train": train, "eval": evaluate}[section]
    line = one_line_error(main, [])
    assert f"pipelines.yaml, pipeline p, section {section}: unknown key '{key}' (did you mean '{close}'?)" in line
    assert "; allowed: " in line and close in line.split("allowed: ")[1].split(", ")


def test_an_unknown_section_and_a_key_with_no_close_match(tmp_path, monkeypatch):
    from batchtopk.train.cli import main as train

    write_pipeline(tmp_path, monkeypatch, evaluate={"tokens": 1})
    assert "pipelines.yaml, pipeline p: unknown key 'evaluate' (did you mean 'eval'?); allowed: eval, harvest, " \
           "train" in one_line_error(train, [])
    write_pipeline(tmp_path, monkeypatch, train__colour="red")
    line = one_line_error(train, [])
    assert "section train: unknown key 'colour'; allowed: " in line and "did you mean" not in line


def test_a_typo_in_set_and_in_a_sweep_entry_is_named(tmp_path, monkeypatch):
    from batchtopk.cache.format import write_cache
    from batchtopk.train.cli import main as train

    rng = np.random.default_rng(0)
    tokens = np.ones((8, 16), dtype=np.int32)
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.1.hook_resid_pre": rng.standard_normal(
        (128, 8)).astype(np.float32)}, dtype="float32", chunk_seqs=2).location
    write_pipeline(tmp_path, monkeypatch)
    assert "sweep: unknown key 'aux_kk' (did you mean 'aux_k'?); allowed: " in one_line_error(
        train, ["--cache", cache, "--set", "aux_kk=8"])
    write_pipeline(tmp_path, monkeypatch, train={"sweep": [{"arch": "topk", "k": 4, "dict": 64, "grad_clp": 1.0}]})
    assert "sweep: unknown key 'grad_clp' (did you mean 'grad_clip'?)" in one_line_error(train, ["--cache", cache])
