"""A training run's settings, each declared once: its help text, its command-line group, and whether it is
part of the run's identity (a run resumes only a checkpoint of the same identity, and its directory name
hashes it)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from batchtopk.cache.split import HELDOUT_LAYOUTS
from batchtopk.core.options import ADVANCED, ALWAYS, IF_SET, RECIPE, identity, parse_tokens, setting

from .executor import PRECISIONS, SWITCHES
from .sae import SAEConfig
from .theta import ESTIMATORS

# unseen: the pooled estimate over held-out sequences set aside for it (text the SAE never trained on)
THETA_ESTIMATORS = ("unseen", *ESTIMATORS, "running")


@dataclass
class TrainSettings:
    cache: str = setting(cli=False)
    saes: list[dict[str, Any]] = setting(cli=False)  # SAEConfig fields except d_in
    out: str = setting(cli=False)
    site: str | None = setting(None, "Site to train on (default: the cache's first).", identity=ALWAYS)
    tokens: int | None = setting(None, "Training tokens (an integer, or 'all' for one epoch of the cache's training "
                                 "part).", identity=ALWAYS, parse=parse_tokens,
                                 metavar="N|all")
    batch_size: int = setting(4096, "Tokens per batch.", identity=ALWAYS)
    # measured at the paper pipeline's budget (docs/results.md, bench/ablation.py)
    lr: float = setting(1e-3, "Adam learning rate of every SAE that sets none.", identity=ALWAYS)
    betas: tuple[float, float] = setting((0.9, 0.99), "Adam betas of every SAE that sets none.", cli=False,
                                         identity=ALWAYS)
    seed: int = setting(0, "Seed of the initial weights and of the batch order.", identity=ALWAYS)
    val_fraction: float = setting(0.05, "Fraction of the cache held out for evaluation.", identity=ALWAYS)
    heldout: str = setting("tail", "Which part is held out: tail (the last chunks) or interleaved (one sequence in "
                           "every 1/val-fraction, spread over the cache).", choices=HELDOUT_LAYOUTS, group=RECIPE,
                           identity=IF_SET)
    theta_estimator: str = setting("unseen", "BatchTopK's inference threshold θ, from the final weights: unseen (over "
                                   "every other held-out sequence, which evaluation then leaves out), pooled or mean "
                                   "(eq. 7) over training batches, or running (during training).",
                                   choices=THETA_ESTIMATORS, group=RECIPE, identity=ALWAYS)
    theta_tokens: int = setting(65536, "Tokens the θ estimates from the final weights read (at most).", cli=False,
                                identity=ALWAYS)
    theta_window: float = setting(0.2, "The running θ: the mean over this last fraction of the steps.", cli=False,
                                  identity=ALWAYS)
    log_every: int = setting(10, "Steps between log records.")
    checkpoint_every: int = setting(200, "Steps between training-state checkpoints.")
    shuffle_mb: float = setting(512, "Rows are shuffled within windows of chunks of this many MiB (with the seed, "
                                "it fixes the batches).", cli=False, identity=IF_SET)
    include_bos: bool = setting(False, "Train on BOS positions too (their residual is huge and constant).",
                                identity=ALWAYS)
    include_outliers: bool = setting(False, "Train on massive-activation rows too (norm > 10x the mean).",
                                     identity=ALWAYS)
    local_copy: str | None = setting(None, "For a URL cache: keep a read-through copy of the chunks read in this "
                                     "folder.")
    data_parts: int | None = setting(None, "Parts of each global batch (default: one per rank); a single process "
                                     "can build the batches of several ranks.", cli=False, identity=IF_SET)
    device: str | None = setting(None, "cuda or cpu (default: CUDA when present).")
    stack_size: int | None = setting(None, "SAEs of one shape trained as one stack, at most (default: all of them; "
                                     "a resumed run: its checkpoint's).", group=ADVANCED)
    compile: str = setting("auto", "Compile each stack's training step into one graph, replayed as a CUDA graph on "
                           "a GPU: auto (on one GPU), on, or off.", choices=SWITCHES, group=ADVANCED)
    fixed_shape: str = setting("auto", "The fixed-shape step a GPU runs (on), or the CPU's exact eager step with its "
                               "host-reading shortcuts (off); auto: on on a GPU or with --compile on.",
                               choices=SWITCHES, group=ADVANCED)
    precision: str = setting("auto", "The SAE math's precision: bf16 (autocast around the forward; weights and Adam "
                             "stay float32) or fp32; auto: bf16 on a GPU, fp32 on the CPU.", choices=PRECISIONS,
                             group=ADVANCED)
    pipeline: str | None = setting(None, cli=False)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run. Each SAE counts with every field of its configuration,
        defaults included, so a change of defaults makes a new run; fields added later (identity=IF_SET)
        count only when set, so that adding one leaves the runs before it as they were."""
        later = {f.name: f.default for f in fields(SAEConfig) if f.metadata.get("identity") == IF_SET}
        saes = [{k: v for k, v in asdict(SAEConfig(d_in=1, **c)).items()
                 if k != "d_in" and not (k in later and v == later[k])} for c in self.saes]
        return {"cache_id": None, "saes": saes, **identity(self)}


def run_id(cache_id: str, s: TrainSettings) -> str:
    """The run's directory name: its one SAE's name (or sweep<N>) and a hash of its identity."""
    ident = s.identity() | {"cache_id": cache_id}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if len(s.saes) == 1:
        return f"{SAEConfig(d_in=1, **s.saes[0]).name}-{h}"
    return f"sweep{len(s.saes)}-{h}"
