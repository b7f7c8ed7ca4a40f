"""The SAE math: selection, decoding, thresholds, constraints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stacked import Losses

from batchtopk.train.sae import SAE, SAEConfig, load_sae
from batchtopk.train.sparsity import Code, sparse_decode


def batch_topk_code(pre: torch.Tensor, k: int) -> Code:
    """A BatchTopK SAE's selection as trained (its architecture's `code`, mode 'batch') of pre [n, m]."""
    return SAE(SAEConfig("batchtopk", d_in=4, d_sae=pre.shape[1], k=k)).code(pre, "batch")


def topk_code(pre: torch.Tensor, k: int) -> Code:
    """A TopK SAE's selection of pre [n, m] (its architecture's `code`)."""
    return SAE(SAEConfig("topk", d_in=4, d_sae=pre.shape[1], k=k)).code(pre)


def test_batch_topk_code_keeps_n_k_pairs_and_their_values():
    """Inference's batch mode (the stacks' exact selection, tested against brute force in test_stack.py):
    n·k pairs, variable per token, value 0 only where fewer than n·k are positive."""
    torch.manual_seed(0)
    a = torch.randn(64, 300)
    a[3] += 50  # one token holds all of its latents
    code = batch_topk_code(a, 8)
    assert code.pairs == 64 * 8 and (code.vals > 0).all()
    counts = code.counts
    assert int(counts.sum()) == 64 * 8 and counts[3] == 300 and counts.min() < counts.max()
    z = torch.zeros(4, 10)
    z[0, :3] = 1.0
    assert batch_topk_code(z, 2).nnz == 3  # 8 pairs kept, 3 of them non-zero


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
    sae = SAE(SAEConfig(arch, d_in=24, d_sae=96, k=None if arch == "relu" else 5))
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
    from batchtopk.train.stack import SAEStack, StackAdam

    stack = SAEStack([SAE(SAEConfig("topk", d_in=16, d_sae=32, k=4))], 1e-2, (0.9, 0.99))
    opt = StackAdam(stack)
    since = torch.zeros(1, 32, dtype=torch.long)
    for _ in range(5):
        for p in stack.parameters():
            p.grad = None
        stack.losses(torch.randn(64, 16), since, stack.coeff)[0]["loss"].sum().backward()
        stack.project_decoder_grad()
        assert (stack.W_dec.grad * stack.W_dec).sum(-1).abs().max() < 1e-5
        opt.step(stack, torch.ones(1))
        stack.normalize_decoder()
        torch.testing.assert_close(stack.W_dec.norm(dim=-1), torch.ones(1, 32))


def test_aux_loss_revives_dead_latents():
    torch.manual_seed(6)
    d, m = 16, 64
    sae = SAE(SAEConfig("topk", d_in=d, d_sae=m, k=2, dead_tokens=1))
    with torch.no_grad():  # half the latents can never fire: hugely negative encoder bias
        sae.b_enc[m // 2:] = -100.0
    dead = torch.zeros(m, dtype=torch.bool)
    dead[m // 2:] = True
    x = torch.randn(256, d)
    r = Losses(sae, x, dead)
    assert r.out["aux"] > 0
    r.backward("aux")
    assert r.grad("b_enc")[m // 2:].abs().sum() == 0  # relu is closed for them ...
    with torch.no_grad():
        sae.b_enc[m // 2:] = 0.0
    r = Losses(sae, x, dead).backward("aux")
    assert r.grad("W_enc")[:, m // 2:].abs().sum() > 0  # ... and once they can, the aux loss trains them
    assert r.grad("W_dec")[m // 2:].abs().sum() > 0


def test_jumprelu_threshold_gets_gradient():
    torch.manual_seed(7)
    sae = SAE(SAEConfig("jumprelu", d_in=8, d_sae=16, bandwidth=0.5))
    x = torch.randn(128, 8)
    sae.init_from_data(x)
    assert Losses(sae, x).backward().grad("log_threshold").abs().sum() > 0


def test_bad_configs():
    from batchtopk.core.errors import PipelineError

    for kw, msg in [(dict(arch="topk", k=0), "0 < k"), (dict(arch="topk", k=99), "0 < k"),
                    (dict(arch="batchtopk", k=4, d_sae=0), "at least 1"), (dict(arch="bogus", k=4), "unknown"),
                    (dict(arch="gated", k=4), r"k=4 is a setting of batchtopk, topk, quantile, matryoshka SAEs, not "
                                              r"of gated \(whose sparsity comes from its coefficient\)"),
                    (dict(arch="matryoshka", k=4, groups=(4, 4, 4)), r"groups=4/4/4: Matryoshka groups are latent "
                     r"counts summing to the dictionary size \(16\) or fractions summing to 1"),
                    (dict(arch="matryoshka", k=4, groups=(0.01, 0.99)), "leave a group of 16 latents empty"),
                    (dict(arch="batchtopk", k=4, groups=(0.5, 0.5)), "groups is a Matryoshka setting, not one of "
                                                                      "batchtopk")]:
        kw = {"d_in": 8, "d_sae": 16} | kw
        with pytest.raises(PipelineError, match=msg):
            SAEConfig(**kw)


def test_aux_loss_revives_dead_latents_on_synthetic_data():
    """Half the latents start too weak to ever win the top-k: only the aux loss brings them back."""
    import sys
    from pathlib import Path

    from batchtopk.train.stack import SAEStack, StackTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import sparse_dictionary_data

    x = torch.from_numpy(sparse_dictionary_data(n_seq=32, d=32, atoms=64)[0])
    result = {}
    for coeff in (0.0, 1 / 32):
        torch.manual_seed(0)
        sae = SAE(SAEConfig("topk", d_in=32, d_sae=64, k=3, aux_coeff=coeff, dead_tokens=512, grad_clip=None))
        with torch.no_grad():
            sae.W_enc[:, 32:] *= 0.01
        st = StackTrainer(SAEStack([sae], 3e-3, (0.9, 0.99)), total_steps=300, theta_from=300)
        g = torch.Generator().manual_seed(0)
        for i in range(300):
            log = st.step(x[torch.randint(0, len(x), (256,), generator=g)], torch.tensor(i), log=i == 299)
        with torch.no_grad():
            fired = st.stack.sae(0).code(st.stack.sae(0).pre(x), "train").fired()
        result[coeff] = (int((fired[32:] > 0).sum()), log[0]["mse"])
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
    g = Losses(sae, x, dead).backward().grads()
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


def test_evaluation_selects_per_span_as_a_span_trained_sae_did(tmp_path):
    """A span-16 BatchTopK SAE, trained and loaded back, selects in its batch mode (what evaluation and export
    read) the 16·k largest of each group of 16 tokens, as training did: not the batch's n·k largest. A last,
    shorter group of r tokens keeps its r·k largest."""
    import numpy as np

    from batchtopk.cache.format import write_cache
    from batchtopk.train.settings import TrainSettings
    from batchtopk.train.sparsity import span_topk
    from batchtopk.train.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens = np.ones((32, 16), dtype=np.int32)
    tokens[:, 0] = 0
    cache = write_cache(str(tmp_path / "c"), tokens, {"blocks.0.hook_resid_pre": rng.standard_normal(
        (512, 16)).astype(np.float32)}, dtype="float32", chunk_seqs=8).location
    [d] = Trainer(TrainSettings(cache=cache, out=str(tmp_path / "r"), batch_size=64, tokens=64 * 4, device="cpu",
                                val_fraction=0.25, saes=[{"arch": "batchtopk", "d_sae": 64, "k": 4, "span": 16}],
                                theta_estimator="pooled")).run()
    sae, cfg = load_sae(d)
    assert sae.cfg.span == 16
    torch.manual_seed(0)
    x = torch.randn(72, 16) * 3
    x[:16] *= 4  # the first group's tokens are much larger: a whole-batch selection would give them most pairs
    with torch.no_grad():
        pre = sae.pre(sae.normalize(x)[0])
        _, code = sae.reconstruct(x, "batch")
    per_group = torch.bincount(code.rows // 16, minlength=5).tolist()
    assert per_group == [16 * 4] * 4 + [8 * 4]
    flat = code.rows * 64 + code.cols
    assert torch.equal(flat[:256], span_topk(pre[None, :64], 4, 16)[0])
