"""Train one or several SAEs (a sweep) in a single pass over a cache, with checkpoints and resume."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows, Split
from batchtopk.core import distributed
from batchtopk.core.errors import PipelineError

from . import checkpoint, recipe
from .finish import finish, sets_threshold
from .sae import NMSE, SAE, SAEConfig, autocast
from .settings import THETA_ESTIMATORS, TrainSettings
from .stream import ActivationStream, warn_epochs

STATE_FILE = "state.pt"
RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"


class Objective(nn.Module):
    """Wraps an SAE so DistributedDataParallel sees the training loss as its forward."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, dead: torch.Tensor, coeff: float | None):
        x_in, _ = self.sae.normalize(x)
        out, code = self.sae.losses(x_in, dead, coeff)
        return out, code, x_in


class Trainer:
    def __init__(self, s: TrainSettings):
        if s.theta_estimator not in THETA_ESTIMATORS:
            raise PipelineError(f"unknown theta estimator {s.theta_estimator!r}; "
                                f"allowed: {', '.join(THETA_ESTIMATORS)}")
        self.s = s
        self.rank, self.world, dev = distributed.init_from_env()
        self.device = s.device or dev
        self.cache = Cache.open(s.cache, local_copy=s.local_copy)  # complete, or a clear error
        self.site = s.site or self.cache.sites[0]
        self.cache.check_site(self.site)
        stats = self.cache.train_stats(self.site, s.include_bos)
        self.d = self.cache.d_model()
        self.scale = math.sqrt(self.d) / float(stats["mean_norm"])  # global norm: mean norm sqrt(d)
        self.cfgs = [SAEConfig(d_in=self.d, **c) for c in s.saes]
        names = [c.name for c in self.cfgs]
        if len(set(names)) != len(names):
            raise PipelineError(f"the sweep names the same SAE twice: {', '.join(names)}")
        # thresholds set after training are calibrated on half of the held-out sequences, which
        # evaluation then leaves to them
        unseen = s.theta_estimator == "unseen" and any(map(sets_threshold, self.cfgs))
        self.split = Split.of(self.cache, s.val_fraction, s.heldout, calibrate=unseen)
        self.rows = Rows(self.cache, self.site, self.split, s.include_bos, s.include_outliers)
        if unseen and not self.split.calibrate:
            warnings.warn("no held-out part (val_fraction 0): θ is estimated on training tokens (pooled)", stacklevel=2)
        parts = s.data_parts or self.world
        if self.world > 1 and parts != self.world:
            raise PipelineError(f"data_parts={parts} must equal the number of ranks ({self.world})")
        mine = (self.rank,) if self.world > 1 else tuple(range(parts))
        # raw activations: each SAE brings them into its own input space (SAE.normalize)
        self.stream = ActivationStream(self.rows, s.batch_size, 1.0, seed=s.seed, parts=parts, my_parts=mine,
                                       shuffle_mb=s.shuffle_mb, device=self.device)
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

    def mark_complete(self, dirs: list[Path]) -> None:
        """Record in the run file that the run finished and which SAE directories it wrote."""
        run = json.loads((self.out / RUN_FILE).read_text())
        (self.out / RUN_FILE).write_text(json.dumps(run | {"complete": True, "saes": [str(d) for d in dirs]}, indent=2))

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
        return finish(self)

    def _train_step(self, i: int, x: torch.Tensor) -> dict[str, float]:
        sae, opt, obj, cfg = self.saes[i], self.opts[i], self.objectives[i], self.cfgs[i]
        dead = self.since_fired[i] >= cfg.dead_tokens
        coeff = recipe.sparsity_coeff(cfg, self.step, self.total_steps)
        f = recipe.lr_factor(cfg, self.step, self.total_steps)
        recipe.set_lr(opt, f)
        opt.zero_grad(set_to_none=True)
        with autocast(self.device):
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
            names = [k for k in out if k != "x_hat"]
            # combined over ranks: losses averaged, NMSE over every rank's tokens, L0 over all tokens
            err = NMSE().add(x_in, out["x_hat"])
            agg = torch.stack([out[k].detach().double() / self.world for k in names] +
                              [torch.tensor(float(code.nnz), dtype=torch.float64, device=x.device)])
            distributed.all_reduce_(agg)
            distributed.all_reduce_(err.terms)
            m = {k: float(v) for k, v in zip(names, agg)}
            m.update(nmse=err.value, l0=float(agg[-1]) / (x.shape[0] * self.world),
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


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
