"""TopK (Gao et al. 2024): each token's k largest relu(pre), in training and at inference."""
from __future__ import annotations

from ..sparsity import Code, topk_rows
from .base import KArch


class TopK(KArch):
    name = "topk"
    export = "topk"
    # its latents fire less evenly at small k: at k = 16 a window of 4096 tokens left it 2.4% worse and 4% of its
    # latents dead (bench/ablation.py rounds 4 and 5, the peers' batches at 8xd); at k = 32 the two are equal
    dead_tokens = 8192

    def select(self, stack, pre, sl):
        return topk_rows(pre, stack.key.k), None

    def code(self, sae, pre, mode):
        return Code.from_pairs(pre, topk_rows(pre[None], sae.cfg.k)[0])

    def saved_config(self, sae):
        return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}


ARCH = TopK()
