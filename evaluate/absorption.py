"""Feature absorption, by SAEBench's first-letter method, computed offline from the model and the SAE.

A word's first letter is a feature the model represents: a linear probe reads it from the residual stream
at the word's token, in a prompt that asks for it ("{word} has the first letter:", after a few solved
examples). For each letter the SAE's *main latents* are the fewest that classify it as well as more would
(k-sparse probing: latents ranked by how much more they fire on the letter's words, k grown while the F1
rises by at least F1_JUMP). On a held-out word the probe gets right, the feature is *absorbed* when the main
latents stay silent (or fall short) and other latents aligned with the probe carry it instead:

- absorption fraction: the share of the probe's projection carried by up to MAX_ABSORBERS other latents
  aligned with the probe (cosine >= FRACTION_COS) rather than by the main latents (0 when those carry it all
  or the others carry less than PROJECTION_SHARE of it);
- full absorption: every main latent silent, and the one latent that projects most onto the probe aligned
  with it (cosine >= FULL_COS) and carrying at least PROJECTION_SHARE of the probe's projection.

Each letter's rates are averaged over its words, then over the letters whose probe is trustworthy (F1 >=
MIN_PROBE_F1 on held-out words); with fewer than MIN_LETTERS such letters the whole measurement is marked
untrusted (a small model, or a layer that does not hold spelling linearly). A latent's projection is its
exact contribution to the reconstruction, activation times (decoder row . unit probe): SAEBench's
activation times cosine when decoder rows have unit norm.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import string
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchtopk.cache.format import Cache
from batchtopk.core.errors import PipelineError
from batchtopk.core.pipelines import DATA_DIR
from batchtopk.harvest import models
from batchtopk.train.sae import load_sae

ABSORPTION_FILE = "absorption.json"
LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
ICL_EXAMPLES = 4          # solved examples before each prompt's word
MAX_K = 10                # main latents per letter at most
F1_JUMP = 0.03            # a k-sparse probe must beat k - 1 latents' F1 by this to add a latent
FULL_COS = 0.025          # SAEBench's thresholds (its eval_config and absorption calculator)
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
TEST_FRACTION = 0.2
MIN_WORDS = 100


# ---------------------------------------------------------------- words and prompts
def first_letter_words(tokenizer, limit: int, seed: int = 0) -> list[tuple[int, str]]:
    """Whole-word tokens of the vocabulary (a space, then two or more ASCII letters), as (token id, word), a
    seeded sample of at most `limit` of them in vocabulary order."""
    words = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        w = text[1:]
        if text.startswith(" ") and len(w) >= 2 and w.isascii() and w.isalpha():
            words.append((tid, w))
    if len(words) > limit:
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(words), generator=g)[:limit].tolist())
        words = [words[i] for i in keep]
    return words


def letter_of(word: str) -> int:
    return LETTERS.index(word[0].lower())


def prompts(tokenizer, words: list[tuple[int, str]], examples: list[str]) -> tuple[torch.Tensor, int]:
    """Token ids [N, T] of every word's prompt (BOS, the solved examples, then the template with the word's
    own token) and the position of the word's token: every prompt has the same length."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    shots = "".join(TEMPLATE.format(word=w) + f" {w[0].upper()}\n" for w in examples)
    head = [bos] + tokenizer.encode(shots, add_special_tokens=False)
    tail = tokenizer.encode(TEMPLATE.format(word=""), add_special_tokens=False)
    ids = torch.tensor([head + [tid] + tail for tid, _ in words], dtype=torch.long)
    return ids, len(head)


@torch.no_grad()
def site_activations(model, site: str, ids: torch.Tensor, pos: int, batch: int = 64) -> torch.Tensor:
    """The residual stream at `site` at position `pos` of every prompt [N, d] (float32)."""
    out = []
    with models.SiteCapture(model, [site]) as cap:
        for chunk in ids.split(batch):
            cap(chunk.to(next(model.parameters()).device))
            out.append(cap.acts[site][:, pos].float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------- probes
def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, iters: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regression with balanced classes: y [N, C] in {0, 1}; returns (W [C, d], b [C]).
    Features are standardised for the fit and the weights mapped back."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mu) / sd).double()
    y = y.double()
    pos = y.sum(0).clamp_min(1)
    weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos).clamp_min(1)))
    W = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ W.T + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight) + l2 * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    W_raw = (W.detach() / sd.double()).float()
    return W_raw, (b.detach() - (W.detach() * (mu / sd).double()).sum(1)).float()


def f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(1.0, float(pred.sum()) + float(truth.sum()))


@dataclass
class Probe:
    """The first-letter probe of one model site: W [26, d], b [26], and its held-out F1 per letter."""

    W: torch.Tensor
    b: torch.Tensor
    f1: list[float]
    accuracy: float

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + self.b


def train_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> Probe:
    onehot = torch.nn.functional.one_hot(y_train, len(LETTERS))
    probe = Probe(*fit_logistic(x_train, onehot), f1=[], accuracy=0.0)
    s = probe.scores(x_test)
    probe.f1 = [f1(s[:, c] > 0, y_test == c) if bool((y_test == c).any()) else 0.0 for c in range(len(LETTERS))]
    probe.accuracy = float((s.argmax(1) == y_test).float().mean())
    return probe


def main_latents(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 letter: int) -> list[int]:
    """The letter's main latents by k-sparse probing: latents ranked by (mean activation on the letter's
    words - on the others), k grown from 1 while a logistic probe on the top k gains F1_JUMP in held-out F1."""
    pos = y_train == letter
    if not bool(pos.any()) or bool(pos.all()):
        return []
    gap = f_train[pos].mean(0) - f_train[~pos].mean(0)
    order = gap.topk(min(MAX_K, f_train.shape[1])).indices.tolist()
    best, chosen = -1.0, []
    for k in range(1, len(order) + 1):
        ids = order[:k]
        W, b = fit_logistic(f_train[:, ids], pos[:, None].long(), iters=50)
        score = f1((f_test[:, ids] @ W.T + b)[:, 0] > 0, y_test == letter)
        if score <= best + F1_JUMP:
            break
        best, chosen = score, ids
    return chosen


# ---------------------------------------------------------------- the measurement
def word_absorption(f: torch.Tensor, x: torch.Tensor, probe_dir: torch.Tensor, W_dec: torch.Tensor,
                    main: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction [N], full absorption [N] bool) of the words whose activations are x [N, d] and
    SAE latents f [N, m], for one letter's unit probe direction and main latents."""
    p = probe_dir / probe_dir.norm()
    along = W_dec @ p                                               # [m] each latent's decoder . probe
    cos = along / W_dec.norm(dim=1).clamp_min(1e-12)
    proj = f * along                                                # [N, m] each latent's projection
    total = x @ p                                                   # [N] the activation's projection
    is_main = torch.zeros(f.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    others = proj.masked_fill(is_main | (cos < FRACTION_COS), 0).clamp_min(0)
    top = others.topk(min(MAX_ABSORBERS, f.shape[1]), dim=1).values.sum(1)
    share = torch.where(total > 0, top / total.clamp_min(1e-12), torch.zeros_like(top))
    unaccounted = total - main_proj
    absorbed = torch.minimum(top, unaccounted)
    frac = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    frac = torch.where(main_proj <= 0, torch.ones_like(frac), frac)
    frac = torch.where((main_proj >= total) | (share < PROJECTION_SHARE), torch.zeros_like(frac), frac)
    lead, lead_at = proj.max(1)                                     # the latent projecting most onto the probe
    silent = (f[:, is_main] <= 1e-8).all(1)
    full = silent & (cos[lead_at] >= FULL_COS) & (total > 0) & (lead >= PROJECTION_SHARE * total)
    return frac, full


def absorption(encode: Callable[[torch.Tensor], torch.Tensor], W_dec: torch.Tensor, probe: Probe,
               x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
               ) -> dict[str, Any]:
    """Absorption of one SAE (encode: raw activations -> latents; W_dec [m, d] in the same space)."""
    with torch.no_grad():
        f_train, f_test = encode(x_train).float(), encode(x_test).float()
    scores = probe.scores(x_test)  # once, not per letter
    per_letter = {}
    for c, letter in enumerate(LETTERS):
        if probe.f1[c] < MIN_PROBE_F1:
            continue
        main = main_latents(f_train, y_train, f_test, y_test, c)
        hit = (y_test == c) & (scores[:, c] > 0)   # the probe's true positives
        if not bool(hit.any()):
            continue
        frac, full = word_absorption(f_test[hit], x_test[hit], probe.W[c], W_dec, main)
        per_letter[letter] = {"words": int(hit.sum()), "main_latents": main, "probe_f1": round(probe.f1[c], 4),
                              "absorption_fraction": float(frac.mean()), "full_absorption": float(full.float().mean())}
    mean = (lambda key: statistics.fmean(v[key] for v in per_letter.values()) if per_letter else None)  # noqa: E731
    return {"mean_absorption_fraction": mean("absorption_fraction"), "mean_full_absorption": mean("full_absorption"),
            "letters": len(per_letter), "trusted": len(per_letter) >= MIN_LETTERS,
            "mean_main_latents": (statistics.fmean(len(v["main_latents"]) for v in per_letter.values())
                                  if per_letter else None),
            "per_letter": per_letter}


# ---------------------------------------------------------------- one site's data, then every SAE
@dataclass
class SiteData:
    """The probe's data at one model site: activations and letters of the train and test words, the probe."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    probe: Probe
    info: dict[str, Any]


def site_data(cache: Cache, site: str, n_words: int, device: str) -> SiteData:
    """Words, prompts, activations and the probe for a cache's model at `site`: computed once, kept under
    data/absorption/ (keyed by the model, site and word count)."""
    spec = models.resolve_model(cache.attrs["model"], cache.attrs["settings"]["model"].get("revision"))
    key = hashlib.sha256(json.dumps([spec.identity(), site, n_words, TEMPLATE, ICL_EXAMPLES, "examples>=4"],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = DATA_DIR / "absorption" / f"{site}-{key}.pt"
    if path.exists():
        d = torch.load(path)
        return SiteData(d["x_train"], d["y_train"], d["x_test"], d["y_test"], Probe(**d["probe"]), d["info"])
    tok = models.load_tokenizer(spec)
    words = first_letter_words(tok, n_words + ICL_EXAMPLES)
    if len(words) < MIN_WORDS + ICL_EXAMPLES:
        raise PipelineError(f"the tokenizer of {spec.name} has only {len(words)} whole-word tokens; absorption needs "
                            f"at least {MIN_WORDS + ICL_EXAMPLES}")
    shots = [i for i, (_, w) in enumerate(words) if len(w) >= 4][:ICL_EXAMPLES]  # whole words, not fragments
    examples = [words[i][1] for i in shots]
    words = [w for i, w in enumerate(words) if i not in shots]
    ids, pos = prompts(tok, words, examples)
    model = models.load_model(spec, device, models.resolve_dtype(cache.attrs.get("model_dtype"), device))
    x = site_activations(model, site, ids, pos)
    y = torch.tensor([letter_of(w) for _, w in words])
    g = torch.Generator().manual_seed(0)
    test = torch.zeros(len(words), dtype=torch.bool)
    test[torch.randperm(len(words), generator=g)[:int(TEST_FRACTION * len(words))]] = True
    probe = train_probe(x[~test], y[~test], x[test], y[test])
    info = {"model": spec.name, "site": site, "words": len(words), "test_words": int(test.sum()),
            "template": TEMPLATE, "icl_examples": examples, "probe_accuracy": probe.accuracy,
            "probe_f1_mean": statistics.fmean(probe.f1),
            "letters_probe_trusted": sum(v >= MIN_PROBE_F1 for v in probe.f1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"x_train": x[~test], "y_train": y[~test], "x_test": x[test], "y_test": y[test],
                "probe": {"W": probe.W, "b": probe.b, "f1": probe.f1, "accuracy": probe.accuracy}, "info": info}, tmp)
    tmp.replace(path)
    return SiteData(x[~test], y[~test], x[test], y[test], probe, info)


def measure(sae_dirs: list[str], n_words: int = 4000, device: str | None = None) -> list[Path]:
    """Write absorption.json beside each SAE; the model runs once per cache and site."""
    device = device or models.default_device()
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for d in sae_dirs:
        sae, meta = load_sae(d, "cpu")
        groups[(meta["metadata"]["cache"], meta["metadata"]["hook_name"])].append((Path(d), sae))
    written = []
    for (cache_loc, site), items in sorted(groups.items()):
        data = site_data(Cache.open(cache_loc), site, n_words, device)
        for d, sae in items:
            out = absorption(sae.encode, sae.W_dec.detach().float(), data.probe, data.x_train, data.y_train,
                             data.x_test, data.y_test)
            out |= {"probe": data.info, "definitions": __doc__.split("\n\n")[1:3]}
            tmp = d / (ABSORPTION_FILE + ".tmp")
            tmp.write_text(json.dumps(out, indent=2))
            tmp.replace(d / ABSORPTION_FILE)
            written.append(d / ABSORPTION_FILE)
    return written
