"""Training throughput with 1 and 2 processes (torchrun, gloo on CPU / NCCL on GPUs)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from batchtopk.cache.format import synthetic_tokens, write_cache
from batchtopk.train.rundir import read_log

from .records import Record, device_name

ROOT = Path(__file__).resolve().parent.parent


def _train(cache: str, out: str, nproc: int, tokens: int, m: int) -> float:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"]
                if nproc > 1 else [sys.executable, "-m"])
    args = ["train", "--cache", cache, "--arch", "topk", "--k", "32", "--dict", str(m), "--tokens", str(tokens),
            "--val-fraction", "0.05", "--out", out, "--log-every", "1000000"]
    subprocess.run(launcher + args, capture_output=True, text=True, check=True, cwd=ROOT)
    [sae] = [p for p in Path(out).iterdir() if p.is_dir()]
    return read_log(sae)[-1]["tokens_per_s"]


def run(d: int = 576, m: int = 4608, tokens: int = 4096 * 12) -> list[Record]:
    n_gpu = torch.cuda.device_count()
    procs = 2
    with tempfile.TemporaryDirectory() as tmp:
        n_seq = 4096 * 14 // 128
        x = np.random.default_rng(0).standard_normal((n_seq * 128, d)).astype(np.float32)
        write_cache(f"{tmp}/c", synthetic_tokens(n_seq), {"s": x}, dtype="float16", chunk_seqs=28)
        one = _train(f"{tmp}/c", f"{tmp}/one", 1, tokens, m)
        two = _train(f"{tmp}/c", f"{tmp}/two", procs, tokens, m)
    dev = device_name("cuda" if n_gpu else "cpu")
    return [Record(f"train tok/s with {procs} processes", two, "tok/s", "1 process", one, dev,
                   {"arch": "topk", "d_in": d, "d_sae": m, "tokens": tokens, "gpus": n_gpu,
                    "backend": "nccl" if n_gpu else "gloo"})]
