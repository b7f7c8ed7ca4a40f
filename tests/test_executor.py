"""The GPU's program on the CPU: the fixed-shape step, compiled, in bfloat16, against the exact float32 eager step.

Tolerance (after STEPS steps on the same batches, from the same weights): each parameter within WEIGHT_TOL
relative (Frobenius) and the training NMSE within NMSE_TOL relative. bfloat16 keeps 8 bits of mantissa, so
each encoder product's inputs carry a relative error up to 2^-9 (0.2%); Adam divides each gradient by its own
running scale, so that error reaches each update nearly whole, and a pair whose pre-activation sits at the
batch's n·k-th value may be swapped for another. Measured over the matrix below at 30 steps: parameters
0.05-1.2% apart, NMSE at most 0.4%; the tolerances are about twice those, and a wrong gradient (TopK's b_enc
once, in a compiled step) is off by far more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchtopk.train.archs import BATCH_ARCHS
from batchtopk.train.executor import CompiledStep, Executor, compile_limit
from batchtopk.train.sae import SAE, SAEConfig
from batchtopk.train.sparsity import batch_topk, span_topk
from batchtopk.train.stack import SAEStack, StackTrainer

D, M, N, STEPS, LOG = 32, 128, 128, 30, 10
WEIGHT_TOL, NMSE_TOL = 0.025, 0.01
EXACT = Executor("cpu", fixed=False, compiled=False, precision="fp32")
GPU_PROGRAM = Executor("cpu", fixed=True, compiled=True, precision="bf16")


def trainer(arch: str, kw: dict, executor: Executor, dead: int = 12) -> StackTrainer:
    """A stack of 2 SAEs (replicates), its first `dead` latents dead at the start (the auxiliary loss runs; 12 fit
    in the fixed-shape pool of 2·aux_k = 16, where the fixed-shape loss is the exact one)."""
    torch.manual_seed(0)
    saes = [SAE(SAEConfig(arch, D, M, replicate=r, **kw), 0) for r in range(2)]
    st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), 100, 80, executor=executor)
    st.state.since_fired[:, :dead] = 10 ** 6
    return st


def train_both(arch: str, kw: dict, dead: int = 12, keep_dead: bool = False
               ) -> tuple[StackTrainer, StackTrainer, list, list]:
    """The exact fp32 eager step and the GPU's program on the same batches; their log metrics. keep_dead: the
    first `dead` latents are marked dead again before every step."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(N, D, generator=g) * 2 + 0.5 for _ in range(STEPS)]
    runs = []
    for ex in (EXACT, GPU_PROGRAM):
        st = trainer(arch, kw, ex, dead)
        st.stack.init_from_data(xs[0])
        if keep_dead:  # ... and they rarely win a token, though often positive: dead at the log steps too
            with torch.no_grad():
                st.stack.b_enc[:, :dead] -= 3.0
        logs = []
        for i, x in enumerate(xs):
            if keep_dead:
                st.state.since_fired[:, :dead] = 10 ** 6
            logs.append(st.step(x, torch.tensor(i), log=(i + 1) % LOG == 0))
        runs.append((st, [m for m in logs if m]))
    (a, la), (b, lb) = runs
    return a, b, la, lb


CASES = [("batchtopk", {"k": 4, "aux_k": 8}), ("batchtopk", {"k": 4, "aux_k": 8, "span": 16, "aux_batch": True}),
         ("topk", {"k": 4, "aux_k": 8}), ("quantile", {"k": 4, "aux_k": 8}), ("matryoshka", {"k": 4, "aux_k": 8}),
         ("gated", {"l1_coeff": 0.05}), ("jumprelu", {"target_l0": 5.0}), ("relu", {})]


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(kw)}" for a, kw in CASES])
def test_the_gpus_program_matches_the_exact_step(arch, kw):
    """Fixed shapes, compiled (one graph per stack), bfloat16: within the module's tolerance of the exact float32
    eager step after STEPS steps, one compile per stack; BatchTopK, TopK and Matryoshka keep exactly k latents
    per token on average (the tie rule: exactly n·k pairs, even where bfloat16 ties many values)."""
    a, b, la, lb = train_both(arch, kw)
    assert b.compiled is not None and b.compiled.failed is None and b.compile_counts() == {"compiles": 1}
    for name, p in a.stack.named_parameters():
        q = getattr(b.stack, name)
        assert bool(torch.isfinite(q).all()), name
        rel = float((p - q).norm() / p.norm())
        assert rel < WEIGHT_TOL, (name, rel)
        assert not torch.equal(p, q)  # bfloat16 did run
    for ma, mb in zip(la, lb):
        for i in range(2):
            assert mb[i]["nmse"] == pytest.approx(ma[i]["nmse"], rel=NMSE_TOL)
            if arch in ("batchtopk", "topk", "matryoshka"):
                assert ma[i]["l0"] == mb[i]["l0"] == kw["k"]


@pytest.mark.slow
def test_the_gpus_program_through_a_growth_of_the_auxiliary_pool():
    """Half the latents dead: the fixed-shape pool (2·aux_k = 16) grows to 64 at the first log step (16 -> 32 -> 64:
    one more graph, not one per doubling), and the run stays within tolerance of the exact step, whose pool is the
    whole dead set."""
    a, b, la, lb = train_both("topk", {"k": 4, "aux_k": 8}, dead=M // 2, keep_dead=True)
    assert b.stack.aux_pool == 64 and b.compile_counts() == {"compiles": 2}
    assert compile_limit(M, 16) >= 2
    for name, p in a.stack.named_parameters():
        assert float((p - getattr(b.stack, name)).norm() / p.norm()) < WEIGHT_TOL, name
    for ma, mb in zip(la, lb):
        assert mb[1]["nmse"] == pytest.approx(ma[1]["nmse"], rel=NMSE_TOL)


def test_state_keeps_its_storage_across_compiled_steps():
    """Safe under CUDA graphs: every parameter, buffer, optimiser moment and temporary, and every state tensor
    exists before the first compiled call and keeps its storage through compiled and log steps (a CUDA graph
    replays into the memory it captured), and no gradient outlives its step (the graph has no outputs)."""
    st = trainer("batchtopk", {"k": 4, "aux_k": 8}, GPU_PROGRAM)

    def storages() -> dict[str, int]:
        return {f"{owner}.{n}": t.untyped_storage().data_ptr()
                for owner, mod in (("stack", st.stack), ("opt", st.opt), ("state", st.state))
                for n, t in [*mod.named_parameters(), *mod.named_buffers()]}

    before = storages()
    assert {"opt._g", "opt._u", "opt.exp_avg", "opt.exp_avg_sq", "state.theta_sum", "stack.hint"} <= set(before)
    x = torch.randn(N, D)
    for i in range(4):
        st.step(x, torch.tensor(i), log=i == 2)
    assert st.compiled.compiles == 1 and storages() == before
    assert all(p.grad is None for p in st.stack.parameters())  # no gradient outlives a step (nor a replay)


def test_a_failed_compile_says_so_and_the_step_runs_eagerly(capsys):
    """Where compiling fails, one line on stderr, and the same step runs eagerly: training never dies of it."""
    def broken(x, t, keep):
        raise torch._dynamo.exc.Unsupported("no graph today")

    step = CompiledStep(broken, "a test stack", cuda_graphs=False, limit=2)
    step.fn = broken
    assert step(torch.zeros(1), torch.tensor(0), keep=False) is False
    assert step.failed and "compiling the step of a test stack failed (Unsupported" in capsys.readouterr().err
    assert step(torch.zeros(1), torch.tensor(0), keep=False) is False  # not tried again


def test_the_executor_is_chosen_once_from_settings_that_mean_the_same_everywhere():
    from batchtopk.core.errors import PipelineError

    cpu = Executor.choose("cpu")
    assert (cpu.fixed, cpu.compiled, cpu.precision) == (False, False, "fp32")
    assert cpu.name == "exact, eager, fp32 on cpu"
    gpu = Executor.choose("cuda:0")
    assert (gpu.fixed, gpu.compiled, gpu.precision, gpu.cuda_graphs) == (True, True, "bf16", True)
    assert gpu.name == "fixed-shape, compiled (CUDA graphs), bf16 on cuda:0"
    assert Executor.choose("cuda:0", world=2).compiled is False  # DDP: eager, as before
    assert Executor.choose("cpu", "on", precision="bf16") == GPU_PROGRAM
    assert Executor.choose("cpu", fixed_shape="on") == Executor("cpu", True, False, "fp32")
    assert Executor.choose("cuda", "off", precision="fp32") == Executor("cuda", True, False, "fp32")
    with pytest.raises(PipelineError, match="compile=on needs the fixed-shape step"):
        Executor.choose("cpu", "on", "off")
    with pytest.raises(PipelineError, match="precision='fp16'; allowed: auto, fp32, bf16"):
        Executor.choose("cpu", precision="fp16")


def test_bfloat16_ties_keep_exactly_n_k():
    """The tie rule: BatchTopK keeps exactly n·k pairs (span: span·k per group), never every tied value. In
    bfloat16 many pre-activations share the n·k-th value; the kept values are then still the n·k largest, the
    tied ones at the boundary chosen by torch.topk (the same way every time on a device)."""
    torch.manual_seed(7)
    pre = (torch.randn(2, 64, 300) * 0.05).round(decimals=1).to(torch.bfloat16)  # ~9 distinct values
    K = 64 * 8
    kth = pre[0].flatten().float().topk(K).values[-1]
    assert int((pre[0].float() == kth).sum()) > 100  # the boundary value is tied over a hundred times
    for idx in (batch_topk(pre, 8), batch_topk(pre, 8, candidates=1), span_topk(pre, 8, 64)):
        assert idx.shape == (2, K) and (idx[:, 1:] > idx[:, :-1]).all()  # n·k distinct pairs
        for s in range(2):
            kept = pre[s].flatten()[idx[s]].float().sort(descending=True).values
            assert torch.equal(kept, pre[s].flatten().float().sort(descending=True).values[:K])
    assert torch.equal(batch_topk(pre, 8), batch_topk(pre, 8))


def test_a_compiled_bf16_sweep_of_more_stacks_than_the_recompile_limit(tmp_path):
    """Each stack compiles into a cache of its own: with torch's recompile limit lowered to 1, a sweep of two
    stacks (two dictionary sizes) compiles each once and trains to saved SAEs; the log counts the compiles.
    (Before, every stack shared one cache: the second stack hit the limit, and fullgraph made that fatal.)"""
    import json

    import torch._dynamo

    from batchtopk.cache.format import write_cache
    from batchtopk.train.sae import load_sae
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens = np.ones((32, 16), dtype=np.int32)
    tokens[:, 0] = 0  # BOS, left out of training
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.0.hook_resid_pre": rng.standard_normal(
        (512, 16)).astype(np.float32)}, dtype="float32", chunk_seqs=8).location
    saes = [{"arch": "batchtopk", "d_sae": m, "k": 4, "aux_k": 8} for m in (32, 64)]
    t = Trainer(TrainSettings(cache=cache, out=str(tmp_path / "r"), batch_size=64, tokens=64 * 6, saes=saes,
                              device="cpu", val_fraction=0.25, log_every=3, compile="on", precision="bf16",
                              theta_estimator="pooled"))
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete the entry when it undoes)
        dirs = t.run()
    assert len(t.stacks) == 2 and [st.compile_counts() for st in t.stacks] == [{"compiles": 1}] * 2
    assert json.loads((tmp_path / "r" / "run.json").read_text())["executor"] == "fixed-shape, compiled, bf16 on cpu"
    for d in dirs:
        sae, cfg = load_sae(d)
        assert bool(torch.isfinite(sae.W_enc).all()) and cfg["metadata"]["theta"] > 0
        log = [json.loads(line) for line in open(d / "train_log.jsonl")]
        assert [r["compiles"] for r in log] == [1, 1]


@pytest.mark.parametrize("arch", BATCH_ARCHS + ("topk",))
def test_bf16_selection_on_every_k_architecture_is_fixed_shape(arch):
    """The GPU's program uncompiled (fixed shapes, bfloat16 autocast) steps BatchTopK, Matryoshka and TopK on the
    CPU, and its codes keep exactly n·k pairs (here every kept value is positive: L0 is k exactly)."""
    st = trainer(arch, {"k": 4, "aux_k": 8}, Executor("cpu", True, False, "bf16"))
    with torch.no_grad():
        st.stack.b_enc += 5.0  # every pre-activation positive
    m = st.step(torch.randn(N, D), torch.tensor(0), log=True)
    assert [mi["l0"] for mi in m] == [4.0, 4.0]



def test_an_older_torch_says_so_and_runs_the_fixed_shape_step_eagerly(monkeypatch, capsys):
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.12.1+cpu"))
    ex = Executor.choose("cpu", "on", precision="bf16")
    assert (ex.fixed, ex.compiled) == (True, False)
    assert "not compiling (torch 2.12.1+cpu is older than 2.13" in capsys.readouterr().err
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.13.0+cpu"))
    assert Executor.choose("cpu", "on").compiled
