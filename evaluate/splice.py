"""Run the model clean, or with a site's activation replaced, and read the logits.

Blocks before the site give the same output in every spliced pass, and that output is
replaced anyway, so spliced passes swap them for the identity: each costs only the layers
from the site onward (plus embeddings and the head).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from batchtopk.harvest.models import SiteCapture, decoder_layers, parse_site


class Splicer:
    def __init__(self, model, site: str):
        self.model, self.site = model, site
        self.layer, self.kind = parse_site(site)
        self.cap = SiteCapture(model, [site], stop=False)
        self._out_template = None

    def clean(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [b, t, vocab], site activation [b, t, d])."""
        self.cap.replace.clear()
        if self._out_template is None:
            self._record_output_type(ids)
        out = self.cap(ids)
        self._clean = self.cap.acts[self.site]
        return out.logits, self._clean

    def spliced(self, ids: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Logits with the site's activation replaced by fn(clean activation of the same ids).

        Call clean(ids) first: the skipped blocks never compute the site's input, so fn
        always starts from the clean activation.
        """
        clean = self._clean
        self.cap.replace[self.site] = lambda h: fn(clean)
        try:
            with self._skip_early_blocks():
                return self.cap(ids).logits
        finally:
            self.cap.replace.clear()

    def _record_output_type(self, ids: torch.Tensor) -> None:
        block = decoder_layers(self.model)[0]
        seen = {}
        h = block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
        try:
            self.model(input_ids=ids[:1, :2], use_cache=False)
        finally:
            h.remove()
        self._out_template = seen["out"]

    @contextlib.contextmanager
    def _skip_early_blocks(self) -> Iterator[None]:
        n_skip = self.layer if self.kind == "resid_pre" else self.layer + 1
        blocks = list(decoder_layers(self.model))[:n_skip]
        template = self._out_template

        def identity(hidden_states=None, *args, **kwargs):
            if hidden_states is None:
                hidden_states = args[0]
            if isinstance(template, tuple):
                return (hidden_states, *template[1:])
            return hidden_states

        saved = [b.forward for b in blocks]
        try:
            for b in blocks:
                b.forward = identity
            yield
        finally:
            for b, f in zip(blocks, saved):
                b.forward = f

    def close(self) -> None:
        self.cap.remove()
