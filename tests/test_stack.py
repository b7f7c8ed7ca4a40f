"""Stacks: SAEs of one shape trained as one fixed-shape step, with nothing read back from the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchtopk.bench.ops import OpCounter, count_step, stack_trainer
from batchtopk.bench.train_bench import dense_losses
from batchtopk.core.errors import PipelineError
from batchtopk.train.archs import K_ARCHS
from batchtopk.train.kernels import EXACT, FIXED
from batchtopk.train.sae import SAE, SAEConfig, load_sae
from batchtopk.train.sparsity import batch_topk
from batchtopk.train.stack import SAEStack, StackKey, stack_configs

D, M = 16, 96


def brute_top(pre: torch.Tensor, K: int) -> torch.Tensor:
    """The K largest values of pre, sorted (the values any exact selection keeps, whatever its ties)."""
    return pre.flatten().sort(descending=True).values[:K]


@pytest.mark.parametrize("candidates", [None, 1, 2])
@pytest.mark.parametrize("case", ["random", "skewed", "ties"])
def test_batch_topk_is_exact_with_fixed_shape(case, candidates):
    torch.manual_seed(0)
    pre = torch.randn(3, 64, 300)
    if case == "skewed":  # one token holds far more of the batch's top values than its candidates
        pre[0, 3] += 50
        pre[2, :5] += 3
    if case == "ties":  # a few distinct values: the n·k-th largest is tied many times over
        pre = torch.randint(-3, 4, (3, 64, 300)).float()
    idx = batch_topk(pre, 8, candidates)
    assert idx.shape == (3, 64 * 8) and (idx[:, 1:] > idx[:, :-1]).all()  # sorted, no repeats
    for s in range(3):
        kept = pre[s].flatten()[idx[s]]
        torch.testing.assert_close(kept.sort(descending=True).values, brute_top(pre[s], 64 * 8), rtol=0, atol=0)
        if case != "ties":  # no ties: the set itself is the brute-force one
            assert set(idx[s].tolist()) == set(pre[s].flatten().topk(64 * 8).indices.tolist())
    assert torch.equal(idx, batch_topk(pre, 8, candidates))  # ties broken the same way every time
    if case == "skewed":
        assert int((idx[0] // 300 == 3).sum()) == 300  # the hot token got all its latents


@pytest.mark.parametrize("case", ["random", "ties"])
def test_span_selection_is_batch_topk_within_each_group(case):
    """Span s: the s·k largest of each group of s consecutive tokens; span 1 keeps each token's top k
    (TopK's constraint), span n is the whole batch's selection."""
    from batchtopk.train.sparsity import span_topk, topk_rows

    torch.manual_seed(3)
    pre = torch.randn(2, 64, 300) if case == "random" else torch.randint(-3, 4, (2, 64, 300)).float()
    idx = span_topk(pre, 8, 16)
    assert idx.shape == (2, 64 * 8) and (idx[:, 1:] > idx[:, :-1]).all()
    for s in range(2):
        rows = idx[s] // 300
        for g in range(4):
            mine = idx[s][(rows >= 16 * g) & (rows < 16 * (g + 1))]
            assert len(mine) == 16 * 8  # exactly span·k pairs in each group
            torch.testing.assert_close(pre[s].flatten()[mine].sort(descending=True).values,
                                       brute_top(pre[s, 16 * g:16 * (g + 1)], 16 * 8), rtol=0, atol=0)
    if case == "random":
        assert torch.equal(span_topk(pre, 8, 1), topk_rows(pre, 8).sort(dim=1).values)
        assert torch.equal(span_topk(pre, 8, 64), batch_topk(pre, 8))


def test_span_and_aux_batch_settings_say_what_is_allowed(tmp_path):
    with pytest.raises(PipelineError, match="span=16: a BatchTopK setting.*this SAE is topk"):
        SAEConfig("topk", D, M, k=4, span=16)
    with pytest.raises(PipelineError, match="span=0: a BatchTopK setting, a positive number"):
        SAEConfig("batchtopk", D, M, k=4, span=0)
    with pytest.raises(PipelineError, match="aux_batch applies to batchtopk, topk, quantile, matryoshka SAEs .*not relu"):
        SAEConfig("relu", D, M, aux_batch=True)
    assert SAEConfig("batchtopk", D, M, k=4, span=16).name == "batchtopk_k4_m96_span-16"
    assert SAEConfig("topk", D, M, k=4, aux_batch=True).name == "topk_k4_m96_aux_batch-1"
    assert StackKey.of(SAEConfig("batchtopk", D, M, k=4, span=16)) != StackKey.of(SAEConfig("batchtopk", D, M, k=4))
    from batchtopk.cache.format import write_cache
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens = np.ones((16, 16), dtype=np.int32)
    tokens[:, 0] = 0  # BOS, left out of training
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.0.hook_resid_pre": rng.standard_normal(
        (256, D)).astype(np.float32)}, dtype="float32", chunk_seqs=4).location
    with pytest.raises(PipelineError, match=r"batchtopk_k4_m96_span-48: span=48 must divide the 64 tokens each "
                                            r"process steps on .* allowed: a divisor of 64"):
        Trainer(TrainSettings(cache=cache, out=str(tmp_path / "r"), batch_size=64, tokens=128, device="cpu",
                              saes=[{"arch": "batchtopk", "d_sae": M, "k": 4, "span": 48}], val_fraction=0.25))


def test_the_cpus_hinted_selection_is_exact_or_says_so():
    """The CPU's shortcut: the n·k largest entries at or above a hint, exact when between n·k and
    2·n·k - 1 entries pass (ok), flagged otherwise; a stack that uses it falls back to the exact selection."""
    from batchtopk.train.sparsity import batch_topk_hinted

    torch.manual_seed(5)
    for n in (64, 60):  # blocks of 8 tokens screened by their maximum, or (60) every entry
        pre = torch.randn(2, n, 300)
        pre[1, :, :7] += 2.5  # a few latents hold most of the second SAE's top values (whole blocks pass)
        K = n * 8
        kth = torch.stack([p.flatten().topk(K).values[-1] for p in pre])
        for factor, ok in ((0.95, True), (1.05, False), (-10.0, False)):  # near below, above, far below
            hint = torch.where(kth > 0, kth * factor, kth / factor) if factor > 0 else torch.full((2,), -10.0)
            idx, flags, peak = batch_topk_hinted(pre, 8, hint)
            assert flags.tolist() == [ok, ok]
            assert torch.equal(peak, pre.amax(1))  # each latent's largest value, whatever the hint
            if ok:
                assert torch.equal(idx, batch_topk(pre, 8))
            else:
                assert bool((idx == -1).all())
    ties = torch.randint(-3, 4, (1, 64, 300)).float()  # the n·k-th value tied many times over
    assert 64 * 32 <= int((ties == 3).sum()) < 2 * 64 * 32  # the hint passes the 3s, more than n·k of them
    idx, flags, _ = batch_topk_hinted(ties, 32, torch.tensor([2.5]))
    assert flags.tolist() == [True] and (idx[:, 1:] > idx[:, :-1]).all()
    torch.testing.assert_close(ties[0].flatten()[idx[0]], torch.full((64 * 32,), 3.0), rtol=0, atol=0)
    st = stack_trainer("batchtopk", 2, D, M, 4)
    assert st.stack.kernels is EXACT  # the CPU, uncompiled
    x = torch.randn(64, D)
    for i in range(3):  # the first batch has no hint (-inf: every entry passes): the exact path, then the hint
        with torch.no_grad():
            pre = torch.baddbmm(st.stack.b_enc[:, None, :], st.stack.normalize(x), st.stack.W_enc)
        idx, peak = st.stack.arch.select(st.stack, pre, slice(None))
        assert torch.equal(idx, batch_topk(pre, 4)) and torch.equal(peak, pre.amax(1))
        assert bool(torch.isfinite(st.stack.hint).all())
        st.step(x, torch.tensor(i))


@pytest.mark.parametrize("aux_batch", [False, True])
def test_the_cpus_auxiliary_pool_selects_only_where_it_must(aux_batch):
    """The CPU, uncompiled, reads every dead latent (a pool as wide as the most dead latents of an SAE), and
    selects each token's top aux_k of the pool only for the tokens with more than aux_k positive entries (for
    the others the relu keeps what the selection would): the same block as the fixed-shape selection from a
    pool wide enough, with tokens of both kinds."""
    torch.manual_seed(3)
    saes = [SAE(SAEConfig("topk", D, M, k=4, aux_k=6, aux_batch=aux_batch, replicate=r)) for r in range(2)]
    stack = SAEStack(saes, 1e-3, (0.9, 0.99))
    pre = torch.randn(2, 64, M)
    pre[:, :20] = pre[:, :20].abs() + 0.1  # tokens with far more than aux_k positive entries ...
    pre[:, 20:40] = -pre[:, 20:40].abs()   # ... and with none
    for dead in (torch.rand(2, M) < 0.5, torch.arange(M).expand(2, M) % 40 == 7):  # about 48 dead, or 3
        width = int(dead.sum(1).max())
        stack.aux_pool = 12
        assert stack.grow_aux_pool(width) == (width > 12)
        assert stack.aux_pool == (12 if width <= 12 else 96 if width > 48 else 48)  # doubled, at most d_sae
        dense = []
        for eager in (False, True):
            stack.kernels = EXACT if eager else FIXED
            cols, block = stack._aux_pool(pre.clone(), dead, stack.kernels.aux_width(stack, dead))
            assert block.shape == (2, 64, width if eager else stack.aux_pool)
            given = stack._aux_pool(pre.clone(), dead, stack.kernels.aux_width(stack, dead), pre.amax(1))  # the selection's peaks
            assert torch.equal(given[0], cols) and torch.equal(given[1], block)
            dense.append(torch.zeros(2, 64, M).scatter_(2, cols[:, None, :].expand(block.shape), block))
        assert torch.equal(dense[0], dense[1]) and bool((dense[0][:, :20] > 0).any())
        if not aux_batch and width > 12:
            assert ((dense[0] > 0).sum(2)[:, :20] == 6).all() and (dense[0][:, 20:40] == 0).all()


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "quantile", "matryoshka"])
def test_encoding_a_few_saes_at_a_time_changes_nothing(arch, monkeypatch):
    """The CPU reads the pre-activations one chunk of SAEs at a time (the exact kernels): the same kept pairs,
    auxiliary pool, losses and updated weights as the whole stack at once (as a GPU runs it)."""
    import batchtopk.train.kernels as kernels_mod

    x = torch.randn(64, D)
    runs = []
    for eager, budget in ((False, kernels_mod.CPU_PRE_BYTES), (True, 2 * 64 * M * 4)):  # chunks of 2 SAEs of 3
        monkeypatch.setattr(kernels_mod, "CPU_PRE_BYTES", budget)
        st = stack_trainer(arch, 3, D, M, 4)
        st.stack.kernels = EXACT if eager else FIXED
        logs = [st.step(x + 0.1 * i, torch.tensor(i), log=True) for i in range(3)]
        runs.append((logs, {k: v.clone() for k, v in st.stack.state_dict().items()}, st.state.since_fired.clone()))
    (la, wa, fa), (lb, wb, fb) = runs
    assert la[0][0]["aux"] > 0  # a quarter dead: the auxiliary loss ran
    for sa, sb in zip(la, lb):
        for ra, rb in zip(sa, sb):
            assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(fa, fb)


# every architecture with the settings that change its math (tests/test_archs.py keeps every architecture here)
REFERENCE_CASES = [("batchtopk", {"k": 4}), ("topk", {"k": 4}), ("jumprelu", {"target_l0": 5.0}),
                   ("jumprelu", {"preact_coeff": 1e-3}),
                   ("relu", {}), ("batchtopk", {"k": 4, "center": True, "norm": "token"}),
                   ("topk", {"k": 4, "aux_norm": True, "mse": "mean"}),
                   ("batchtopk", {"k": 4, "span": 16}), ("batchtopk", {"k": 4, "span": 1}),
                   ("batchtopk", {"k": 4, "aux_batch": True, "aux_k": 32}),
                   ("topk", {"k": 4, "aux_batch": True, "aux_k": 32}), ("quantile", {"k": 4}),
                   ("matryoshka", {"k": 4}), ("matryoshka", {"k": 4, "groups": (8, 24, 64)}),
                   ("matryoshka", {"k": 8, "center": True}),  # the dense decoding of the prefixes
                   ("gated", {"l1_coeff": 0.05}), ("gated", {"center": True, "norm": "token"})]


@pytest.mark.parametrize("arch,kw", REFERENCE_CASES)
@pytest.mark.parametrize("eager", [False, True])
def test_losses_and_gradients_equal_the_dense_reference(arch, kw, eager):
    """Each SAE of a stack gets the losses and gradients of the textbook dense implementation, with a
    different set of dead latents per SAE (fewer than the auxiliary pool: the exact regime), as a GPU or a
    compiled step computes them and as the CPU's uncompiled shortcuts do (eager)."""
    torch.manual_seed(1)
    saes = [SAE(SAEConfig(arch, D, M, replicate=r, **kw), 0) for r in range(3)]
    x = torch.randn(64, D) * 2 + 1
    for s in saes:
        s.input_scale.fill_(0.7)
        s.init_from_data(s.normalize(x)[0])
    stack = SAEStack(saes, 1e-3, (0.9, 0.99))
    stack.kernels = EXACT if eager else FIXED
    if arch == "quantile":  # a threshold each SAE's 1.5·n·k-th largest pre-activation (inside its capacity, 2·n·k)
        with torch.no_grad():
            for i, s in enumerate(saes):
                s.theta.fill_(s.pre(s.normalize(x)[0]).flatten().sort(descending=True).values[int(1.5 * 64 * 4)])
                stack.threshold[i] = s.theta
    since = torch.zeros(3, M, dtype=torch.long)
    since[0, :20] = since[1, :60] = 10 ** 6
    out, *_ = stack.losses(x, since, stack.coeff)
    out["loss"].sum().backward()
    for i, s in enumerate(saes):
        dead = since[i] >= s.cfg.dead_tokens
        ref = dense_losses(s, s.normalize(x)[0], dead if arch in K_ARCHS else None)
        assert float(out["loss"][i]) == pytest.approx(float(ref), rel=1e-5)
        ref.backward()
        for name, p in s.named_parameters():
            torch.testing.assert_close(getattr(stack, name).grad[i], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_aux_pool_is_exact_up_to_its_size_and_fixed_beyond():
    """The fixed-shape auxiliary loss reads a pool of 2·aux_k dead latents: the per-token top aux_k of all dead
    latents while they fit in it; beyond, the same amount of work on the pool's latents until the pool grows.
    The CPU, uncompiled, reads them all."""
    torch.manual_seed(2)
    sae = SAE(SAEConfig("topk", D, M, k=4, aux_k=8), 0)
    x = torch.randn(64, D)
    stack = SAEStack([sae], 1e-3, (0.9, 0.99))
    for n_dead, grow, eager, exact in ((16, 0, False, True), (40, 0, False, False), (40, 40, False, True),
                                       (40, 0, True, True), (90, 0, True, True)):
        stack.aux_pool, stack.kernels = 16, EXACT if eager else FIXED
        stack.grow_aux_pool(grow)
        since = torch.zeros(1, M, dtype=torch.long)
        since[0, :n_dead] = 10 ** 6
        aux = float(stack.losses(x, since, stack.coeff)[0]["aux"][0])
        ref = float(dense_losses(sae, x, since[0] >= sae.cfg.dead_tokens) - dense_losses(sae, x, None))
        assert (aux == pytest.approx(ref, rel=1e-4)) == exact and aux > 0


def test_the_pool_grows_at_log_steps_and_resumes_at_its_width():
    """A log step widens the fixed-shape pool to hold the most dead latents of an SAE (doubling), a saved state
    keeps the width, and a compiled step follows the new width (compiled once more) and equals eager."""
    from batchtopk.train.stack import StackTrainer

    def trainer(compile: bool = False) -> StackTrainer:
        torch.manual_seed(0)
        saes = [SAE(SAEConfig("topk", D, M, k=4, aux_k=8, replicate=r)) for r in range(2)]
        st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), total_steps=100, theta_from=80, compile=compile)
        st.stack.kernels = FIXED  # the fixed-shape path, as on a GPU
        return st

    torch.manual_seed(4)
    x = torch.randn(64, D)
    runs = []
    for compile in (False, True):
        st = trainer(compile)
        assert st.stack.aux_pool == 16  # 2·aux_k
        st.stack.init_from_data(x)
        with torch.no_grad():  # 40 latents of the second SAE that rarely win a token, but are often positive
            st.stack.b_enc[1, :40] -= 1.5
        t = torch.zeros((), dtype=torch.long)
        for i in range(4):
            st.state.since_fired[1, :40] = 10 ** 6  # dead as each step starts
            metrics = st.step(x, t, log=i == 1)
            t += 1
            if metrics:  # those that did not fire in this step are dead at its end
                dead = metrics[1]["dead"]
                assert 32 < dead <= 40 and metrics[0]["dead"] == 0
            assert st.stack.aux_pool == (16 if i < 1 else 64)
        runs.append([p.detach().clone() for p in st.stack.parameters()])
        sd = st.state_dict()
        assert sd["aux_pool"] == 64
        again = trainer()
        again.load_state_dict(sd)
        assert again.stack.aux_pool == 64
        del sd["aux_pool"]  # a checkpoint from before the pool grew
        again = trainer()
        again.load_state_dict(sd)
        assert again.stack.aux_pool == 16
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_stack_of_n_trains_like_n_alone(tmp_path):
    """A sweep trained as one stack ends with the weights of each SAE trained alone on the same batches
    (different lr, betas, clipping, aux coefficient and schedules inside the stack), saved alike."""
    from batchtopk.cache.format import write_cache
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens = np.ones((64, 32), dtype=np.int32)
    tokens[:, 0] = 0
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.0.hook_resid_pre": rng.standard_normal(
        (64 * 32, D)).astype(np.float32) * 3}, dtype="float32", chunk_seqs=8).location
    sweep = [{"arch": "batchtopk", "d_sae": M, "k": 4},
             {"arch": "batchtopk", "d_sae": M, "k": 4, "replicate": 1, "lr": 3e-3, "betas": (0.0, 0.999),
              "grad_clip": None, "aux_coeff": 0.5, "warmup": 0.2, "decay": 0.3},
             {"arch": "batchtopk", "d_sae": M, "k": 4, "replicate": 2, "grad_clip": 0.01, "dead_tokens": 256},
             {"arch": "gated", "d_sae": M, "l1_coeff": 3.0, "lr": 0.3, "resample": 0.2},  # resamples after steps 2, 4, 6
             {"arch": "gated", "d_sae": M, "l1_coeff": 1.0, "lr": 0.3, "replicate": 1, "resample": 0.25}]  # 3, 6

    def run(saes, out):
        t = Trainer(TrainSettings(cache=cache, out=str(tmp_path / out), batch_size=256, tokens=256 * 12, saes=saes,
                                  device="cpu", val_fraction=0.25, log_every=4, stack_size=8))
        return t, t.run()

    together, dirs = run(sweep, "stack")
    assert [st.stack.size for st in together.stacks] == [3, 2]
    for i, cfg in enumerate(sweep):
        alone, [d] = run([cfg], f"alone{i}")
        assert len(alone.stacks) == 1 and alone.stacks[0].stack.size == 1
        a, ma = load_sae(dirs[i])
        b, mb = load_sae(d)
        for name, p in a.state_dict().items():
            torch.testing.assert_close(p, b.state_dict()[name], rtol=1e-4, atol=1e-5, msg=f"{i} {name}")
        assert (ma["metadata"]["theta"] or 0) == pytest.approx(mb["metadata"]["theta"] or 0, rel=1e-4)
        logs = [[__import__("json").loads(x) for x in open(p / "train_log.jsonl")] for p in (dirs[i], d)]
        assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [4, 8, 12]
        for ra, rb in zip(*logs):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4) and ra["lr_factor"] == rb["lr_factor"]
            assert ra.get("resampled") == rb.get("resampled")
        if cfg["arch"] == "gated":  # latents were resampled, the same ones
            assert logs[0][-1]["resampled"] > 0


def test_no_host_read_and_no_growth_with_the_stack():
    """A non-log step reads nothing back from the device and has no data-dependent shape, and a stack of
    8 dispatches exactly the ops of a stack of 1."""
    for arch in ("batchtopk", "topk", "jumprelu", "relu", "matryoshka", "gated"):
        one, eight = count_step(arch, 1), count_step(arch, 8)
        assert sum(one.host_reads.values()) == 0 == sum(eight.host_reads.values()), (arch, one.host_reads)
        assert one.ops == eight.ops and one.total > 100, arch
    # the counter does see a read-back: a step with an .item() in it is caught
    st = stack_trainer("batchtopk", 1, D, M, 4)
    st.stack.kernels = FIXED
    x, t = torch.randn(64, D), torch.zeros((), dtype=torch.long)
    with OpCounter() as c:
        st.step(x, t)
        float(st.state.since_fired.max())
        st.state.since_fired.nonzero()
    assert c.host_reads == {"aten._local_scalar_dense": 1, "aten.nonzero": 1}


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "quantile", "matryoshka", "gated"])
def test_the_step_is_one_graph(arch):
    """torch.compile(fullgraph=True) takes the whole step, backward and optimiser included (the eager
    backend: the graph capture, without code generation)."""
    import torch._dynamo

    from batchtopk.bench.ops import graph_breaks

    assert graph_breaks(arch) == (1, 0)
    st = stack_trainer(arch, 2, D, M, 4)
    st.stack.kernels = FIXED  # as a compiled step runs it
    x, t = torch.randn(64, D), torch.zeros((), dtype=torch.long)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: st._step(x, t, keep=False), fullgraph=True, backend="eager")
    compiled(x, t)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_compiled_step_equals_eager(arch):
    """Inductor's code for a stack's step gives the eager step's weights to 1e-5 relative (TopK's b_enc once
    got a wrong gradient there, and only there: with an auxiliary pool narrower than the dictionary)."""
    torch.manual_seed(3)
    saes = [SAE(SAEConfig(arch, D, M, k=4, aux_k=8, replicate=r), 0) for r in range(2)]
    from batchtopk.train.stack import StackTrainer

    eager = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), 100, 80)
    comp = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), 100, 80, compile=True)
    for st in (eager, comp):
        st.state.since_fired[:, :12] = 10 ** 6  # all of them in the pool (2·aux_k)
    for i in range(4):
        x, t = torch.randn(64, D), torch.tensor(i)
        eager.step(x, t)
        comp.step(x, t)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        a, b = getattr(eager.stack, name), getattr(comp.stack, name)
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5, name
    assert torch.equal(eager.state.since_fired, comp.state.since_fired)


def test_stacks_group_by_what_decides_shapes():
    cfgs = [SAEConfig("batchtopk", D, M, k=4), SAEConfig("batchtopk", D, M, k=4, replicate=1, lr=3e-3),
            SAEConfig("batchtopk", D, M, k=8), SAEConfig("topk", D, M, k=4), SAEConfig("batchtopk", D, 2 * M, k=4),
            SAEConfig("batchtopk", D, M, k=4, norm="token")]
    assert stack_configs(cfgs) == [[0, 1], [2], [3], [4], [5]]
    assert stack_configs(cfgs, 1) == [[0], [1], [2], [3], [4], [5]]
    assert StackKey.of(cfgs[0]) == StackKey.of(cfgs[1])


def test_an_impossible_member_of_a_sweep_is_named():
    from batchtopk.train.sweep import sweep_from

    with pytest.raises(PipelineError, match=r"sweep entry arch=topk, k=200, dict=96: k=200 must satisfy"):
        sweep_from({}, {"arch": "topk,batchtopk", "k": "4,200", "dict": str(M)}, D)
    with pytest.raises(PipelineError, match=r"sweep entry arch=batchtopk, k=4, dict=96, lr=-1\.0: lr=-1\.0 must be"):
        sweep_from({}, {"arch": "batchtopk", "k": "4", "dict": str(M), "lr": "-1"}, D)


def test_span_and_aux_batch_keep_the_step_fixed_shape_and_whole():
    """A span and the batch-level auxiliary loss add no host read and no graph break; the batch-level loss
    is another loss than the per-token one."""
    import torch._dynamo

    from batchtopk.train.stack import StackTrainer

    torch.manual_seed(4)
    saes = [SAE(SAEConfig("batchtopk", D, M, k=4, span=16, aux_batch=True, aux_k=8, replicate=r)) for r in range(2)]
    st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), total_steps=100, theta_from=80)
    st.stack.kernels = FIXED  # as a GPU or a compiled step runs it
    st.state.since_fired[:, :40] = 10 ** 9
    x, t = torch.randn(64, D), torch.zeros((), dtype=torch.long)
    st.step(x, t)
    with OpCounter() as c:
        st.step(x, t + 1)
    assert c.host_reads == {}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch.compile(lambda x, t: st._step(x, t, keep=False), fullgraph=True, backend="eager")(x, t + 2)
    torch._dynamo.reset()
    per_token = SAEStack([SAE(SAEConfig("batchtopk", D, M, k=4, span=16, aux_k=8, replicate=r)) for r in range(2)],
                         1e-3, (0.9, 0.99))
    with torch.no_grad():  # every pre-activation positive: a token has more than aux_k live dead-latent values
        st.stack.b_enc += 10.0
    per_token.load_state_dict(st.stack.state_dict())
    since = torch.zeros(2, M, dtype=torch.long)
    since[:, :40] = 10 ** 9
    a = st.stack.losses(x, since, st.stack.coeff)[0]["aux"]
    b = per_token.losses(x, since, st.stack.coeff)[0]["aux"]
    assert (a > 0).all() and (b > 0).all() and not torch.allclose(a, b)


def test_resampling_reinitialises_only_the_dead_latents_from_the_worst_tokens():
    """Gated (and ReLU) resampling: the latents silent since the last resampling of each due SAE take the
    direction (beyond b_dec) of a badly reconstructed token of the batch: decoder row unit, encoder row at 0.2 x
    the living rows' mean norm, biases and magnitude path 0, Adam moments 0, silence counted anew; nothing
    else moves."""
    from batchtopk.train.stack import StackTrainer

    torch.manual_seed(5)
    saes = [SAE(SAEConfig("gated", D, M, replicate=r, l1_coeff=0.05), 0) for r in range(2)]
    x = torch.randn(64, D) * 2 + 1
    for s in saes:
        s.init_from_data(s.normalize(x)[0])
    st = StackTrainer(SAEStack(saes, 1e-3, (0.9, 0.99)), total_steps=100, theta_from=80)
    assert st.resample_every == [10, 10] and st.resample_due(10) == [0, 1]
    assert st.resample_due(80) == [0, 1] and st.resample_due(5) == st.resample_due(90) == []  # not after 80%
    for i in range(3):
        st.step(torch.randn(64, D) * 2 + 1, torch.tensor(i))
    st.state.since_fired.zero_()
    st.state.since_fired[0, :30] = 10 * 64  # silent for the 10 steps since the last time: SAE 0 only
    st.state.since_fired[0, 30:40] = 10 * 64 - 1
    x[32:] *= 100  # 32 tokens that the SAE reconstructs far worse than the rest: the 30 latents take 30 of them
    before = {n: p.detach().clone() for n, p in st.stack.named_parameters()}
    moments = st.opt.exp_avg.clone()
    st.resample(x, 10, seed=0)
    stack, lat = st.stack, torch.arange(30)
    u = stack.normalize(x)[0] - before["b_dec"][0]
    u = u / u.norm(dim=1, keepdim=True)
    token = (stack.W_dec[0, lat].detach() @ u.t()).argmax(1)  # the token each latent took
    assert len(set(token.tolist())) == 30 and int(token.min()) >= 32
    torch.testing.assert_close(stack.W_dec[0, lat], u[token])
    living = before["W_enc"][0][:, 30:].norm(dim=0).mean()
    torch.testing.assert_close(stack.W_enc[0][:, lat], 0.2 * living * u[token].t())
    for name in ("b_enc", "r_mag", "b_mag"):
        assert float(getattr(stack, name)[0, lat].detach().abs().max()) == 0.0
    for name, p in stack.named_parameters():  # the rest as it was: SAE 1, and SAE 0's other latents
        axis = {"W_enc": 1, "W_dec": 0}.get(name, 0)
        rest = p[0].detach().index_select(axis, torch.arange(30, M)) if name != "b_dec" else p[0].detach()
        ref = before[name][0].index_select(axis, torch.arange(30, M)) if name != "b_dec" else before[name][0]
        assert torch.equal(rest, ref) and torch.equal(p[1].detach(), before[name][1]), name
    assert st.state.since_fired[0, :30].eq(0).all() and st.state.since_fired[0, 30:40].eq(10 * 64 - 1).all()
    changed = (st.opt.exp_avg != moments).sum(1).tolist()
    assert changed[1] == 0 and changed[0] == int(((moments[0] != 0) & (st.opt.exp_avg[0] == 0)).sum()) > 0
    assert int((st.opt.exp_avg[0] == 0).sum()) >= 30 * (2 * D + 3)  # W_enc, W_dec, b_enc, r_mag, b_mag
    assert st.resampled == [30, 0]
    st.state.since_fired[1, :80] = 20 * 64  # more silent latents than tokens: 64 of them, each its own token
    st.resample(x, 20, seed=0)
    assert st.resampled == [30, 64] and int(st.state.since_fired[1, :80].eq(0).sum()) == 64
    assert len(torch.unique(st.stack.W_dec[1].detach()[st.state.since_fired[1] == 0][:64], dim=0)) == 64


def test_resample_settings_say_what_is_allowed(tmp_path):
    import json

    from batchtopk.train.sae import CFG_FILE, load_config, save_sae

    gated = SAEConfig("gated", D, M)
    assert (gated.resample, gated.sparsity_warmup) == (0.1, 0.1)  # Gated's recipe: resampled, its L1 warmed up
    relu = SAEConfig("relu", D, M)
    assert (relu.resample, relu.sparsity_warmup, SAEConfig("jumprelu", D, M).sparsity_warmup) == (None, 0.0, 0.0)
    assert SAEConfig("gated", D, M).name == "gated_l0.01_m96"
    save_sae(SAE(gated), tmp_path / "old", {})  # a Gated SAE saved before resampling existed: it had none
    meta = json.loads((tmp_path / "old" / CFG_FILE).read_text())
    del meta["metadata"]["sae_config"]["resample"]
    (tmp_path / "old" / CFG_FILE).write_text(json.dumps(meta))
    assert load_config(tmp_path / "old")[0].resample == 0.0
    assert SAEConfig("gated", D, M, resample=0.0).name == "gated_l0.01_m96_resample-0"
    with pytest.raises(PipelineError, match=r"resample applies to relu, gated SAEs, not batchtopk"):
        SAEConfig("batchtopk", D, M, k=4, resample=0.1)
    with pytest.raises(PipelineError, match=r"resample=0.7 must be a fraction of training in \[0, 0.5\]"):
        SAEConfig("relu", D, M, resample=0.7)
