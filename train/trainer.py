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
from tqdm import tqdm

from batchtopk.cache.format import Cache
from batchtopk.cache.split import Rows, Split
from batchtopk.core import distributed
from batchtopk.core.errors import PipelineError
from batchtopk.harvest.models import hub_name

from . import checkpoint
from .archs import ARCHS
from .executor import Executor
from .finish import Ending, finish, sets_threshold
from .rundir import RunDir, write_log_record
from .sae import SAE, SAEConfig
from .settings import THETA_ESTIMATORS, TrainSettings
from .stack import SAEStack, StackTrainer, stack_configs
from .stream import ActivationStream, warn_epochs


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
        per_step = self.stream.local * len(mine)  # the tokens one selection of this process sees
        for c in self.cfgs:
            if c.span is not None and per_step % c.span:
                raise PipelineError(f"{c.name}: span={c.span} must divide the {per_step} tokens each process steps on "
                                    f"(batch size {s.batch_size} over {parts} part(s)); allowed: a divisor of "
                                    f"{per_step}")
        self.tokens = s.tokens if s.tokens is not None else self.stream.epoch_tokens
        self.total_steps = max(1, math.ceil(self.tokens / s.batch_size))
        self.run_dir = RunDir(s.out)  # what the run writes, and where (train/rundir.py)
        self.out = self.run_dir.path
        self.identity = s.identity() | {"cache_id": self.cache.attrs["cache_id"], "site": self.site}
        self.step = 0
        self.step_t = torch.zeros((), dtype=torch.long, device=self.device)  # the step, as the step sees it
        self.theta_from = self.total_steps - max(1, round(self.total_steps * s.theta_window))
        self.executor = Executor.choose(self.device, s.compile, s.fixed_shape, s.precision, self.world)
        self._make_stacks(s.stack_size)

    def _make_stacks(self, size: int | None) -> None:
        """The SAEs of one architecture and shape train as one stack (of at most `size`); stacks[j] holds
        cfgs[groups[j]], freshly initialised."""
        s = self.s
        torch.manual_seed(s.seed)
        saes = [SAE(c, s.seed).to(self.device) for c in self.cfgs]
        for sae in saes:
            if sae.cfg.norm == "global":
                sae.input_scale.fill_(self.scale)
        self.groups = stack_configs(self.cfgs, size)
        self.stacks = [StackTrainer(SAEStack([saes[i] for i in g], s.lr, tuple(s.betas)), self.total_steps,
                                    self.theta_from, self.world, executor=self.executor) for g in self.groups]

    # ------------------------------------------------------------ state
    def sae_dir(self, cfg: SAEConfig) -> Path:
        return self.run_dir.sae_dir(cfg.name)

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "identity": self.identity, "layout": "stacks", "groups": self.groups,
                "stacks": [st.state_dict() for st in self.stacks], "torch_rng": torch.get_rng_state()}

    def save_state(self) -> None:
        """Write the checkpoint beside the old one, then replace it: a failed write (a full disk) leaves
        the previous checkpoint as it was."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self._state(), self.run_dir.state_file)

    def _check_out(self) -> bool:
        """True when OUT already holds this finished run. Refuse an OUT holding another run."""
        run = self.run_dir.read_run()
        if run is None:
            if self.out.exists() and any(self.out.iterdir()):
                raise PipelineError(f"OUT {self.out} is not empty and holds no training run; choose another OUT")
            return False
        if run.get("identity") != json.loads(json.dumps(self.identity)):
            raise PipelineError(f"OUT {self.out} holds a different training run; refusing to touch it "
                                "(choose another OUT, or delete it yourself)")
        return bool(run.get("complete"))

    def unstack(self) -> list[SAE]:
        """Every SAE of the run as a plain SAE, in the order of cfgs (what finishes the run reads)."""
        saes: list[SAE] = [None] * len(self.cfgs)  # type: ignore[list-item]
        for st, group in zip(self.stacks, self.groups):
            for s_i, i in enumerate(group):
                saes[i] = st.stack.sae(s_i)
        return saes

    def running_theta(self, i: int) -> float | None:
        """SAE i's running θ (see StackTrainer.running_theta), or None where it has none."""
        if not ARCHS[self.cfgs[i].arch].global_theta:
            return None
        j = next(j for j, g in enumerate(self.groups) if i in g)
        return self.stacks[j].running_theta(self.groups[j].index(i))

    def run_metadata(self) -> dict[str, Any]:
        """What every SAE's cfg.json records of the run: what SAELens-based tools (SAEBench, Neuronpedia
        uploads) read, the model by its hub id; where its data came from (the rows it saw, the batches)."""
        a, s = self.cache.attrs, self.s
        return {
            "model_name": hub_name(a["model"]), "hook_name": self.site, "context_size": a["ctx_len"],
            "prepend_bos": True, "dataset_path": a["dataset"].get("dataset"),
            "model": a["model"],
            "dataset": {k: a["dataset"].get(k) for k in ("dataset", "config", "split", "revision")},
            "cache": self.cache.location, "cache_id": a["cache_id"], "pipeline": s.pipeline,
            **self.rows.metadata(),  # heldout_sequences, heldout_every, calibration_sequences, include_bos, ...
            "training_tokens": self.step * s.batch_size, "batch_size": s.batch_size,
            "data_parts": self.stream.parts, "shuffle_mb": s.shuffle_mb,  # with the seed: the batches
            "seed": s.seed, "world_size": self.world, "global_input_scale": self.scale,
        }

    def finish(self) -> list[Path]:
        """Finish the run (finish.py: thresholds, the held-out pass, the saved SAEs), then save the state and mark
        the run complete."""
        batches = self.stream.batches(self.total_steps)  # the θ estimates' batches: those after the last step
        try:
            dirs = finish(Ending(self.unstack(), [self.sae_dir(c) for c in self.cfgs],
                                 [self.running_theta(i) for i in range(len(self.cfgs))], self.s, batches, self.rows,
                                 self.split, self.run_metadata(), self.executor, self.rank, self.world))
        finally:
            batches.close()
        if self.rank == 0:
            self.save_state()
            self.run_dir.mark_complete(dirs)
        distributed.barrier()
        return dirs

    def _resume(self) -> None:
        path = self.run_dir.state_file
        if not path.exists():
            return
        st = checkpoint.load(path, self.device)
        if st.get("layout") != "stacks":
            raise PipelineError(f"checkpoint {path} was written by an earlier version, which trained SAEs one by one; "
                                "finish the run with that version, or delete the checkpoint to train it again "
                                "from step 0")
        if st["groups"] != self.groups:  # another --stack-size (or, before 2026-12-02, the CPU's default of 1)
            size = max(map(len, st["groups"]))
            if self.s.stack_size is None and stack_configs(self.cfgs, size) == st["groups"]:
                self._make_stacks(size)  # no --stack-size given: the run goes on in the checkpoint's stacks
            else:
                raise PipelineError(f"checkpoint {path} holds stacks of up to {size} SAEs, this run would make stacks "
                                    f"of up to {max(map(len, self.groups))}; resume with --stack-size {size}")
        for stack, sd in zip(self.stacks, st["stacks"]):
            stack.load_state_dict(sd)
        self.step = st["step"]
        self.step_t.fill_(self.step)
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
            self.run_dir.start(self.identity, asdict(self.s), self.executor.name)
            print(f"train: {len(self.cfgs)} SAE(s) in {len(self.stacks)} stack(s); the step: {self.executor.name}",
                  file=sys.stderr)
        distributed.barrier()
        self._resume()
        warn_epochs(self.tokens, self.stream.epoch_tokens)
        logs = []
        for c in self.cfgs:
            if self.rank == 0:
                self.sae_dir(c).mkdir(parents=True, exist_ok=True)
            logs.append(self.run_dir.open_log(c.name) if self.rank == 0 else None)
        tb = _tensorboard(self.run_dir.tensorboard) if self.rank == 0 else None
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
                for st in self.stacks:
                    st.stack.init_from_data(x0)
                    for t in st.stack.parameters():  # every rank starts from rank 0's initialisation
                        distributed.broadcast_(t.data)
            waited = 0.0
            while self.step < self.total_steps:
                tw = time.perf_counter()
                x = next(batches)
                waited += time.perf_counter() - tw
                log = (self.step + 1) % self.s.log_every == 0 or self.step + 1 == self.total_steps
                metrics: list[dict[str, float]] = [{} for _ in self.cfgs]
                for st, group in zip(self.stacks, self.groups):
                    for i, m in zip(group, st.step(x, self.step_t, log) or ()):
                        metrics[i] = m
                self.step += 1
                self.step_t += 1
                due = [st for st in self.stacks if st.resample_due(self.step)]
                if due:  # (ReLU, Gated) dead latents re-initialised from this step's global batch
                    xg = distributed.all_gather_cat(x)
                    for st in due:
                        st.resample(xg, self.step, self.s.seed)
                bar.update(self.s.batch_size)
                if self.step % self.s.log_every == 0 or self.step == self.total_steps:
                    self._check_finite()
                    rate = (self.step * self.s.batch_size - tok0) / (time.perf_counter() - t0)
                    compiles = self._compile_counts()
                    for cfg, m, f in zip(self.cfgs, metrics, logs):
                        if f is not None:
                            rec = {"step": self.step, "tokens": self.step * self.s.batch_size, **m,
                                   "tokens_per_s": rate,
                                   "data_wait_fraction": waited / (time.perf_counter() - t0), **compiles[cfg.name]}
                            write_log_record(f, rec)
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
        return self.finish()

    def _compile_counts(self) -> dict[str, dict[str, int]]:
        """Per SAE (by name): its stack's compile counts so far (StackTrainer.compile_counts; empty uncompiled)."""
        return {self.cfgs[i].name: st.compile_counts() for st, g in zip(self.stacks, self.groups) for i in g}

    def _check_finite(self) -> None:
        """Stop at the first SAE whose loss became nan or inf, before anything of it is saved."""
        for st, group in zip(self.stacks, self.groups):
            bad = st.first_bad()
            if bad is not None:
                s_i, step, loss = bad
                raise PipelineError(f"loss became {loss} at step {step} for {self.cfgs[group[s_i]].name}; stopped; "
                                    f"the last good checkpoint in {self.out} is kept (step "
                                    f"{self._saved_step()}); try a lower learning rate")

    def _saved_step(self) -> int | str:
        p = self.run_dir.state_file
        return checkpoint.load(p)["step"] if p.exists() else "none"


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
