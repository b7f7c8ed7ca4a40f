"""The SAE math: selection, decoding, thresholds, constraints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchtopk.train.sae import SAE, SAEConfig
from batchtopk.train.sparsity import batch_topk_code, batch_topk_indices, sparse_decode, topk_code


def brute_batch_topk(a: torch.Tensor, k: int) -> set[int]:
    flat = a.flatten()
    order = torch.argsort(flat, descending=True)[: a.shape[0] * k]
    return {int(i) for i in order if flat[i] > 0}


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("hint", [None, "below", "above"])
def test_batch_topk_is_exact(skew, hint):
    torch.manual_seed(0)
    a = torch.randn(64, 300)
    if skew:  # one token holds far more than candidates*k large values: the fallback path
        a[3] += 50
    kth = float(a.flatten().topk(64 * 8).values[-1])
    # a hint below the answer selects among the entries above it; one above it falls back
    h = {None: None, "below": 0.8 * kth, "above": 1.2 * kth}[hint]
    idx = batch_topk_indices(a, 8, hint=h)
    assert len(idx) == 64 * 8
    assert set(idx.tolist()) == brute_batch_topk(a.relu(), 8)
    code = batch_topk_code(a, 8)
    assert (code.vals > 0).all()
    counts = code.counts
    assert int(counts.sum()) == 64 * 8 and counts.min() < counts.max()  # variable per token
    if skew:
        assert counts[3] == 300


def test_batch_topk_drops_zeros():
    a = torch.zeros(4, 10)
    a[0, :3] = 1.0
    assert batch_topk_code(a, 2).vals.numel() == 3


def test_topk_exactly_k_per_row():
    torch.manual_seed(1)
    a = torch.randn(50, 100).relu() + 0.01
    code = topk_code(a, 7)
    assert (code.counts == 7).all()
    dense = code.dense()
    np.testing.assert_array_equal(dense.topk(7, dim=1).values.sort(1).values, a.topk(7, dim=1).values.sort(1).values)


def test_threshold_mode_is_jumprelu():
    torch.manual_seed(2)
    sae = SAE(SAEConfig("batchtopk", d_in=16, d_sae=64, k=4))
    sae.theta.fill_(0.3)
    x = torch.randn(20, 16)
    pre = sae.pre(x)
    want = pre * (pre > 0.3)
    torch.testing.assert_close(sae.encode(x, "threshold"), want)


def test_batch_and_threshold_modes_agree_when_theta_from_that_batch():
    torch.manual_seed(3)
    sae = SAE(SAEConfig("batchtopk", d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16)
    batch = sae.encode(x, "batch")
    sae.theta.fill_(float(batch[batch > 0].min().detach()) - 1e-6)
    torch.testing.assert_close(sae.encode(x, "threshold"), batch)


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu"])
def test_sparse_and_dense_decoders_agree(arch):
    torch.manual_seed(4)
    sae = SAE(SAEConfig(arch, d_in=24, d_sae=96, k=5))
    x = torch.randn(40, 24)
    code = sae.code(sae.pre(x), "train")
    grads = []
    for decode in ("sparse", "dense"):
        sae.zero_grad()
        out = (sparse_decode(code, sae.W_dec) if decode == "sparse" else code.dense() @ sae.W_dec) + sae.b_dec
        (out * torch.linspace(-1, 1, 24)).pow(2).sum().backward(retain_graph=True)
        grads.append((out.detach(), sae.W_dec.grad.clone(), sae.W_enc.grad.clone(), sae.b_enc.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoder_rows_stay_unit_norm_and_grad_is_orthogonal():
    torch.manual_seed(5)
    sae = SAE(SAEConfig("topk", d_in=16, d_sae=32, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        out, _ = sae.losses(torch.randn(64, 16), None)
        out["loss"].backward()
        sae.project_decoder_grad()
        assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


def test_aux_loss_revives_dead_latents():
    torch.manual_seed(6)
    d, m = 16, 64
    sae = SAE(SAEConfig("topk", d_in=d, d_sae=m, k=2, dead_tokens=1))
    with torch.no_grad():  # half the latents can never fire: hugely negative encoder bias
        sae.b_enc[m // 2:] = -100.0
    dead = torch.zeros(m, dtype=torch.bool)
    dead[m // 2:] = True
    x = torch.randn(256, d)
    out, _ = sae.losses(x, dead)
    assert "aux" in out and out["aux"] > 0
    out["aux"].backward()
    assert sae.b_enc.grad[m // 2:].abs().sum() == 0  # relu is closed for them ...
    sae.zero_grad()
    with torch.no_grad():
        sae.b_enc[m // 2:] = 0.0
    out, _ = sae.losses(x, dead)
    out["aux"].backward()
    assert sae.W_enc.grad[:, m // 2:].abs().sum() > 0  # ... and once they can, the aux loss trains them
    assert sae.W_dec.grad[m // 2:].abs().sum() > 0


def test_jumprelu_threshold_gets_gradient():
    torch.manual_seed(7)
    sae = SAE(SAEConfig("jumprelu", d_in=8, d_sae=16, bandwidth=0.5))
    x = torch.randn(128, 8)
    sae.init_from_data(x)
    out, _ = sae.losses(x, None)
    out["loss"].backward()
    assert sae.log_threshold.grad.abs().sum() > 0


def test_bad_configs():
    from batchtopk.core.errors import PipelineError

    for kw, msg in [(dict(arch="topk", k=0), "0 < k"), (dict(arch="topk", k=99), "0 < k"),
                    (dict(arch="batchtopk", k=4, d_sae=0), "at least 1"), (dict(arch="gated", k=4), "unknown")]:
        kw = {"d_in": 8, "d_sae": 16} | kw
        with pytest.raises(PipelineError, match=msg):
            SAEConfig(**kw)


def test_aux_loss_revives_dead_latents_on_synthetic_data():
    """Half the latents start too weak to ever win the top-k: only the aux loss brings them back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import sparse_dictionary_data

    x = torch.from_numpy(sparse_dictionary_data(n_seq=32, d=32, atoms=64)[0])
    result = {}
    for coeff in (0.0, 1 / 32):
        torch.manual_seed(0)
        sae = SAE(SAEConfig("topk", d_in=32, d_sae=64, k=3, aux_coeff=coeff))
        with torch.no_grad():
            sae.W_enc[:, 32:] *= 0.01
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.9, 0.99))
        since = torch.zeros(64, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            xb = x[torch.randint(0, len(x), (256,), generator=g)]
            out, code = sae.losses(xb, since >= 512)
            opt.zero_grad()
            out["loss"].backward()
            sae.project_decoder_grad()
            opt.step()
            sae.normalize_decoder()
            since = torch.where(code.fired() > 0, 0, since + 256)
        with torch.no_grad():
            fired = sae.code(sae.pre(x), "train").fired()
        result[coeff] = (int((fired[32:] > 0).sum()), float(out["mse"].detach()))
    assert result[0.0][0] == 0  # without the aux loss they never fire
    assert result[1 / 32][0] >= 24 and result[1 / 32][1] < 0.6 * result[0.0][1]


def test_topk_code_keeps_k_pairs_but_counts_only_positive_ones():
    """Where fewer than k latents are positive, the code keeps k pairs per row (no read-back of a count),
    the extra ones at value 0: they count in neither L0 nor firing, and carry no gradient."""
    torch.manual_seed(8)
    sae = SAE(SAEConfig("topk", d_in=16, d_sae=64, k=6))
    with torch.no_grad():
        sae.b_enc[:] = -3.0  # most pre-activations negative: many rows have fewer than 6 positive
        sae.b_enc[:4] = 3.0
    x = torch.randn(48, 16)
    pre = sae.pre(x).detach()
    code = topk_code(pre, 6)
    positive = (pre > 0).sum(1).clamp(max=6)
    assert code.pairs == 48 * 6 and (positive < 6).any()
    assert code.counts.tolist() == positive.tolist() and code.nnz == int(positive.sum())
    assert code.fired().tolist() == (code.dense() > 0).sum(0).tolist()
    rows, cols, vals = code.active()  # what the latent browser reads: the non-zero entries only
    assert (vals > 0).all() and len(vals) == code.nnz and torch.equal(pre[rows, cols], vals)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    ours = sae.losses(x, dead)[0]["loss"]
    ours.backward()
    g = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    from batchtopk.bench.train_bench import dense_losses
    dense_losses(sae, x, dead).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_count_is_bincount():
    from batchtopk.train.sparsity import count
    idx = torch.tensor([3, 0, 3, 7, 3])
    assert count(idx, 9).tolist() == torch.bincount(idx, minlength=9).tolist()
    where = torch.tensor([True, False, True, True, False])
    assert count(idx, 9, where).tolist() == torch.bincount(idx[where], minlength=9).tolist()


@pytest.mark.parametrize("skew", [1.0, 30.0])
def test_theta_estimates_equal_brute_force(skew):
    """Pooled θ is the (N·n·k)-th largest activation over all N batches, mean θ the mean of each batch's
    (n·k)-th largest, exactly, also when one batch runs far hotter (its store must grow) and with the
    selection hint carried from batch to batch."""
    from batchtopk.train.theta import estimate_theta
    torch.manual_seed(9)
    n, m, k = 64, 200, 5
    xs = [torch.randn(n, m) * (skew if i == 2 else 1.0) for i in range(6)]
    est = estimate_theta(xs, lambda x: x, k)
    allv = torch.cat([x.relu().flatten() for x in xs])
    assert est["pooled"] == float(allv.topk(len(xs) * n * k).values[-1])
    per = [float(x.relu().flatten().topk(n * k).values[-1]) for x in xs]
    assert est["mean"] == pytest.approx(sum(per) / len(per), rel=1e-12)
