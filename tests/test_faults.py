"""Faults injected for real: altered and truncated checkpoints, a full disk while saving, concurrent takeovers
of a dead writer's lock, and an object store that drops connections, answers 5xx, stalls or goes away."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from faultproxy import FaultProxy

from batchtopk.cache.format import write_cache
from batchtopk.cache.store import LOCK_NAME, LostLock, WriterLock
from batchtopk.core.errors import PipelineError
from batchtopk.train.cli import main as train_cli
from batchtopk.train.sae import load_sae

pytestmark = pytest.mark.slow  # `make test-fast` leaves these to the whole suite

ROOT = Path(__file__).resolve().parent.parent
SITE = "blocks.0.hook_resid_pre"
BUCKET = "faults"


def one_error(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    return line


# ---------------------------------------------------------------- checkpoints and SAE files
@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * 32, 16)).astype(np.float32)
    tokens = np.ones((64, 32), dtype=np.int32)
    tokens[:, 0] = 0
    return write_cache(str(tmp_path_factory.mktemp("c") / "cache"), tokens, {SITE: x}, chunk_seqs=8).location


def train_args(cache: str, out: Path, tokens: int = 256 * 30) -> list[str]:
    return ["--cache", cache, "--arch", "topk", "--k", "3", "--dict", "32", "--tokens", str(tokens), "--batch-size",
            "256", "--device", "cpu", "--val-fraction", "0.2", "--checkpoint-every", "5", "--out", str(out)]


def interrupted_run(cache: str, out: Path, monkeypatch) -> None:
    """A run stopped after its step-10 checkpoint."""
    from batchtopk.train.stack import StackTrainer
    real = StackTrainer.step

    def stop(self, x, step_t, log=False):
        if int(step_t) == 12:
            raise KeyboardInterrupt
        return real(self, x, step_t, log)

    monkeypatch.setattr(StackTrainer, "step", stop)
    r = CliRunner().invoke(train_cli, train_args(cache, out))
    assert "interrupted at step 12" in one_error(r)
    monkeypatch.setattr(StackTrainer, "step", real)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_gets_one_line(small_cache, tmp_path, monkeypatch, damage):
    out = tmp_path / "run"
    interrupted_run(small_cache, out, monkeypatch)
    state = out / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one bit in the middle of the tensors: torch.load alone would not notice
        data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    msg = one_error(CliRunner().invoke(train_cli, train_args(small_cache, out)))
    assert str(state) in msg and "delete it" in msg and ("unreadable" in msg or "corrupt" in msg), msg
    assert state.read_bytes() == bytes(data)  # left for the user to inspect, not overwritten
    state.unlink()  # what the message says to do: the same command trains again from step 0
    r = CliRunner().invoke(train_cli, train_args(small_cache, out))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("target,damage", [("cfg.json", "truncate"), ("sae_weights.safetensors", "truncate"),
                                           ("sae_weights.safetensors", "flip")])
def test_damaged_sae_files_get_one_line(small_cache, tmp_path, target, damage):
    r = CliRunner().invoke(train_cli, train_args(small_cache, tmp_path / "run", tokens=256 * 6))
    assert r.exit_code == 0, r.output
    d = Path(r.stdout.strip().splitlines()[-1])
    f = d / target
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[-100] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(PipelineError) as e:
        load_sae(d)
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg and ("restore it" in msg and "train it again" in msg), msg
    from batchtopk.evaluate.cli import main as eval_cli
    assert str(f) in one_error(CliRunner().invoke(eval_cli, ["--sae", str(d), "--device", "cpu"]))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(small_cache, out, monkeypatch)
    before = (out / "state.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    msg = one_error(CliRunner().invoke(train_cli, train_args(small_cache, out)))
    assert "disk full" in msg and "resumes" in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "state.pt").read_bytes() == before and not (out / "state.pt.tmp").exists()
    r = CliRunner().invoke(train_cli, train_args(small_cache, out))  # space again: the run resumes and ends
    assert r.exit_code == 0 and "resuming" in r.stderr, r.output


def test_full_disk_while_saving_an_sae_keeps_its_previous_files(small_cache, tmp_path, monkeypatch):
    r = CliRunner().invoke(train_cli, train_args(small_cache, tmp_path / "run", tokens=256 * 6))
    d = Path(r.stdout.strip().splitlines()[-1])
    sae, meta = load_sae(d)
    before = {f: (d / f).read_bytes() for f in ("cfg.json", "sae_weights.safetensors")}
    from batchtopk.train import sae as sae_module
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError):
        sae_module.save_sae(sae, d, meta["metadata"])
    monkeypatch.setattr(Path, "write_bytes", real)
    assert {f: (d / f).read_bytes() for f in before} == before and not list(d.glob("*.tmp"))
    load_sae(d)


# ---------------------------------------------------------------- the writer lock: exactly one takes over
def plant_stale_lock(write, host="a-dead-host") -> None:
    write(json.dumps({"host": host, "pid": 1, "token": "dead", "heartbeat": 0.0}).encode())


def race(location: str, takers: int) -> list[WriterLock]:
    locks = [WriterLock(location) for _ in range(takers)]
    start = threading.Barrier(takers)
    won = [False] * takers

    def take(i):
        start.wait()
        won[i] = locks[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [lk for lk, w in zip(locks, won) if w]


def test_local_lock_takeover_is_atomic(tmp_path):
    for trial in range(25):
        loc = tmp_path / f"cache{trial}"
        loc.mkdir()
        plant_stale_lock((loc / LOCK_NAME).write_bytes)
        winners = race(str(loc), 6)
        assert len(winners) == 1, trial
        assert json.loads((loc / LOCK_NAME).read_text())["token"] == winners[0].owner["token"]
    # a holder presumed dead and replaced finds out at its next heartbeat
    loc = tmp_path / "beat"
    a = WriterLock(str(loc))
    assert a.try_acquire()
    plant_stale_lock((loc / LOCK_NAME).write_bytes)  # as if a's heartbeats had stopped long ago
    b = WriterLock(str(loc))
    assert b.try_acquire()
    with pytest.raises(LostLock):
        a.heartbeat(every_s=-1)


# ---------------------------------------------------------------- a real S3 server, behind a faulty proxy
MOTO = """
import sys, threading
from moto.s3 import responses
# moto checks If-Match / If-None-Match and then writes in two steps; real S3 does both atomically.
_lock = threading.Lock()
for _name in ("put_object", "delete_object"):
    def _atomic(self, *a, _f=getattr(responses.S3Response, _name), **k):
        with _lock:
            return _f(self, *a, **k)
    setattr(responses.S3Response, _name, _atomic)
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    pytest.importorskip("boto3")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket=BUCKET)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def s3_env(endpoint: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="k",
               AWS_SECRET_ACCESS_KEY="s", AWS_EC2_METADATA_DISABLED="true", HF_HUB_OFFLINE="1",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent", **extra)
    return env


def boto(port: int):
    import boto3
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="k", aws_secret_access_key="s")


def test_s3_lock_takeover_is_atomic(moto, monkeypatch):
    for k, v in s3_env(f"http://127.0.0.1:{moto}").items():
        monkeypatch.setenv(k, v)
    c = boto(moto)
    for trial in range(15):
        key = f"locks/t{trial}/{LOCK_NAME}"
        plant_stale_lock(lambda b: c.put_object(Bucket=BUCKET, Key=key, Body=b))
        winners = race(f"s3://{BUCKET}/locks/t{trial}", 5)
        assert len(winners) == 1, trial
        body = json.loads(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert body["token"] == winners[0].owner["token"]
    a = WriterLock(f"s3://{BUCKET}/locks/beat")
    assert a.try_acquire()
    plant_stale_lock(lambda b: c.put_object(Bucket=BUCKET, Key=f"locks/beat/{LOCK_NAME}", Body=b))
    assert WriterLock(f"s3://{BUCKET}/locks/beat").try_acquire()
    with pytest.raises(LostLock):
        a.heartbeat(every_s=-1)


def run(module: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def last_line(r) -> str:
    assert r.returncode == 0, r.stderr[-2500:]
    return r.stdout.strip().splitlines()[-1]


def single_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2500:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2500:]
    return lines[0]


def same_arrays(a: str, b: str, env: dict) -> None:
    code = ("import sys, numpy as np; from batchtopk.cache.format import Cache\n"
            "a, b = Cache.open(sys.argv[1]), Cache.open(sys.argv[2])\n"
            "assert (a.tokens[:] == b.tokens[:]).all() and (a.checksums[:] == b.checksums[:]).all()\n"
            "assert all((a.activations(s)[:] == b.activations(s)[:]).all() for s in a.sites)\n"
            "assert b.verify() == []\n")
    r = subprocess.run([sys.executable, "-c", code, a, b], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def proxy(moto):
    p = FaultProxy(moto)
    yield p
    p.close()


@pytest.fixture(scope="module")
def hargs(tiny_models, corpus_file):
    return ["--model", str(tiny_models["llama"]), "--layer", "1", "--dataset", str(corpus_file), "--tokens",
            str(192 * 32), "--ctx-len", "32", "--dtype", "float32", "--device", "cpu", "--chunk-mb", "0.03",
            "--batch-size", "4"]


@pytest.fixture(scope="module")
def reference(moto, hargs):
    """The same harvest with no faults: what every disturbed run must equal."""
    return last_line(run("harvest", *hargs, "--cache-root", f"s3://{BUCKET}/ref", env=s3_env(f"http://127.0.0.1:{moto}")))


def wait_for_chunks(port: int, prefix: str, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    c = boto(port)
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        keys = c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        if sum("/activations/" in k["Key"] and "/c/" in k["Key"] for k in keys) >= n:
            return
        time.sleep(0.2)


def test_harvest_rides_out_a_flaky_store_and_resumes_after_an_outage(moto, proxy, hargs, reference):
    env = s3_env(proxy.endpoint)
    # flaky: every 4th connection is reset, then 5xx answers, then a stall; retries carry the harvest through
    proc = subprocess.Popen([sys.executable, "-m", "harvest", *hargs, "--cache-root", f"s3://{BUCKET}/flaky"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proxy.fault("drop", every=4)
    wait_for_chunks(moto, "flaky/", 3, proc)
    proxy.fault("5xx", every=3)
    wait_for_chunks(moto, "flaky/", 8, proc)
    proxy.fault("stall", seconds=3, stall_s=2)
    out, err = proc.communicate(timeout=300)
    proxy.fault(None)
    assert proc.returncode == 0, err[-2500:]
    assert proxy.faulted > 0
    same_arrays(reference, out.strip().splitlines()[-1], env)
    # the store goes away mid-harvest: a clear error, bounded in time; the same command then resumes
    proc = subprocess.Popen([sys.executable, "-m", "harvest", *hargs, "--cache-root", f"s3://{BUCKET}/outage"],
                            cwd=ROOT, env=s3_env(proxy.endpoint, AWS_MAX_ATTEMPTS="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_chunks(moto, "outage/", 3, proc)
    proxy.fault("down", seconds=10 ** 6)
    t0 = time.time()
    _, err = proc.communicate(timeout=240)
    proxy.fault(None)
    assert time.time() - t0 < 180
    assert proc.returncode == 2 and "Traceback" not in err, err[-2500:]
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "kept failing" in line or "cannot reach" in line, line
    again = last_line(run("harvest", *hargs, "--cache-root", f"s3://{BUCKET}/outage", env=env))
    same_arrays(reference, again, env)


def test_push_and_pull_survive_faults(moto, proxy, hargs, reference, tmp_path):
    env = s3_env(proxy.endpoint)
    local = last_line(run("harvest", "pull", reference, str(tmp_path / "local"), env=s3_env(f"http://127.0.0.1:{moto}")))
    proxy.fault("drop", every=3)
    pushed = last_line(run("harvest", "push", local, f"s3://{BUCKET}/pushed", env=env))
    proxy.fault("5xx", every=4)
    pulled = last_line(run("harvest", "pull", pushed, str(tmp_path / "back"), env=env))
    proxy.fault(None)
    same_arrays(local, pulled, env)
    # a push the store walks away from: one clear line, nothing published; the rerun finishes it
    proxy.fault("down", seconds=10 ** 6)
    r = run("harvest", "push", local, f"s3://{BUCKET}/half", env=s3_env(proxy.endpoint, AWS_MAX_ATTEMPTS="2"))
    proxy.fault(None)
    assert "kept failing" in single_error(r) or "cannot reach" in single_error(r)
    pushed = last_line(run("harvest", "push", local, f"s3://{BUCKET}/half", env=env))
    same_arrays(local, pushed, env)


def test_training_from_a_remote_cache_resumes_to_the_same_weights(moto, proxy, reference, tmp_path):
    direct = s3_env(f"http://127.0.0.1:{moto}")
    args = ["--cache", reference, "--arch", "batchtopk", "--k", "4", "--dict", "64", "--tokens", str(256 * 40),
            "--batch-size", "256", "--device", "cpu", "--val-fraction", "0.2", "--checkpoint-every", "4",
            "--log-every", "5"]
    ref = last_line(run("train", *args, "--out", str(tmp_path / "ref"), env=direct))
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                            env=s3_env(proxy.endpoint, AWS_MAX_ATTEMPTS="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proxy.fault("drop", every=5)  # flaky while it starts
    deadline = time.time() + 180
    while not (tmp_path / "cut" / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proxy.fault("down", seconds=10 ** 6)  # then gone
    _, err = proc.communicate(timeout=240)
    proxy.fault(None)
    if proc.returncode != 0:  # it may have finished reading before the outage: both are fine
        assert proc.returncode == 2 and "Traceback" not in err, err[-2500:]
    resumed = last_line(run("train", *args, "--out", str(tmp_path / "cut"), env=s3_env(proxy.endpoint)))
    a, _ = load_sae(ref)
    b, _ = load_sae(resumed)
    for name, p in a.state_dict().items():
        torch.testing.assert_close(p, b.state_dict()[name], rtol=0, atol=0, msg=name)
