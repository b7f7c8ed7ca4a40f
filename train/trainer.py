"""Train one or several SAEs (a sweep) in a single pass over a cache, with checkpoints and resume."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Split, heldout_chunk_rows, heldout_rows
from batchtopk.core import distributed
from batchtopk.core.errors import PipelineError
from batchtopk.harvest.models import hub_name

from . import checkpoint, recipe
from .sae import SAE, SAEConfig, save_sae, standardized_mse
from .stream import ActivationStream, warn_epochs
from .theta import ESTIMATORS, estimate_theta, target_shift

STATE_FILE = "state.pt"
RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
# unseen: the pooled estimate over held-out sequences set aside for it (text the SAE never trained on)
THETA_ESTIMATORS = ("unseen", *ESTIMATORS, "running")
HELDOUT_L0_ROWS = 1 << 17  # held-out rows the final L0 check reads at most (the paper pipeline has 31,608)
VAL_ROWS = 8192  # held-out rows of the validation NMSE in each SAE's metadata


@dataclass
class TrainSettings:
    cache: str
    saes: list[dict[str, Any]]          # SAEConfig fields except d_in
    out: str
    site: str | None = None             # default: the cache's only (first) site
    tokens: int | None = None           # None: one epoch of the training part
    batch_size: int = 4096
    lr: float = 1e-3                    # measured at the paper pipeline's budget (README, bench/ablation.py)
    betas: tuple[float, float] = (0.9, 0.99)
    seed: int = 0
    val_fraction: float = 0.05
    heldout: str = "tail"               # tail | interleaved: which rows are held out (cache/split.py Split)
    theta_estimator: str = "unseen"     # unseen | pooled | mean (eq. 7 with the final weights) | running
    theta_tokens: int = 65536           # tokens the final-weight estimates look at (at most)
    theta_window: float = 0.2           # running: the mean over the last 20% of training batches
    log_every: int = 10
    checkpoint_every: int = 200
    shuffle_mb: float = 512
    include_bos: bool = False           # BOS rows (huge, constant residuals) are left out by default
    include_outliers: bool = False      # so are the rare massive-activation rows the cache lists
    local_copy: str | None = None       # read-through local copy of a remote cache's chunks
    data_parts: int | None = None       # parts of each global batch (default: one per rank)
    device: str | None = None
    pipeline: str | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (resume only a matching one). Each SAE counts with every
        field of its configuration, defaults included, so a change of defaults makes a new run."""
        keep = ("site", "tokens", "batch_size", "lr", "betas", "seed", "val_fraction", "theta_estimator",
                "theta_tokens", "theta_window", "include_bos", "include_outliers")
        saes = [{k: v for k, v in asdict(SAEConfig(d_in=1, **c)).items() if k != "d_in"} for c in self.saes]
        ident = {"cache_id": None, "saes": saes, **{k: getattr(self, k) for k in keep}}
        return ident | ({"heldout": self.heldout} if self.heldout != "tail" else {})  # older runs: tail


class Objective(nn.Module):
    """Wraps an SAE so DistributedDataParallel sees the training loss as its forward."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, dead: torch.Tensor, coeff: float | None):
        x_in, _ = self.sae.normalize(x)
        out, code = self.sae.losses(x_in, dead, coeff)
        return out, code, x_in


def _sets_threshold(c: SAEConfig) -> bool:
    """Whether an SAE has a threshold set from its final weights: BatchTopK's θ, or the factor on a
    target-L0 JumpReLU's thresholds."""
    return c.arch == "batchtopk" or (c.arch == "jumprelu" and c.target_l0 is not None)


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, s: TrainSettings):
        if s.theta_estimator not in THETA_ESTIMATORS:
            raise PipelineError(f"unknown theta estimator {s.theta_estimator!r}; allowed: {', '.join(THETA_ESTIMATORS)}")
        self.s = s
        self.rank, self.world, dev = distributed.init_from_env()
        self.device = s.device or dev
        self.cache = Cache.open(s.cache, local_copy=s.local_copy)  # complete, or a clear error
        self.site = s.site or self.cache.sites[0]
        self.cache.check_site(self.site)
        stats = self.cache.train_stats(self.site, s.include_bos)
        self.drop = None if s.include_bos else int(self.cache.tokens[0, 0])
        self.skip = None if s.include_outliers else self.cache.outliers(self.site)[0]
        self.d = self.cache.d_model()
        self.scale = math.sqrt(self.d) / float(stats["mean_norm"])  # global norm: mean norm sqrt(d)
        self.cfgs = [SAEConfig(d_in=self.d, **c) for c in s.saes]
        names = [c.name for c in self.cfgs]
        if len(set(names)) != len(names):
            raise PipelineError(f"the sweep names the same SAE twice: {', '.join(names)}")
        # thresholds set after training are calibrated on half of the held-out sequences, which
        # evaluation then leaves to them
        unseen = s.theta_estimator == "unseen" and any(map(_sets_threshold, self.cfgs))
        self.split = Split.of(self.cache, s.val_fraction, s.heldout, calibrate=unseen)
        if unseen and not self.split.calibrate:
            warnings.warn("no held-out part (val_fraction 0): θ is estimated on training tokens (pooled)", stacklevel=2)
        parts = s.data_parts or self.world
        if self.world > 1 and parts != self.world:
            raise PipelineError(f"data_parts={parts} must equal the number of ranks ({self.world})")
        mine = (self.rank,) if self.world > 1 else tuple(range(parts))
        # raw activations: each SAE brings them into its own input space (SAE.normalize)
        self.stream = ActivationStream(self.cache, self.site, self.split, s.batch_size, 1.0,
                                       seed=s.seed, parts=parts, my_parts=mine,
                                       shuffle_mb=s.shuffle_mb, device=self.device, drop_token=self.drop,
                                       skip_rows=self.skip)
        self.tokens = s.tokens if s.tokens is not None else self.stream.epoch_tokens
        self.total_steps = max(1, math.ceil(self.tokens / s.batch_size))
        self.out = Path(s.out)
        self.identity = s.identity() | {"cache_id": self.cache.attrs["cache_id"], "site": self.site}
        torch.manual_seed(s.seed)
        self.saes = [SAE(c, s.seed).to(self.device) for c in self.cfgs]
        for sae in self.saes:
            if sae.cfg.norm == "global":
                sae.input_scale.fill_(self.scale)
        self.objectives: list[nn.Module] = [Objective(sae) for sae in self.saes]
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.objectives = [DDP(o, device_ids=[torch.device(self.device).index] if self.device.startswith("cuda")
                                   else None) for o in self.objectives]
        self.opts = [recipe.make_optimizer(sae, s.lr, tuple(s.betas)) for sae in self.saes]
        self.since_fired = [torch.zeros(c.d_sae, dtype=torch.long, device=self.device) for c in self.cfgs]
        self.bad_step = [torch.tensor(-1, device=self.device) for _ in self.cfgs]  # first non-finite loss
        self.bad_loss = [torch.tensor(0.0, device=self.device) for _ in self.cfgs]
        # running θ: the sum of each batch's smallest kept activation, kept on the device (float64)
        self.theta_sum = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in self.saes]
        self.theta_n = [0] * len(self.saes)
        self.step = 0
        self.theta_from = self.total_steps - max(1, round(self.total_steps * s.theta_window))

    # ------------------------------------------------------------ state
    def sae_dir(self, cfg: SAEConfig) -> Path:
        return self.out / cfg.name

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "identity": self.identity,
                "saes": [s.state_dict() for s in self.saes], "opts": [o.state_dict() for o in self.opts],
                "since_fired": [t.cpu() for t in self.since_fired], "theta_sum": [float(t) for t in self.theta_sum],
                "theta_n": self.theta_n, "torch_rng": torch.get_rng_state()}

    def save_state(self) -> None:
        """Write the checkpoint beside the old one, then replace it: a failed write (a full disk) leaves
        the previous checkpoint as it was."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self._state(), self.out / STATE_FILE)

    def _check_out(self) -> bool:
        """True when OUT already holds this finished run. Refuse an OUT holding another run."""
        run_file = self.out / RUN_FILE
        if not run_file.exists():
            if self.out.exists() and any(self.out.iterdir()):
                raise PipelineError(f"OUT {self.out} is not empty and holds no training run; choose another OUT")
            return False
        try:
            run = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{run_file} is unreadable ({type(e).__name__}): restore it, or delete {self.out} "
                                "to train this run again") from None
        if run.get("identity") != json.loads(json.dumps(self.identity)):
            raise PipelineError(f"OUT {self.out} holds a different training run; refusing to touch it "
                                "(choose another OUT, or delete it yourself)")
        return bool(run.get("complete"))

    def _resume(self) -> None:
        path = self.out / STATE_FILE
        if not path.exists():
            return
        st = checkpoint.load(path, self.device)
        for sae, sd in zip(self.saes, st["saes"]):
            sae.load_state_dict(sd)
        for opt, sd in zip(self.opts, st["opts"]):
            opt.load_state_dict(sd)
        self.since_fired = [t.to(self.device) for t in st["since_fired"]]
        self.theta_sum = [torch.tensor(v, dtype=torch.float64, device=self.device) for v in st["theta_sum"]]
        self.theta_n, self.step = st["theta_n"], st["step"]
        torch.set_rng_state(st["torch_rng"])
        if self.rank == 0:
            print(f"resuming {self.out} at step {self.step}/{self.total_steps}", file=sys.stderr)

    # ------------------------------------------------------------ loop
    def run(self) -> list[Path]:
        done = self._check_out()
        distributed.barrier()  # every rank has read OUT before rank 0 writes to it
        if done:
            return [self.sae_dir(c) for c in self.cfgs]
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_FILE).write_text(json.dumps({"identity": self.identity, "complete": False,
                                                         "settings": asdict(self.s)}, indent=2))
        distributed.barrier()
        self._resume()
        warn_epochs(self.tokens, self.stream.epoch_tokens)
        logs = []
        for c in self.cfgs:
            if self.rank == 0:
                self.sae_dir(c).mkdir(parents=True, exist_ok=True)
            logs.append(open(self.sae_dir(c) / LOG_FILE, "a") if self.rank == 0 else None)
        tb = _tensorboard(self.out) if self.rank == 0 else None
        bar = tqdm(total=self.total_steps * self.s.batch_size, initial=self.step * self.s.batch_size, unit="tok",
                   unit_scale=True, desc="train", file=sys.stderr, disable=None if self.rank == 0 else True)
        interrupted = {"flag": False}
        old = signal.signal(signal.SIGTERM, lambda *a: interrupted.update(flag=True))
        t0, tok0 = time.perf_counter(), self.step * self.s.batch_size
        batches = self.stream.batches(self.step)
        try:
            if self.step == 0:
                first = self.stream.batches(0)
                x0 = distributed.all_gather_cat(next(first))  # the whole first global batch
                first.close()
                for sae in self.saes:
                    sae.init_from_data(sae.normalize(x0)[0])
                    for t in sae.parameters():  # every rank starts from rank 0's initialisation
                        distributed.broadcast_(t.data)
            waited = 0.0
            while self.step < self.total_steps:
                tw = time.perf_counter()
                x = next(batches)
                waited += time.perf_counter() - tw
                metrics = [self._train_step(i, x) for i in range(len(self.saes))]
                self.step += 1
                bar.update(self.s.batch_size)
                if self.step % self.s.log_every == 0 or self.step == self.total_steps:
                    self._check_finite()
                    rate = (self.step * self.s.batch_size - tok0) / (time.perf_counter() - t0)
                    for cfg, m, f in zip(self.cfgs, metrics, logs):
                        if f is not None:
                            rec = {"step": self.step, "tokens": self.step * self.s.batch_size, **m,
                                   "tokens_per_s": rate,
                                   "data_wait_fraction": waited / (time.perf_counter() - t0)}
                            f.write(json.dumps(rec) + "\n")
                            f.flush()
                            if tb is not None:
                                for k, v in m.items():
                                    tb.add_scalar(f"{cfg.name}/{k}", v, self.step)
                if self.step % self.s.checkpoint_every == 0:
                    self._check_finite()
                    self.save_state()
                if interrupted["flag"]:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._check_finite()
            self.save_state()
            bar.close()
            raise PipelineError(f"interrupted at step {self.step}/{self.total_steps}; state saved in {self.out}, "
                                "run the same command to resume") from None
        finally:
            signal.signal(signal.SIGTERM, old)
            batches.close()
            for f in logs:
                if f is not None:
                    f.close()
        bar.close()
        return self._finish()

    def _train_step(self, i: int, x: torch.Tensor) -> dict[str, float]:
        sae, opt, obj, cfg = self.saes[i], self.opts[i], self.objectives[i], self.cfgs[i]
        dead = self.since_fired[i] >= cfg.dead_tokens
        coeff = recipe.sparsity_coeff(cfg, self.step, self.total_steps)
        f = recipe.lr_factor(cfg, self.step, self.total_steps)
        recipe.set_lr(opt, f)
        opt.zero_grad(set_to_none=True)
        with _autocast(self.device):
            out, code, x_in = obj(x, dead, coeff)
        loss = out["loss"]
        with torch.no_grad():  # noted on the device, read back at log steps and before saving (_check_finite)
            new = (self.bad_step[i] < 0) & ~torch.isfinite(loss)
            self.bad_step[i] = torch.where(new, self.step + 1, self.bad_step[i])
            self.bad_loss[i] = torch.where(new, loss.detach().float(), self.bad_loss[i])
        loss.backward()
        sae.prepare_grads()
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = code.fired()
            distributed.all_reduce_(fired)
            self.since_fired[i] = torch.where(fired > 0, 0, self.since_fired[i] + x.shape[0] * self.world)
            if cfg.arch == "batchtopk" and self.step >= self.theta_from and code.pairs:
                mn = code.min_active().float().reshape(1)
                distributed.all_reduce_(mn, "sum")
                self.theta_sum[i] += mn[0].double() / self.world
                self.theta_n[i] += 1
            if (self.step + 1) % self.s.log_every and self.step + 1 != self.total_steps:
                return {}
            x_hat = out["x_hat"].float()
            names = [k for k in out if k != "x_hat"]
            # combined over ranks: losses averaged, NMSE from summed errors and variances, L0 over all tokens
            agg = torch.stack([out[k].detach().float() / self.world for k in names] +
                              [(x_in - x_hat).pow(2).sum(), (x_in - x_in.mean(0)).pow(2).sum(),
                               torch.tensor(float(code.nnz), device=x.device)])
            distributed.all_reduce_(agg)
            m = {k: float(v) for k, v in zip(names, agg)}
            m.update(nmse=float(agg[-3] / agg[-2]), l0=float(agg[-1]) / (x.shape[0] * self.world),
                     dead=int((self.since_fired[i] >= cfg.dead_tokens).sum()), lr_factor=f)
            if coeff is not None:
                m["sparsity_coeff"] = coeff
            if self.theta_n[i]:
                m["theta_running"] = float(self.theta_sum[i]) / self.theta_n[i]
            return m

    def _check_finite(self) -> None:
        """Stop at the first SAE whose loss became nan or inf, before anything of it is saved."""
        for i, cfg in enumerate(self.cfgs):
            step = int(self.bad_step[i])
            if step >= 0:
                raise PipelineError(f"loss became {float(self.bad_loss[i])} at step {step} for {cfg.name}; stopped; "
                                    f"the last good checkpoint in {self.out} is kept (step "
                                    f"{self._saved_step()}); try a lower learning rate")

    def _saved_step(self) -> int | str:
        p = self.out / STATE_FILE
        return checkpoint.load(p)["step"] if p.exists() else "none"

    def _estimate_thetas(self) -> list[dict[str, float] | None]:
        """Thresholds from the final weights: every BatchTopK SAE's θ estimates (theta.py) over the
        training batches that follow the last step (theta_tokens tokens, at the training batch size)
        and, with a calibration part, over its rows (`unseen`, the same batch size); for a JumpReLU with
        a target L0 the factor on its thresholds that lands it there, over the calibration part if
        there is one, else those training batches."""
        todo = [i for i, c in enumerate(self.cfgs) if _sets_threshold(c)]
        out: list[dict[str, float] | None] = [None] * len(self.saes)
        if not todo:
            return out
        n = max(1, math.ceil(self.s.theta_tokens / self.s.batch_size))
        it = self.stream.batches(self.total_steps)
        xs = [next(it) for _ in range(n)]
        it.close()
        unseen = []
        if self.split.calibrate:
            rows = heldout_rows(self.cache, self.site, self.split, self.s.theta_tokens, 1.0, self.drop, self.skip,
                                part="calibration")
            unseen = [x.to(self.device) for x in rows.split(self.s.batch_size)]
        for i in todo:
            sae, cfg = self.saes[i], self.cfgs[i]
            with torch.no_grad(), _autocast(self.device):
                def pre(x, sae=sae):
                    return sae.pre(sae.normalize(x)[0])
                if cfg.arch == "batchtopk":
                    est = estimate_theta(xs, pre, cfg.k)
                    if unseen:
                        est["unseen"] = estimate_theta(unseen, pre, cfg.k)["pooled"]
                    est["running"] = float(self.theta_sum[i]) / max(1, self.theta_n[i])
                else:
                    est = {"threshold_factor": target_shift(unseen or xs, pre, sae.threshold, cfg.target_l0) or 1.0}
            for key in est:  # ranks saw different batches: average their estimates
                v = torch.tensor([est[key]], device=self.device)
                est[key] = float(distributed.all_reduce_(v)) / self.world
            out[i] = est
        return out

    @property
    def theta_estimator(self) -> str:
        """The estimator θ is set by: `unseen` needs a calibration part (none without held-out rows)."""
        return "pooled" if self.s.theta_estimator == "unseen" and not self.split.calibrate else self.s.theta_estimator

    @torch.no_grad()
    def _heldout_pass(self, thetas: list[dict[str, float] | None], val_rows: int = VAL_ROWS
                      ) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
        """One read of the held-out rows evaluation reads: their first val_rows rows (the validation
        NMSE), and the inference-mode L0 of every SAE whose L0 is not fixed by construction (BatchTopK's
        θ, also at each of its other θ estimates; JumpReLU's thresholds) over whole chunks, up to
        HELDOUT_L0_ROWS, chunk by chunk: held-out text differs from chunk to chunk, and the spread over
        chunks says how far a difference from k (or the target) is more than that."""
        todo = [i for i, c in enumerate(self.cfgs) if c.arch in ("batchtopk", "jumprelu")]
        sums: dict[int, list[float]] = {i: [] for i in todo}
        at: dict[int, dict[str, float]] = {i: dict.fromkeys(thetas[i], 0.0) for i in todo
                                           if self.cfgs[i].arch == "batchtopk" and thetas[i]}
        rows: list[int] = []  # per chunk the L0 check saw
        val: list[torch.Tensor] = []
        for x in heldout_chunk_rows(self.cache, self.site, self.split, self.drop, self.skip):
            need_val = sum(map(len, val)) < val_rows
            need_l0 = bool(todo) and sum(rows) < HELDOUT_L0_ROWS  # a large held-out part is not read whole
            if not (need_val or need_l0):
                break
            if need_val:
                val.append(x)
            if not need_l0 or not len(x):
                continue
            x = x.to(self.device)
            rows.append(len(x))
            for i in todo:
                sae = self.saes[i]
                with _autocast(self.device):
                    pre = sae.pre(sae.normalize(x)[0])
                    counts = sae.code(pre, sae.modes[0]).counts
                    for name in at.get(i, {}):
                        at[i][name] += float((pre > max(thetas[i][name], 0.0)).sum())
                sums[i].append(float(counts.sum()))
        out: list[dict[str, Any] | None] = [None] * len(self.saes)
        for i in todo:
            per_chunk = [s / n for s, n in zip(sums[i], rows)]
            spread = statistics.stdev(per_chunk) / math.sqrt(len(per_chunk)) if len(per_chunk) > 1 else 0.0
            out[i] = {"mean": sum(sums[i]) / sum(rows), "standard_error": spread, "per_chunk": per_chunk,
                      "rows": sum(rows), "mode": self.saes[i].modes[0]}
            if i in at:
                out[i]["at_estimates"] = {name: v / sum(rows) for name, v in at[i].items()}
        return torch.cat(val)[:val_rows].to(self.device), out

    def _finish(self) -> list[Path]:
        thetas = self._estimate_thetas()
        dirs = []
        for sae, cfg, est in zip(self.saes, self.cfgs, thetas):
            if est is not None and cfg.arch == "batchtopk":
                sae.theta.fill_(est[self.theta_estimator])
            elif est is not None:
                with torch.no_grad():
                    sae.log_threshold.add_(math.log(est["threshold_factor"]))
            dirs.append(self.sae_dir(cfg))
        if self.rank == 0:
            val, l0s = self._heldout_pass(thetas) if self.split.heldout_chunks else (None, [None] * len(self.saes))
            for sae, cfg, d, est, l0 in zip(self.saes, self.cfgs, dirs, thetas, l0s):
                meta = self._metadata(cfg)
                if est is not None:
                    meta["theta_estimates" if cfg.arch == "batchtopk" else "target_l0_calibration"] = est
                if l0 is not None:
                    meta["heldout_l0"] = l0
                with torch.no_grad():
                    for mode in sae.modes if val is not None else ():
                        x_hat = sae(val, mode)
                        meta[f"val_nmse_{mode}"] = float((val - x_hat).pow(2).sum() / (val - val.mean(0)).pow(2).sum())
                        meta[f"val_standardized_mse_{mode}"] = float(standardized_mse(val, x_hat).mean())
                save_sae(sae, d, meta)
            self.save_state()
            run = json.loads((self.out / RUN_FILE).read_text())
            (self.out / RUN_FILE).write_text(json.dumps(run | {"complete": True, "saes": [str(d) for d in dirs]},
                                                        indent=2))
        distributed.barrier()
        return dirs

    def _metadata(self, cfg: SAEConfig) -> dict[str, Any]:
        a = self.cache.attrs
        cal = self.split.sequences(self.cache, "calibration")
        theta_doc = {"unseen": f"the smallest activation kept by one batch top-k over up to {self.s.theta_tokens} tokens "
                               f"of held-out sequences range({cal.start}, {cal.stop}, {cal.step}), never trained on, "
                               "final weights",
                     "pooled": f"the smallest activation kept by one batch top-k over {self.s.theta_tokens} training "
                               "tokens, final weights",
                     "mean": f"the mean smallest kept activation of batches of {self.s.batch_size} over "
                             f"{self.s.theta_tokens} training tokens, final weights (eq. 7)",
                     "running": f"the mean smallest kept activation over the last {self.s.theta_window:.0%} of "
                                "training batches, weights of each step"}
        bt = cfg.arch == "batchtopk"
        return {
            # what SAELens-based tools (SAEBench, Neuronpedia uploads) read: the model by its hub id
            "model_name": hub_name(a["model"]), "hook_name": self.site, "context_size": a["ctx_len"],
            "prepend_bos": True, "dataset_path": a["dataset"].get("dataset"),
            "model": a["model"], "dataset": {k: a["dataset"].get(k) for k in ("dataset", "config", "split", "revision")},
            "cache": self.cache.location, "cache_id": a["cache_id"],
            "architecture": cfg.arch, "k": cfg.k, "d_sae": cfg.d_sae, "pipeline": self.s.pipeline,
            **self.split.metadata(self.cache),  # heldout_sequences, heldout_every, calibration_sequences, ...
            "training_tokens": self.step * self.s.batch_size, "batch_size": self.s.batch_size,
            "data_parts": self.stream.parts, "shuffle_mb": self.s.shuffle_mb,  # with the seed: the batches
            "lr": cfg.lr if cfg.lr is not None else self.s.lr, "betas": list(cfg.betas or self.s.betas),
            "seed": self.s.seed, "replicate": cfg.replicate, "world_size": self.world, "include_bos": self.s.include_bos,
            "excluded_outlier_rows": 0 if self.skip is None else int(len(self.skip)),
            "global_input_scale": self.scale,
            "theta": float(self.saes[self.cfgs.index(cfg)].theta) if bt else None,
            "theta_estimator": self.theta_estimator if bt else None,
            "theta_estimate": theta_doc[self.theta_estimator] if bt else None,
        }


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def run_id(cache_id: str, s: TrainSettings) -> str:
    ident = s.identity() | {"cache_id": cache_id}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if len(s.saes) == 1:
        return f"{SAEConfig(d_in=1, **s.saes[0]).name}-{h}"
    return f"sweep{len(s.saes)}-{h}"
