"""The architectures (train/archs/): each is one object that SAE, SAEStack and export call, and each is held to
the same tests: the dense reference, the GPU's program, the GPU check, and a round trip through SAELens's
format. Adding an architecture without its cases fails here."""
from __future__ import annotations

import pytest
import torch
from test_executor import CASES as EXECUTOR_CASES
from test_stack import REFERENCE_CASES

from batchtopk.bench.gpu_check import CASES as GPU_CHECK_CASES
from batchtopk.train.archs import ARCHS, BATCH_ARCHS, K_ARCHS, L1_ARCHS, THETA_ARCHS
from batchtopk.train.sae import SAE, SAEConfig, load_sae, save_sae
from batchtopk.train.stack import SAEStack


def test_every_architecture_is_held_to_every_test():
    for cases in (REFERENCE_CASES, EXECUTOR_CASES, GPU_CHECK_CASES):  # (the first against bench's dense reference)
        assert {a for a, _ in cases} == set(ARCHS)
    assert list(ARCHS) == ["batchtopk", "topk", "quantile", "matryoshka", "jumprelu", "relu", "gated"]
    assert (K_ARCHS, THETA_ARCHS, BATCH_ARCHS, L1_ARCHS) == (("batchtopk", "topk", "quantile", "matryoshka"),
                                                             ("batchtopk", "quantile", "matryoshka"),
                                                             ("batchtopk", "matryoshka"), ("relu", "gated"))
    for name, arch in ARCHS.items():  # one object per architecture, and the SAE and the stack hold it
        cfg = SAEConfig(name, 8, 32)
        assert arch.name == name and SAE(cfg).arch is arch and SAEStack([SAE(cfg)], 1e-3, (0.9, 0.99)).arch is arch
        assert cfg.name.startswith(name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_architecture_saves_and_loads_what_it_computes(arch, tmp_path):
    """Its own parameters and threshold survive SAELens's format: the same reconstruction in every mode."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch, 16, 64, target_l0=4.0 if arch == "jumprelu" else None))
    x = torch.randn(48, 16)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.input_scale.fill_(0.5)
        sae.theta.fill_(0.2)
    save_sae(sae, tmp_path / "s", {})
    back, meta = load_sae(tmp_path / "s")
    assert back.arch is sae.arch and meta["architecture"] == sae.arch.export
    for mode in (*sae.modes, "train"):
        torch.testing.assert_close(back(x, mode), sae(x, mode), rtol=1e-5, atol=1e-5)

