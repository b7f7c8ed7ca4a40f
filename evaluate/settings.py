"""Evaluation's and the latent browser's settings, each declared once (help text and command-line group)."""
from __future__ import annotations

from dataclasses import dataclass

from batchtopk.core.errors import PipelineError
from batchtopk.core.options import ADVANCED, setting

BOS_HELP = "Also {} BOS positions (their residual is huge and constant)."
OUTLIERS_HELP = "Also {} massive-activation positions (norm > 10x the mean)."


@dataclass
class EvalSettings:
    saes: list[str] = setting(cli=False)
    tokens: int = setting(4096, "Held-out tokens to evaluate on (default: the pipeline's, or all the held-out part "
                          "has if that is fewer).")
    exact_tokens: bool = setting(True, cli=False)  # False: at most `tokens` (all the held-out part has, if fewer)
    batch_seqs: int = setting(8, "Sequences per forward pass.", group=ADVANCED)
    include_bos: bool = setting(False, BOS_HELP.format("splice and score"))
    include_outliers: bool = setting(False, OUTLIERS_HELP.format("splice and score"))
    device: str | None = setting(None, "cuda or cpu (default: CUDA when present).")
    dataset: str | None = setting(None, "Evaluate on this corpus instead of the cache's held-out part.")
    encode_as: tuple[str, ...] = setting((), "Also score each BatchTopK or TopK SAE with the other's activation "
                                         "(batchtopk, topk, or both comma-separated): a TopK SAE as BatchTopK (batch "
                                         "top-(n·k), and JumpReLU with a θ estimated for it), a BatchTopK SAE as "
                                         "TopK (k per token).", parse=lambda v: tuple(a for a in v.split(",") if a),
                                         metavar="ARCHS")

    def __post_init__(self) -> None:
        from batchtopk.train.sae import SWAPPABLE

        bad = [a for a in self.encode_as if a not in SWAPPABLE]
        if bad:
            raise PipelineError(f"--encode-as {','.join(bad)}: not an architecture whose activation another SAE "
                                f"can be scored with; allowed: {', '.join(SWAPPABLE)}")


@dataclass
class BrowseSettings:
    sae: str = setting(cli=False)
    out: str | None = setting(None, "Site directory (one SAE only; default data/browse/<pipeline>/<SAE name>).")
    tokens: int | None = setting(None, "Scan at most this many tokens (default: all of the held-out part).")
    whole_cache: bool = setting(False, "Scan the whole cache instead of its held-out part.")
    include_bos: bool = setting(False, BOS_HELP.format("scan"))
    include_outliers: bool = setting(False, OUTLIERS_HELP.format("scan"))
    batch_tokens: int = setting(4096, cli=False)
    device: str | None = setting(None, "cuda or cpu (default: CUDA when present).")
    pipeline: str | None = setting(None, cli=False)


@dataclass
class AbsorptionSettings:
    words: int = setting(4000, "Whole-word tokens of the vocabulary to probe (a fifth of them held out).")
    device: str | None = setting(None, "cuda or cpu (default: CUDA when present).")

    def __post_init__(self) -> None:
        from .absorption import MIN_WORDS

        if self.words < MIN_WORDS:
            raise PipelineError(f"--words {self.words}: the first-letter probe needs at least {MIN_WORDS} words")
