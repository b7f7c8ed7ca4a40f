"""Each recipe option changes exactly what it names (one test per option), and paired initial weights."""
from __future__ import annotations

import pytest
import torch
from stacked import Losses

from batchtopk.train import recipe
from batchtopk.train.sae import SAE, SAEConfig, geometric_median, standardize
from batchtopk.train.stack import SAEStack, StackAdam
from batchtopk.train.sweep import expand, sweep_from

D, M = 16, 64


def sae_of(**kw) -> SAE:
    return SAE(SAEConfig(**({"arch": "topk", "d_in": D, "d_sae": M, "k": 4} | kw)))


def batch(n=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2 + torch.linspace(-3, 3, D)  # a mean far from 0


def grads(sae: SAE, x: torch.Tensor, dead=None) -> dict[str, torch.Tensor]:
    return Losses(sae, x, dead).backward().grads()


def test_paired_initial_weights_across_architectures():
    ref = SAE(SAEConfig("batchtopk", D, M, k=4), run_seed=3)
    for arch in ("topk", "jumprelu", "relu"):
        other = SAE(SAEConfig(arch, D, M, k=4 if arch == "topk" else None), run_seed=3)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(ref, name), getattr(other, name)), (arch, name)
    # another replicate, run seed or shape starts elsewhere
    for other in (SAE(SAEConfig("batchtopk", D, M, k=4, replicate=1), run_seed=3),
                  SAE(SAEConfig("batchtopk", D, M, k=4), run_seed=4), SAE(SAEConfig("batchtopk", D, M + 1, k=4), 3)):
        assert not torch.equal(ref.W_dec[:M // 2], other.W_dec[:M // 2])


# every dead latent per token, or each token's top 16 of the 20 dead (the pool, 2·aux_k, holds all of them)
@pytest.mark.parametrize("aux_k", [512, 16])
def test_center_encodes_x_minus_b_dec_and_trains_b_dec_through_the_encoder(aux_k):
    x = batch()
    plain, centred = sae_of(), sae_of(center=True, aux_k=aux_k)
    for s in (plain, centred):
        s.init_from_data(x)
    torch.testing.assert_close(centred.pre(x), (x - centred.b_dec) @ centred.W_enc + centred.b_enc)
    torch.testing.assert_close(plain.pre(x), x @ plain.W_enc + plain.b_enc)
    # the sparse path's gradients equal dense autograd through pre = (x - b_dec) W_enc + b_enc
    g = grads(centred, x, dead=torch.arange(M) < 20)
    centred.zero_grad()
    pre = (x - centred.b_dec) @ centred.W_enc + centred.b_enc
    v, i = pre.relu().topk(4, dim=1)
    x_hat = torch.zeros_like(pre).scatter(1, i, v) @ centred.W_dec + centred.b_dec
    a = pre[:, :20].relu()
    av, ai = a.topk(min(aux_k, 20), dim=1)
    aux = torch.zeros_like(a).scatter(1, ai, av) @ centred.W_dec[:20]
    aux_loss = (aux - (x - x_hat).detach()).pow(2).sum(-1).mean() * centred.cfg.aux_coeff
    loss = (x_hat - x).pow(2).sum(-1).mean() + aux_loss  # summed MSE
    loss.backward()
    for n, p in centred.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("init", ["mean", "geometric_median", "zero"])
def test_b_dec_init(init):
    x = batch()
    x[:5] += 500.0  # a few far rows: they move the mean, not the geometric median
    s, ref = sae_of(b_dec_init=init), sae_of()
    s.init_from_data(x)
    want = {"mean": x.mean(0), "zero": torch.zeros(D)}.get(init)
    if init == "geometric_median":
        gm = s.b_dec.detach().double()
        # the geometric median minimises the summed distances: no small step lowers it
        cost = lambda y: float((x.double() - y).norm(dim=1).sum())  # noqa: E731
        for dirn in torch.eye(D, dtype=torch.float64):
            assert cost(gm) <= min(cost(gm + 1e-2 * dirn), cost(gm - 1e-2 * dirn)) + 1e-6
        assert float((gm - x[5:].double().mean(0)).norm()) < 2.0  # not dragged towards the far rows
    else:
        torch.testing.assert_close(s.b_dec, want)
    for name in ("W_enc", "W_dec", "b_enc"):  # nothing else changes
        assert torch.equal(getattr(s, name), getattr(ref, name))


def test_geometric_median_of_symmetric_points_is_their_centre():
    pts = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [0, 0]]) + 5
    torch.testing.assert_close(geometric_median(pts), torch.tensor([5.0, 5.0]), atol=1e-4, rtol=0)


def test_mse_reduction_sum_is_d_times_mean():
    x = batch()
    a, b = sae_of(mse="mean"), sae_of(mse="sum")
    la, lb = Losses(a, x).out["mse"], Losses(b, x).out["mse"]
    assert float(lb) == pytest.approx(D * float(la), rel=1e-6)


def test_aux_norm_divides_by_the_residual_variance():
    x = batch()
    dead = torch.arange(M) < 30
    a, b = sae_of(), sae_of(aux_norm=True)
    oa, ob = Losses(a, x, dead).out, Losses(b, x, dead).out
    resid = x - oa["x_hat"]
    var = (resid - resid.mean(0)).pow(2).sum(-1).mean()  # the residual's variance, summed over dimensions
    assert float(ob["aux"]) == pytest.approx(float(oa["aux"]) / float(var), rel=1e-5)
    assert float(ob["mse"]) == float(oa["mse"])


def test_grad_clip_clips_each_saes_global_norm_only():
    """In one stack: no clipping, clipping at 0.5 (the default is 1.0), and a clip above the norm."""
    x = batch() * 100  # large gradients
    saes = [sae_of(grad_clip=None), sae_of(grad_clip=0.5), sae_of(grad_clip=1e9)]
    stack = SAEStack(saes, 1e-3, (0.9, 0.99))
    out = stack.losses(x, torch.zeros(3, M, dtype=torch.long), stack.coeff)[0]
    out["loss"].sum().backward()
    raw = torch.cat([p.grad.reshape(3, -1) for p in stack.parameters()], 1)
    g = StackAdam(stack).clipped_gradient(stack)
    assert float(raw[1].norm()) > 0.5 and float(g[1].norm()) == pytest.approx(0.5, rel=1e-4)
    torch.testing.assert_close(g[1] / g[1].norm(), raw[1] / raw[1].norm(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g[0], raw[0]) and torch.testing.assert_close(g[2], raw[2])


def test_lr_betas_and_threshold_lr_reach_the_optimizer():
    """Each SAE of a stack at its own lr and betas (the run's where it sets none), and a stack's Adam step
    equals torch.optim.Adam's on each SAE alone."""
    stack = SAEStack([sae_of(), sae_of(lr=1e-3, betas=(0.0, 0.999))], 3e-4, (0.9, 0.99))
    assert stack.lr.tolist() == pytest.approx([3e-4, 1e-3]) and stack.beta1.tolist() == [pytest.approx(0.9), 0.0]
    assert stack.beta2.tolist() == pytest.approx([0.99, 0.999])
    jr = SAEStack([SAE(SAEConfig("jumprelu", D, M, threshold_lr=0.05))], 3e-4, (0.9, 0.99))
    assert jr.threshold_lr.tolist() == pytest.approx([0.05]) and jr.lr.tolist() == pytest.approx([3e-4])
    saes = [sae_of(replicate=r) for r in range(2)]
    opt = StackAdam(stack := SAEStack(saes, 3e-4, (0.9, 0.99)))
    refs = [torch.optim.Adam(s.parameters(), lr=lr, betas=b) for s, lr, b in
            zip(saes, (3e-4, 3e-4), ((0.9, 0.99), (0.9, 0.99)))]
    stack.grad_clip.fill_(float("inf"))
    for _ in range(3):
        g = {n: torch.randn(p.shape) for n, p in stack.named_parameters()}
        for n, p in stack.named_parameters():
            p.grad = g[n].clone()
        opt.step(stack, torch.ones(2))
        for i, (s, ref) in enumerate(zip(saes, refs)):
            for n, p in s.named_parameters():
                p.grad = g[n][i].clone()
            ref.step()
    for i, s in enumerate(saes):
        for n, p in s.named_parameters():
            torch.testing.assert_close(getattr(stack, n)[i], p, rtol=1e-5, atol=1e-7, msg=n)


def test_warmup_and_decay_schedules():
    """Per SAE of one stack, from a device step: warm-up over the first 10%, decay over the last 20%."""
    stack = SAEStack([sae_of(warmup=0.1, decay=0.2), sae_of()], 1e-3, (0.9, 0.99))
    f = [stack.lr_factor(torch.tensor(s), 100).tolist() for s in range(100)]
    w = [a for a, _ in f]
    assert w[0] == pytest.approx(1 / 11) and w[9] == pytest.approx(10 / 11) and w[10] == 1.0
    assert w[79] == 1.0 and w[80] == pytest.approx(1.0) and w[90] == pytest.approx(0.5) and w[99] == pytest.approx(0.05)
    assert {b for _, b in f} == {1.0}


def test_sparsity_warmup():
    jr = SAEStack([SAE(SAEConfig("jumprelu", D, M, l0_coeff=0.02, sparsity_warmup=0.5)),
                   SAE(SAEConfig("jumprelu", D, M, l0_coeff=0.3))], 1e-3, (0.9, 0.99))
    assert jr.sparsity_coeff(torch.tensor(0), 100).tolist() == pytest.approx([0.02 / 50, 0.3])
    assert jr.sparsity_coeff(torch.tensor(49), 100).tolist() == pytest.approx([0.02, 0.3])
    relu = SAEStack([SAE(SAEConfig("relu", D, M, l1_coeff=0.3))], 1e-3, (0.9, 0.99))
    assert relu.sparsity_coeff(torch.tensor(0), 100).tolist() == pytest.approx([0.3])


def test_target_l0_penalty_pushes_thresholds_both_ways():
    x = batch()
    for target, sign in ((1.0, -1), (60.0, +1)):  # L0 above the target raises thresholds, below lowers them
        s = SAE(SAEConfig("jumprelu", D, M, target_l0=target, l0_coeff=1.0, jumprelu_init_l0=16, bandwidth=0.5))
        s.init_from_data(x)
        r = Losses(s, x)
        l0 = r.nnz / len(x)
        assert float(r.out["sparsity"]) == pytest.approx(D * (l0 / target - 1) ** 2, rel=0.05)  # summed MSE: x D
        g = r.backward("sparsity").grad("log_threshold")
        assert (torch.sign(g[g != 0]) == sign).all() and (g != 0).sum() > 0


def test_preact_loss_pulls_latents_below_their_thresholds_up():
    x = batch()
    cfg = {"arch": "jumprelu", "d_in": D, "d_sae": M, "bandwidth": 0.5}
    s = SAE(SAEConfig(**cfg, preact_coeff=0.01))
    s.init_from_data(x)
    with torch.no_grad():
        s.b_enc[:8] = -100.0  # these never fire
    r = Losses(s, x)
    out = r.out
    with torch.no_grad():
        expect = D * 0.01 * float((s.threshold - s.pre(x)).relu().sum(-1).mean())
    assert float(out["preact"].detach()) == pytest.approx(expect, rel=1e-6)
    assert not (r.code[0, :, :8] != 0).any()
    r.backward("preact")
    assert (r.grad("b_enc")[:8] < 0).all() and (r.grad("log_threshold")[:8] > 0).all()  # pre up, threshold down
    plain = SAE(SAEConfig(**cfg))
    plain.load_state_dict(s.state_dict())
    ref = Losses(plain, x).out
    assert "preact" not in ref  # the option adds its term and changes nothing else
    for key in ("mse", "sparsity"):
        assert float(ref[key].detach()) == float(out[key].detach())
    assert float(out["loss"].detach()) == pytest.approx(float((ref["loss"] + out["preact"]).detach()))


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sparsity_penalty_keeps_its_weight_against_either_mse(arch):
    """Sparsity coefficients are in per-element-MSE units: with the MSE summed over dimensions the
    whole loss is exactly d times the per-element loss, so the same coefficient trains the same SAE."""
    x = batch()
    losses = {}
    for mse in ("mean", "sum"):
        torch.manual_seed(0)
        s = SAE(SAEConfig(arch, D, M, mse=mse, l0_coeff=0.1, l1_coeff=0.1, bandwidth=0.5))
        s.init_from_data(x)
        losses[mse] = Losses(s, x).out
    for key in ("mse", "sparsity", "loss"):
        assert float(losses["sum"][key]) == pytest.approx(D * float(losses["mean"][key]), rel=1e-5), key


def test_token_norm_standardises_each_token_and_undoes_it():
    x = batch() * torch.linspace(0.5, 3, 256)[:, None]
    s = sae_of(norm="token")
    x_in, ctx = s.normalize(x)
    torch.testing.assert_close(x_in.mean(-1), torch.zeros(256), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_in.std(-1), torch.ones(256), atol=1e-3, rtol=0)
    torch.testing.assert_close(s.denormalize(x_in, ctx), x, atol=1e-3, rtol=1e-4)
    g = sae_of()  # global norm: one scale for every token
    g.input_scale.fill_(0.5)
    torch.testing.assert_close(g.normalize(x)[0], 0.5 * x)
    torch.testing.assert_close(standardize(3 * x + 1)[0], standardize(x)[0], atol=1e-4, rtol=1e-4)


def test_sweep_keys_seeds_and_recipe_overrides():
    cfgs = expand({"arch": "batchtopk,topk,jumprelu", "dict": "2x", "k": [4, 8], "l0_coeff": 0.1,
                   "center": "true,false", "seeds": 2}, d_in=D)
    assert len(cfgs) == 2 * (2 * 2 * 2) + 2 * 2  # (batch)topk: k x center x seeds; jumprelu: center x seeds
    assert all("k" not in c for c in cfgs if c["arch"] == "jumprelu")
    assert all("l0_coeff" not in c for c in cfgs if c["arch"] != "jumprelu")
    assert sorted({c["replicate"] for c in cfgs}) == [0, 1]
    names = [SAEConfig(d_in=D, **c).name for c in cfgs]
    assert len(set(names)) == len(names)
    train = {"lr": 1e-3, "norm": "token", "sweep": [{"arch": ["topk"], "k": [4]}, {"arch": ["relu"]}]}
    saes = sweep_from(train, {"grad_clip": "1"}, D)  # recipe keys apply to every grid of the sweep
    assert [c["arch"] for c in saes] == ["topk", "relu"]
    assert all(c["grad_clip"] == 1.0 and c["norm"] == "token" and "lr" not in c for c in saes)
    assert [c["arch"] for c in sweep_from(train, {"arch": "batchtopk"}, D)] == ["batchtopk"]  # selection replaces
    from batchtopk.core.errors import PipelineError
    with pytest.raises(PipelineError, match="sweep: unknown key 'colour'; allowed: arch, aux_batch"):
        expand({"arch": "topk", "colour": "red"}, D)
    with pytest.raises(PipelineError, match="center='maybe' is not a valid bool"):
        expand({"arch": "topk", "center": "maybe"}, D)
    with pytest.raises(PipelineError, match="unknown norm 'layer'"):
        sweep_from({}, {"norm": "layer"}, D)


def test_paper_pipeline_trains_jumprelu_with_the_recipe():
    """pipelines.yaml spells make paper's JumpReLU recipe; it must stay recipe.JUMPRELU_TARGET_RECIPE."""
    from batchtopk.core import pipelines

    _, pipe = pipelines.get("smollm2-135m-paper")
    jumprelus = [c for c in sweep_from(pipe["train"], {}, D) if c["arch"] == "jumprelu"]
    assert [c["target_l0"] for c in jumprelus] == [16, 32, 64]
    for c in jumprelus:
        assert {key: c[key] for key in recipe.JUMPRELU_TARGET_RECIPE} == recipe.JUMPRELU_TARGET_RECIPE
