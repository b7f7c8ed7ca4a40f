"""Sharing caches through a real S3 API server (moto_server on loopback, IAM auth switched on)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` leaves these to the whole suite

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "team"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("boto3")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield from _configure(endpoint, proc)
    finally:  # the server stops whatever happens, setup failures included
        proc.terminate()
        proc.wait()


def _configure(endpoint: str, proc: subprocess.Popen):
    import boto3

    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
    iam, s3c = boto3.client("iam", **kw), boto3.client("s3", **kw)
    users = {}
    # AWS authorises a listing as s3:ListBucket; moto 5.2.6 checks the operation's name (s3:ListObjectsV2) instead,
    # so the reader is granted both spellings of "list the bucket" (and still nothing that writes)
    reader = ["s3:GetObject", "s3:ListBucket", "s3:HeadObject", "s3:ListObjectsV2", "s3:ListObjects"]
    for name, actions in (("writer", ["s3:*"]), ("reader", reader)):
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[name] = (key["AccessKeyId"], key["SecretAccessKey"])
    s3c.create_bucket(Bucket=BUCKET)
    # From here on every request must carry valid credentials and be allowed by IAM.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                  headers={"Content-Type": "text/plain"}))
    yield {"endpoint": endpoint, "users": users, "proc": proc}


def env_for(s3, user: str | None = "writer", **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3["endpoint"], AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent", AWS_MAX_ATTEMPTS="1",
               HF_HUB_OFFLINE="1")
    if user:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = s3["users"][user]
    env.update(extra)
    return env


def run(module: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def last_line(r) -> str:
    return r.stdout.strip().splitlines()[-1]


def one_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def harvest_args(tiny_models, corpus_file):
    return ["--model", str(tiny_models["llama"]), "--layer", "1", "--dataset", str(corpus_file), "--tokens", "4096",
            "--ctx-len", "32", "--dtype", "float32", "--device", "cpu", "--chunk-mb", "0.05"]


@pytest.fixture(scope="module")
def remote_cache(s3, harvest_args):
    """Two harvests of the same id at once into S3: one writes, the other waits and reuses."""
    env = env_for(s3)
    args = [sys.executable, "-m", "harvest", *harvest_args, "--cache-root", f"s3://{BUCKET}/caches"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    locs = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(locs) == 1
    loc = locs.pop()
    assert loc.startswith(f"s3://{BUCKET}/caches/")
    return loc, outs


def test_concurrent_harvests_share_one_cache(s3, remote_cache, harvest_args):
    loc, outs = remote_cache
    env = env_for(s3)
    assert "ok:" in run("harvest", "verify", loc, env=env).stdout
    # exactly one process did the work; the other waited for it (or found it complete)
    packed = sum("packed 4,096 tokens" in err for _, err in outs)
    assert packed == 1, [err[-800:] for _, err in outs]
    # and a third request is a no-op that prints the location
    again = run("harvest", *harvest_args, "--cache-root", f"s3://{BUCKET}/caches", env=env)
    assert last_line(again) == loc and "packed" not in again.stderr and "harvest" not in again.stderr.lower()


def test_ls_info_and_train_from_s3(s3, remote_cache, tmp_path):
    loc, _ = remote_cache
    env = env_for(s3, "reader")  # consumers only need read access
    ls = run("harvest", "ls", f"s3://{BUCKET}/caches", env=env).stdout
    assert loc in ls and "complete" in ls and "4,096" in ls
    info = run("harvest", "info", loc, env=env).stdout
    assert "complete: True" in info and "n_tokens: 4096" in info
    out = tmp_path / "run"
    r = run("train", "--cache", loc, "--k", "4", "--dict", "128", "--tokens", "2048", "--batch-size", "256",
            "--device", "cpu", "--val-fraction", "0.2", "--out", str(out), "--local-copy", str(tmp_path / "lc"),
            env=env)
    assert Path(last_line(r)).joinpath("sae_weights.safetensors").exists()
    copied = [p for p in (tmp_path / "lc").rglob("*") if p.is_file()]
    assert len(copied) >= 4  # the chunks read (and the metadata) now also live locally


def test_push_pull_and_corruption(s3, remote_cache, tmp_path):
    loc, _ = remote_cache
    env = env_for(s3)
    local = Path(last_line(run("harvest", "pull", loc, str(tmp_path / "local"), env=env)))
    assert local.parent == tmp_path / "local"
    assert "ok:" in run("harvest", "verify", str(local), env=env).stdout
    pushed = last_line(run("harvest", "push", str(local), f"s3://{BUCKET}/mirror", env=env))
    assert pushed == f"s3://{BUCKET}/mirror/{local.name}"
    assert "ok:" in run("harvest", "verify", pushed, env=env).stdout
    # flip a byte of one chunk object in the bucket: verify reports it
    import boto3
    c = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                     aws_access_key_id=s3["users"]["writer"][0], aws_secret_access_key=s3["users"]["writer"][1])
    key = f"mirror/{local.name}/activations/blocks.1.hook_resid_pre/c/1/0"
    body = bytearray(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[10] ^= 0x40
    c.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    bad = run("harvest", "verify", pushed, env=env, check=False)
    assert bad.returncode == 1 and "chunk 1 of blocks.1.hook_resid_pre: checksum mismatch" in bad.stdout
    # a remote holding a different cache under that name is refused, and left as it was
    other = tmp_path / "other" / local.name
    import shutil
    shutil.copytree(local, other)
    import zarr
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["cache_id"] = "0000000000000000"
    msg = one_error(run("harvest", "push", str(other), f"s3://{BUCKET}/mirror", env=env, check=False))
    assert "holds a different cache" in msg
    assert bytearray(c.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == body


def test_credentials_and_permissions(s3, harvest_args, remote_cache, tmp_path):
    loc, _ = remote_cache
    wrong = env_for(s3, None, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="nope")
    assert "access denied" in one_error(run("harvest", "info", loc, env=wrong, check=False))
    none = env_for(s3, None)
    assert "no credentials" in one_error(run("harvest", "ls", f"s3://{BUCKET}/caches", env=none, check=False))
    reader = env_for(s3, "reader")
    msg = one_error(run("harvest", *harvest_args, "--tokens", "2048", "--cache-root", f"s3://{BUCKET}/readonly",
                        env=reader, check=False))
    assert "access denied" in msg
    down = env_for(s3, "writer", AWS_ENDPOINT_URL="http://127.0.0.1:9")
    assert "cannot reach" in one_error(run("harvest", "ls", f"s3://{BUCKET}/caches", env=down, check=False))
    assert "unknown URL scheme 'nosuch'" in one_error(run("harvest", "ls", "nosuch://x/y", env=none, check=False))
