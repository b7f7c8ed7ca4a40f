"""`make bench BENCH_ARGS="--part ops"`: what one training step launches, counted rather than timed.

A TorchDispatchMode sees every aten op a step dispatches below autograd (forward, backward, clipping,
the optimiser step, the dead-latent bookkeeping): the count is deterministic, and ops that read a value
back from the device or whose output shape depends on the data (`.item()`, `nonzero`, ...) are named
by the tags PyTorch gives them. Stacks of 1 and 8 SAEs show whether launches grow with the sweep.
Graph breaks come from torch._dynamo.explain over the same step, and the CPU throughput of a stack
of 8 against 8 stacks of 1 stepped one after another (how a sweep trained before stacks).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchtopk.train.archs import K_ARCHS
from batchtopk.train.kernels import FIXED
from batchtopk.train.sae import SAE, SAEConfig
from batchtopk.train.stack import SAEStack, StackTrainer

from .records import Record, device_name

SHAPE = {"d": 64, "m": 512, "k": 8, "batch": 512}  # small: the counts do not depend on the size
HOST_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: all, those that are not views (about one kernel launch
    each), and those that read back from the device or have a data-dependent output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.non_view = 0
        self.host_reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if not func.is_view:
            self.non_view += 1
        if any(t in func.tags for t in HOST_TAGS) and not _static_index(func, args):
            self.host_reads[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _static_index(func, args) -> bool:
    """aten.index with integer indices has a static output shape (PyTorch tags it for boolean masks)."""
    return (func.overloadpacket is torch.ops.aten.index and len(args) > 1
            and all(i is None or i.dtype not in (torch.bool, torch.uint8) for i in args[1]))


def stack_trainer(arch: str, size: int, d: int, m: int, k: int, dead_fraction: float = 0.25,
                  device: str = "cpu", compile: bool = False) -> StackTrainer:
    """A stack of `size` replicates with a quarter of their latents dead (so the auxiliary loss runs)."""
    torch.manual_seed(0)
    saes = [SAE(SAEConfig(arch, d, m, k=k if arch in K_ARCHS else None, replicate=r,
                          jumprelu_init_l0=k, target_l0=k if arch == "jumprelu" else None)).to(device)
            for r in range(size)]
    st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), total_steps=1000, theta_from=800, compile=compile)
    st.state.since_fired[:, : int(m * dead_fraction)] = 10 ** 9
    return st


def count_step(arch: str, size: int, d: int = SHAPE["d"], m: int = SHAPE["m"], k: int = SHAPE["k"],
               batch: int = SHAPE["batch"]) -> OpCounter:
    """The ops of one non-log training step of a stack (after two warm-up steps), as a GPU or a compiled
    step runs it (the CPU's eager shortcuts, the host-checked BatchTopK hint and the chunked encoding, left out)."""
    st = stack_trainer(arch, size, d, m, k)
    st.stack.kernels = FIXED
    x = torch.randn(batch, d)
    step_t = torch.zeros((), dtype=torch.long)
    for _ in range(2):
        st.step(x, step_t)
        step_t += 1
    counter = OpCounter()
    with counter:
        st.step(x, step_t)
    return counter


def graph_breaks(arch: str, size: int = 1) -> tuple[int, int]:
    """(graphs, graph breaks) of a non-log step under torch.compile(fullgraph=False)."""
    import torch._dynamo

    st = stack_trainer(arch, size, SHAPE["d"], SHAPE["m"], SHAPE["k"])
    st.stack.kernels = FIXED  # as a compiled step runs it
    torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.reset()
    x, step_t = torch.randn(SHAPE["batch"], SHAPE["d"]), torch.zeros((), dtype=torch.long)
    exp = torch._dynamo.explain(lambda x, t: st._step(x, t, keep=False))(x, step_t)
    torch._dynamo.reset()
    return exp.graph_count, exp.graph_break_count


def inductor_kernels(arch: str, size: int) -> int:
    """Kernels inductor generates for a non-log step of a stack (compiled whole, fullgraph)."""
    import torch._dynamo
    import torch._inductor.metrics as metrics

    st = stack_trainer(arch, size, SHAPE["d"], SHAPE["m"], SHAPE["k"], compile=True)
    torch._dynamo.reset()
    metrics.reset()
    x, step_t = torch.randn(SHAPE["batch"], SHAPE["d"]), torch.zeros((), dtype=torch.long)
    st.step(x, step_t)
    n = metrics.generated_kernel_count
    torch._dynamo.reset()
    return n


def pool_growth_compiles(arch: str = "topk", d: int = SHAPE["d"], m: int = SHAPE["m"], k: int = SHAPE["k"],
                         batch: int = SHAPE["batch"], aux_k: int = 8) -> tuple[int, int]:
    """(graphs compiled, the stack's bound) while the auxiliary pool of a compiled stack widens from 2·aux_k to the
    whole dictionary by the slowest road: one doubling per log step (the dead count doubling between them)."""
    from batchtopk.train.executor import Executor

    torch.manual_seed(0)
    saes = [SAE(SAEConfig(arch, d, m, k=k, aux_k=aux_k))]
    st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), 1000, 800, executor=Executor("cpu", True, True, "fp32"))
    x, t, dead = torch.randn(batch, d), torch.zeros((), dtype=torch.long), 2 * aux_k
    while st.stack.aux_pool < m:
        dead = min(m, 2 * dead)
        with torch.no_grad():  # the dead latents rarely win a token: still dead at the log step
            st.stack.b_enc[0, :dead] = -50.0
        for log in (False, False, True):
            st.state.since_fired[0, :dead] = 10 ** 9
            st.step(x, t, log=log)
            t += 1
    st.step(x, t)  # ... and at the whole dictionary
    return st.compiled.compiles, st.compiled.limit


def stacked_throughput(arch: str, size: int, d: int, m: int, k: int, batch: int, steps: int,
                       warmup: int = 3) -> tuple[float, float]:
    """(SAE-tokens/s of one stack of `size`, of `size` stacks of 1 stepped one after another) on the CPU,
    the two timed step by step in turn, so a change in the machine's load weighs on both alike. The first
    `warmup` steps are not timed: the heap of a stack's larger temporaries takes a few steps to settle
    (page faults on new memory until then; one step is enough for a stack of 1)."""
    x = torch.randn(batch, d)
    ways = ([stack_trainer(arch, size, d, m, k)], [stack_trainer(arch, 1, d, m, k) for _ in range(size)])
    step_t = torch.zeros((), dtype=torch.long)
    spent = [0.0, 0.0]
    for i in range(warmup + steps):
        for w, stacks in enumerate(ways):
            t = time.perf_counter()
            for st in stacks:
                st.step(x, step_t)
            spent[w] += (time.perf_counter() - t) if i >= warmup else 0.0
        step_t += 1
    return size * batch * steps / spent[0], size * batch * steps / spent[1]


def run(steps: int = 3, d: int = 576, m: int = 4608, k: int = 32, batch: int = 4096, sizes: tuple[int, ...] = (1, 8),
        archs: tuple[str, ...] = ("batchtopk", "topk")) -> list[Record]:
    dev = device_name("cpu")
    recs: list[Record] = []
    settings: dict[str, Any] = {"counted_at": SHAPE | {"dead_fraction": 0.25}}
    for arch in archs:
        counts = {n: count_step(arch, n) for n in sizes}
        base = counts[sizes[0]]
        for n in sizes:
            c = counts[n]
            recs.append(Record(f"ops per step, {arch} x{n}", c.total, "ops", f"ops per step, {arch} x{sizes[0]}",
                               base.total, dev, settings | {"non_view_ops": c.non_view,
                                                            "ops": dict(c.ops.most_common())}))
            recs.append(Record(f"non-view ops per step, {arch} x{n}", c.non_view, "ops",
                               f"non-view ops per step, {arch} x{sizes[0]}", base.non_view, dev, settings))
            reads = sum(c.host_reads.values())
            recs.append(Record(f"host reads per step, {arch} x{n}", reads, "reads",
                               f"host reads per step, {arch} x{sizes[0]}", sum(base.host_reads.values()), dev,
                               settings | {"ops": dict(c.host_reads)}))
        graphs, breaks = graph_breaks(arch)
        recs.append(Record(f"graph breaks, {arch}", breaks, "breaks", "none (one graph)", 0, dev,
                           settings | {"graphs": graphs}))
        kernels = {n: inductor_kernels(arch, n) for n in sizes}
        for n in sizes:
            recs.append(Record(f"inductor kernels per step, {arch} x{n}", kernels[n], "kernels",
                               f"inductor kernels per step, {arch} x{sizes[0]}", kernels[sizes[0]], dev, settings))
        if arch in K_ARCHS:
            compiles, bound = pool_growth_compiles(arch)
            recs.append(Record(f"compiles, {arch}, pool 16 -> {SHAPE['m']} one doubling at a time", compiles, "graphs",
                               "the stack's compile bound", bound, dev, settings | {"aux_k": 8}))
        big = max(sizes)
        stacked, one_by_one = stacked_throughput(arch, big, d, m, k, batch, steps)
        recs.append(Record(f"train step, {arch}, a stack of {big}", stacked, "SAE-tok/s",
                           f"{big} stacks of 1, one after another", one_by_one, dev,
                           {"d_in": d, "d_sae": m, "k": k, "batch": batch, "steps": steps, "dead_fraction": 0.25}))
    return recs
