"""Named training recipes: the settings a pipeline spells for an architecture, kept in one place.

(The optimiser, learning-rate schedule and sparsity coefficient themselves are the stack's: train/stack.py.)
"""
from __future__ import annotations

# JumpReLU aimed at a target L0, as `make paper` trains it (pipelines.yaml spells the same settings):
# the target penalty's weight, Gemma Scope's beta1 = 0 and lr decay over the last 20%; the lr and the
# thresholds' own lr that measured best at make paper's budget (bench/ablation.py round 7: 3x and 5x
# what it had, and no sparsity warm-up). The final threshold factor then lands it on its target.
JUMPRELU_TARGET_RECIPE = {"lr": 3e-3, "l0_coeff": 1.0, "threshold_lr": 0.1, "betas": (0.0, 0.999), "decay": 0.2}
