"""`make gpu-check`: proves a GPU runs the program users train with (fixed shapes, compiled, CUDA graphs, bfloat16).

1. Every architecture (and BatchTopK with a span and the batch-level auxiliary loss) trains `steps` steps on the
   default path and, from the same weights on the same batches, on the eager float32 step; a crash, a NaN or a
   held-out NMSE more than NMSE_TOL (relative) from float32's fails the check.
2. A sweep of SWEEP_STACKS stacks (as many dictionary sizes) compiles, each stack within its compile bound.
3. Figures at the GPT-2 setting (d 768, 24576 latents, k 32, batches of 4096): tokens/s of one SAE and per SAE of
   a stack of 8, kernel launches and host syncs per step (profiler), compiles, loader-fed against memory-fed
   tokens/s, and peak memory.

Writes data/bench/gpu-check.json (records as every bench part); `--small` runs the same code at toy sizes (the
suite runs it on the CPU). The data: tokens drawn as sparse sums of a random dictionary's unit directions plus
noise, so the SAEs have something to find.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from batchtopk.train.archs import K_ARCHS
from batchtopk.train.executor import Executor
from batchtopk.train.sae import NMSE, SAE, SAEConfig
from batchtopk.train.stack import SAEStack, StackTrainer

from .records import Record, device_name

NMSE_TOL = 0.03      # a held-out NMSE this far (relative) from the float32 eager run's fails the check
SWEEP_STACKS = 12
# the architectures checked (a span of None runs at the batch size / 16)
CASES = [("batchtopk", {}), ("batchtopk", {"span": None, "aux_batch": True}), ("topk", {}), ("quantile", {}),
         ("matryoshka", {}), ("gated", {"l1_coeff": 0.03}), ("jumprelu", {"target_l0": 32.0}),
         ("relu", {"l1_coeff": 0.03})]


@dataclass(frozen=True)
class Sizes:
    d: int
    m: int
    k: int
    batch: int
    steps: int
    perf_m: int       # the throughput figures' dictionary (GPT-2 setting: 24576)
    perf_batch: int
    perf_steps: int


FULL = Sizes(d=768, m=6144, k=32, batch=4096, steps=300, perf_m=24576, perf_batch=4096, perf_steps=50)
SMALL = Sizes(d=32, m=128, k=4, batch=256, steps=30, perf_m=256, perf_batch=256, perf_steps=4)


class Synthetic:
    """Tokens x = Σ a_j u_j + noise over a random dictionary of unit directions u (2·m of them), each token
    drawing about k of them with exponential magnitudes: the same batches for every run made from one seed."""

    def __init__(self, d: int, m: int, k: int, device: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.u = torch.nn.functional.normalize(torch.randn(2 * m, d, generator=g), dim=1).to(device)
        self.k, self.device, self.seed = k, device, seed

    def batch(self, n: int, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        m2 = self.u.shape[0]
        idx = torch.randint(0, m2, (n, self.k), generator=g)
        mag = torch.empty(n, self.k).exponential_(1.0, generator=g)
        f = torch.zeros(n, m2).scatter_add_(1, idx, mag)
        x = f.to(self.device) @ self.u
        return x + 0.05 * torch.randn(x.shape, generator=g).to(self.device)


def _trainer(arch: str, kw: dict, sz: Sizes, m: int, executor: Executor, size: int = 1,
             steps: int = 1000) -> StackTrainer:
    torch.manual_seed(0)
    k = sz.k if arch in K_ARCHS else None
    saes = [SAE(SAEConfig(arch, sz.d, m, k=k, replicate=r, **kw), 0).to(executor.device) for r in range(size)]
    return StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), steps, int(0.8 * steps), executor=executor)


def _heldout_nmse(st: StackTrainer, x: torch.Tensor) -> float:
    sae = st.stack.sae(0)
    with torch.no_grad():
        x_in = sae.normalize(x)[0]
        mode = "batch" if "batch" in sae.modes else sae.modes[0]
        return NMSE().add(x_in, sae.decode_code(sae.code(sae.pre(x_in), mode))).value


def check_architectures(sz: Sizes, device: str, data: Synthetic) -> tuple[list[Record], list[str]]:
    """Part 1: (records, failures)."""
    default = Executor.choose(device, "on", "on", "bf16")
    exact = Executor.choose(device, "off", "auto", "fp32")
    held = data.batch(sz.batch, -1)
    recs, failures = [], []
    for arch, kw in CASES:
        kw = dict(kw, span=sz.batch // 16) if "span" in kw else kw
        label = arch + "".join(f", {k}={v}" for k, v in kw.items())
        out = {}
        for ex in (default, exact):
            try:
                st = _trainer(arch, kw, sz, sz.m, ex, steps=sz.steps)
                st.stack.init_from_data(data.batch(sz.batch, 0))
                t0 = time.perf_counter()
                for i in range(sz.steps):
                    st.step(data.batch(sz.batch, i), torch.tensor(i, device=device), log=(i + 1) % 50 == 0)
                _sync(device)
                out[ex] = (st, _heldout_nmse(st, held), time.perf_counter() - t0)
            except Exception as e:  # a crash fails the check, and the check goes on with the next case
                failures.append(f"{label}: {ex.name} crashed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if len(out) < 2:
            continue
        (st, nmse, secs), (_, ref, _) = out[default], out[exact]
        bad = not math.isfinite(nmse) or abs(nmse - ref) > NMSE_TOL * ref
        counts = st.compile_counts()
        if bad:
            failures.append(f"{label}: held-out NMSE {nmse:.4f} against float32 eager {ref:.4f} (tolerance "
                            f"{NMSE_TOL:.0%})")
        if st.compiled is None or st.compiled.failed:
            failures.append(f"{label}: the step did not compile ({st.compiled.failed if st.compiled else 'off'})")
        recs.append(Record(f"held-out NMSE, {label}", nmse, "NMSE", f"float32 eager ({exact.name})", ref,
                           device_name(device), {"steps": sz.steps, "d": sz.d, "m": sz.m, "k": sz.k,
                                                 "batch": sz.batch, "executor": default.name, "ok": not bad,
                                                 "seconds": round(secs, 2), **counts}))
    return recs, failures


def check_sweep(sz: Sizes, device: str, data: Synthetic) -> tuple[list[Record], list[str]]:
    """Part 2: SWEEP_STACKS stacks of as many dictionary sizes, compiled, a few steps each."""
    ex = Executor.choose(device, "on", "on", "bf16")
    stacks = [_trainer("batchtopk", {}, sz, sz.m + 16 * j, ex) for j in range(SWEEP_STACKS)]
    t0 = time.perf_counter()
    for i in range(3):
        x = data.batch(sz.batch, i)
        for st in stacks:
            st.step(x, torch.tensor(i, device=device))
    _sync(device)
    compiles = sum(st.compile_counts().get("compiles", 0) for st in stacks)
    failed = [st.compiled.failed for st in stacks if st.compiled is None or st.compiled.failed]
    fails = [f"sweep: {len(failed)} of {SWEEP_STACKS} stacks did not compile ({failed[0]})"] if failed else []
    if compiles != SWEEP_STACKS:
        fails.append(f"sweep: {compiles} compiles for {SWEEP_STACKS} stacks (one each expected)")
    return [Record(f"compiles, a sweep of {SWEEP_STACKS} stacks", compiles, "graphs", "stacks", SWEEP_STACKS,
                   device_name(device), {"executor": ex.name, "seconds": round(time.perf_counter() - t0, 2)})], fails


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(st: StackTrainer, batches, steps: int, device: str) -> float:
    """Tokens/s of `steps` non-log steps fed by the iterator `batches` (after 3 warm-up steps)."""
    for i in range(3):
        st.step(next(batches), torch.tensor(i, device=device))
    _sync(device)
    t0, n = time.perf_counter(), 0
    for i in range(steps):
        x = next(batches)
        st.step(x, torch.tensor(3 + i, device=device))
        n += x.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def _profile(st: StackTrainer, x: torch.Tensor, device: str) -> tuple[int, int]:
    """(kernel launches, host syncs) of one non-log step: on CUDA the device's kernels and the runtime's
    synchronising calls; on the CPU the operators the profiler records (a compiled graph is one)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        st.step(x, torch.tensor(99, device=device))
        _sync(device)
    events = prof.events()
    if device.startswith("cuda"):
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        kernels = sum(1 for e in events if e.cpu_parent is None)
    syncs = sum(1 for e in events if "Synchronize" in e.name or "_local_scalar_dense" in e.name)
    return kernels, max(0, syncs - (1 if device.startswith("cuda") else 0))  # less the profile's own sync


def figures(sz: Sizes, device: str, data: Synthetic) -> list[Record]:
    """Part 3: throughput, launches, syncs, loader against memory, peak memory."""
    from batchtopk.cache.format import write_cache
    from batchtopk.cache.split import Rows, Split
    from batchtopk.train.stream import ActivationStream

    ex, eager = Executor.choose(device, "on", "on", "bf16"), Executor.choose(device, "off", "on", "fp32")
    dev, n = device_name(device), sz.perf_batch
    shape = {"d": sz.d, "m": sz.perf_m, "k": sz.k, "batch": n}
    xs = [data.batch(n, i) for i in range(4)]
    mem = lambda: (xs[i % 4] for i in range(10 ** 9))  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    one = _trainer("batchtopk", {}, sz, sz.perf_m, ex)
    rate1 = _rate(one, mem(), sz.perf_steps, device)
    base = _rate(_trainer("batchtopk", {}, sz, sz.perf_m, eager), mem(), max(2, sz.perf_steps // 5), device)
    launches, syncs = _profile(one, xs[0], device)
    e_launches, e_syncs = _profile(_trainer("batchtopk", {}, sz, sz.perf_m, eager), xs[0], device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    eight = _trainer("batchtopk", {}, sz, sz.perf_m, ex, size=8)
    rate8 = _rate(eight, mem(), max(2, sz.perf_steps // 4), device) * 8
    with tempfile.TemporaryDirectory() as tmp:  # the loader: a cache of (perf_steps + 8) batches, float16
        rows = (sz.perf_steps + 8) * n
        ctx = 128 if rows % 128 == 0 else 16
        tokens = np.ones((rows // ctx, ctx), dtype=np.int32)
        acts = torch.cat([data.batch(n, 100 + i) for i in range(rows // n)]).cpu().numpy()
        cache = write_cache(f"{tmp}/c", tokens, {"blocks.0.hook_resid_pre": acts}, dtype="float16",
                            chunk_seqs=max(1, 4096 // ctx))
        split = Split.of(cache, 0.0)
        stream = ActivationStream(Rows(cache, "blocks.0.hook_resid_pre", split, include_bos=True,
                                       include_outliers=True), n, 1.0, device=device)
        fed = stream.batches(0)
        loader = _rate(one, fed, sz.perf_steps, device)  # the same stack, going on: no compile of its own
        fed.close()
    common = shape | {"executor": ex.name, **one.compile_counts()}
    recs = [Record("tokens/s, one SAE", rate1, "tok/s", f"float32 eager ({eager.name})", base, dev, common),
            Record("tokens/s per SAE, stack of 8", rate8, "tok/s", "one SAE", rate1, dev, common),
            Record("kernel launches per step", launches, "launches", "float32 eager", e_launches, dev, common),
            Record("host syncs per step", syncs, "syncs", "float32 eager", max(e_syncs, 1), dev,
                   common | {"eager_syncs": e_syncs}),
            Record("tokens/s, loader-fed", loader, "tok/s", "memory-fed", rate1, dev, common)]
    if peak is not None:
        state = sum(t.numel() * t.element_size() for t in [*one.stack.parameters(), *one.opt.buffers()])
        recs.append(Record("peak GPU memory", peak / 2**30, "GiB", "parameters and Adam state", state / 2**30, dev,
                           common))
    return recs


def run(device: str | None = None, small: bool = False, parts: tuple[str, ...] = ("archs", "sweep", "figures")
        ) -> tuple[list[Record], list[str]]:
    """(records, failures) of the check; an empty failure list is a pass."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sz = SMALL if small else FULL
    data = Synthetic(sz.d, sz.m, sz.k, device)
    recs: list[Record] = []
    failures: list[str] = []
    if "archs" in parts:
        r, f = check_architectures(sz, device, data)
        recs, failures = recs + r, failures + f
    if "sweep" in parts:
        r, f = check_sweep(sz, device, data)
        recs, failures = recs + r, failures + f
    if "figures" in parts:
        recs += figures(sz, device, data)
    return recs, failures
