"""Harvest throughput against a plain forward pass up to the same layer and a full forward pass."""
from __future__ import annotations

import tempfile

import numpy as np
import torch

from batchtopk.cache.format import Cache
from batchtopk.harvest import models
from batchtopk.harvest.cli import settings_from
from batchtopk.harvest.run import harvest_activations, plan, prepare_tokens

from .records import Record, device_name, timed


def run(tokens: int = 8192, batch_size: int = 32, device: str | None = None) -> list[Record]:
    with tempfile.TemporaryDirectory() as tmp:
        s = settings_from(None)[1]  # the default pipeline: the embedded model and corpus
        s.tokens, s.cache_root, s.device, s.batch_size = tokens, tmp, device, batch_size
        p = plan(s)
        prepare_tokens(p)
        cache = Cache.open(p.location, mode="r+", need_complete=False)
        model = models.load_model(p.model, p.device, p.torch_dtype)
        ids = torch.from_numpy(cache.tokens[:].astype(np.int64)).to(p.device)
        batches = ids.split(batch_size)
        n_layers = models.n_layers(p.config)
        layer = models.parse_site(p.sites[0])[0]
        settings = {"model": p.model.name, "site": p.sites[0], "tokens": ids.numel(), "batch_sequences": batch_size,
                    "ctx_len": s.ctx_len, "dtype": s.dtype, "model_dtype": str(p.torch_dtype), "layers": n_layers}

        def truncated():
            with models.SiteCapture(model, p.sites) as cap, torch.inference_mode():
                for b in batches:
                    cap(b)

        def full():
            with torch.inference_mode():
                for b in batches:
                    model(input_ids=b, use_cache=False)

        def harvest():
            fresh = Cache.open(p.location, mode="r+", need_complete=False)
            fresh.checksums[:, 1:] = 0  # forget finished chunks: write everything again
            harvest_activations(p, fresh, 0, 1, None, model=model)

        t_trunc = timed(truncated, repeat=2, device=p.device)
        t_full = timed(full, repeat=2, device=p.device)
        t_harv = timed(harvest, repeat=2, device=p.device)
    n = ids.numel()
    dev = device_name(p.device)
    return [
        Record("harvest (forward + write)", n / t_harv, "tok/s", "forward to the site, no writes", n / t_trunc,
               dev, settings),
        Record("forward to the site (stops early)", n / t_trunc, "tok/s", "full forward with logits", n / t_full, dev,
               settings | {"layers_run": layer, "ideal_ratio_if_cost_per_layer": round(n_layers / max(1, layer), 2)}),
    ]
