"""torch.distributed on CPU (gloo, 2 processes): harvest and data-parallel training."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from batchtopk.cache.format import Cache
from batchtopk.train.sae import load_sae
from batchtopk.train.settings import TrainSettings
from batchtopk.train.trainer import Trainer

pytestmark = pytest.mark.slow  # `make test-fast` leaves these to the whole suite

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return e


@pytest.fixture(scope="module")
def hargs(tiny_models, corpus_file):
    # chunks of 8 sequences, batches of 4: forward batches never straddle a chunk, in any process
    return ["--model", str(tiny_models["llama"]), "--layer", "1", "--dataset", str(corpus_file), "--ctx-len", "32",
            "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--chunk-mb", "0.0625"]


def harvest_cli(args, root, launcher=(sys.executable, "-m")) -> str:
    r = subprocess.run([*launcher, "harvest", *args, "--cache-root", str(root)], capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def assert_same_cache(a: str, b: str) -> None:
    ca, cb = Cache.open(a), Cache.open(b)
    np.testing.assert_array_equal(ca.tokens[:], cb.tokens[:])
    for site in ca.sites:
        np.testing.assert_array_equal(ca.activations(site)[:], cb.activations(site)[:])
    np.testing.assert_array_equal(ca.checksums[:], cb.checksums[:])
    assert ca.attrs["stats"] == cb.attrs["stats"] and cb.verify() == []


def test_distributed_harvest_equals_single(hargs, tmp_path):
    args = [*hargs, "--tokens", str(96 * 32)]
    single = harvest_cli(args, tmp_path / "one")
    multi = harvest_cli(args, tmp_path / "two", launcher=(*TORCHRUN, "-m"))
    assert Path(single).name == Path(multi).name
    assert_same_cache(single, multi)


def test_ddp_topk_stack_matches_single_process(hargs, tmp_path):
    """Two TopK seeds, one stack, under DDP on 2 gloo processes: each ends as the single process's does on
    the same global batches."""
    cache = harvest_cli([*hargs, "--tokens", str(160 * 32)], tmp_path / "c")
    common = ["--cache", cache, "--arch", "topk", "--k", "4", "--dict", "128", "--seeds", "2", "--tokens",
              str(512 * 12), "--batch-size", "512", "--lr", "1e-3", "--device", "cpu", "--val-fraction", "0.2",
              "--stack-size", "2"]
    r = subprocess.run([*TORCHRUN, "-m", "train", *common, "--out", str(tmp_path / "ddp")], capture_output=True,
                       text=True, cwd=ROOT, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp_dirs = [Path(p) for p in r.stdout.strip().splitlines()[-2:]]
    single_dirs = Trainer(TrainSettings(cache=cache, out=str(tmp_path / "single"), saes=[
        {"arch": "topk", "d_sae": 128, "k": 4, "replicate": i} for i in range(2)], tokens=512 * 12, batch_size=512,
        lr=1e-3, device="cpu", val_fraction=0.2, data_parts=2, stack_size=2)).run()
    for ddp_dir, single_dir in zip(ddp_dirs, single_dirs):
        assert ddp_dir.name == single_dir.name
        a, ma = load_sae(ddp_dir)
        b, mb = load_sae(single_dir)
        assert ma["metadata"]["world_size"] == 2 and mb["metadata"]["world_size"] == 1
        for name, p in a.state_dict().items():
            # same global batches; only the order of floating-point sums differs
            torch.testing.assert_close(p, b.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- a failing rank stops every rank
def launch(module: str, args_per_rank: list[list[str]], port: int, **popen) -> list[subprocess.Popen]:
    """Ranks started by hand (as on several machines, with no torchrun agent to stop the others)."""
    procs = []
    for rank, args in enumerate(args_per_rank):
        e = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(args_per_rank)),
                 LOCAL_WORLD_SIZE=str(len(args_per_rank)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen))
    return procs


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(procs, limit: float) -> list[tuple[int, str]]:
    """Wait for every rank; each must be gone within `limit` seconds."""
    out = []
    t0 = time.time()
    for p in procs:
        _, err = p.communicate(timeout=max(1.0, limit - (time.time() - t0)))
        out.append((p.returncode, err))
    return out


def error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_harvest_startup_failure_on_one_rank_stops_both(hargs, tmp_path, bad_rank):
    good = [*hargs, "--tokens", str(96 * 32), "--cache-root", str(tmp_path / "c")]
    bad = [*good[:good.index("--dataset") + 1], str(tmp_path / "missing.txt"), *good[good.index("--dataset") + 2:]]
    args = [bad if r == bad_rank else good for r in range(2)]
    t0 = time.time()
    results = finish(launch("harvest", args, free_port()), 90)
    assert time.time() - t0 < 60 + 15  # start-up included
    for rank, (code, err) in enumerate(results):
        assert code == 2, (rank, err[-1500:])
        [line] = error_lines(err)
        assert "missing.txt" in line, line
        if rank != bad_rank:
            assert line.startswith(f"error: rank {bad_rank} failed:"), line


def test_killed_rank_mid_training_stops_the_other_and_resume_completes(hargs, tmp_path):
    cache = harvest_cli([*hargs, "--tokens", str(160 * 32)], tmp_path / "c")
    common = ["--cache", cache, "--arch", "topk", "--k", "4", "--dict", "128", "--tokens", str(256 * 400),
              "--batch-size", "256", "--lr", "1e-3", "--device", "cpu", "--val-fraction", "0.2",
              "--checkpoint-every", "20", "--out", str(tmp_path / "run")]
    procs = launch("train", [common, common], free_port())
    state = tmp_path / "run" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert state.exists(), [p.communicate()[1][-1500:] for p in procs]
    procs[1].kill()  # SIGKILL: no chance to say anything
    t0 = time.time()
    code, err = finish(procs[:1], 75)[0]
    procs[1].wait()
    assert time.time() - t0 < 60, err[-1500:]
    assert code != 0 and (error_lines(err) or "Connection" in err or "closed" in err), err[-1500:]
    saved = torch.load(state, weights_only=False)
    assert 0 < saved["step"] < 400  # the last checkpoint is intact
    # the same command resumes from it and finishes (a single process here; any number of ranks works)
    r = subprocess.run([sys.executable, "-m", "train", *common], capture_output=True, text=True, cwd=ROOT, env=env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {tmp_path / 'run'} at step {saved['step']}" in r.stderr or "resuming" in r.stderr
    sae, meta = load_sae(r.stdout.strip().splitlines()[-1])
    assert meta["metadata"]["training_tokens"] == 256 * 400


def test_killed_rank_mid_harvest_stops_the_other_and_resume_is_byte_identical(hargs, tmp_path):
    args = [*hargs, "--tokens", str(640 * 32), "--batch-size", "1", "--chunk-mb", "0.016",
            "--cache-root", str(tmp_path / "two")]
    procs = launch("harvest", [args, args], free_port())
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and all(p.poll() is None for p in procs) and done < 6:
        sums = list((tmp_path / "two").glob("*/checksums"))
        try:
            done = int((zarr.open_array(sums[0], mode="r")[:] != 0).all(1).sum()) if sums else 0
        except Exception:
            done = 0
        time.sleep(0.05)
    procs[1].kill()
    t0 = time.time()
    code, err = finish(procs[:1], 75)[0]
    procs[1].wait()
    assert time.time() - t0 < 60 and code != 0, err[-1500:]
    [part] = list((tmp_path / "two").glob("*/zarr.json"))
    c = Cache.open(str(part.parent), need_complete=False)
    assert not c.complete and 0 < c.done_chunks().sum() < c.n_chunks
    assert [p for p in c.verify() if "never written" not in p] == []  # what was written is intact
    resumed = harvest_cli(args[:-2], tmp_path / "two", launcher=(*TORCHRUN, "-m"))
    assert_same_cache(harvest_cli(args[:-2], tmp_path / "one"), resumed)
