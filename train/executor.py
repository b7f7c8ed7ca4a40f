"""How a stack's training step runs, chosen once at set-up from three settings that mean the same on every
device: the shapes (the CPU's exact eager step, or the fixed-shape step), compiled or not, and the math's
precision (float32, or bfloat16 autocast around the forward as a GPU runs it).

- exact: the CPU's eager shortcuts (host reads, data-dependent shapes; the auxiliary loss exact at every step);
  the default on the CPU.
- fixed: every tensor's shape fixed by the settings, nothing read back from the device (the GPU's program);
  compiled, the whole step is one graph, on CUDA replayed as a CUDA graph (the default on one GPU).

`python -m train --compile on --precision bf16` on the CPU runs the program a GPU runs, without CUDA graphs.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from batchtopk.core.errors import PipelineError

from .kernels import EXACT, FIXED, FixedKernels

PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("auto", "on", "off")
# The compiled step traces autograd (backward) into its graph and gives each stack a compile cache of its own
# (torch.compile's isolate_recompiles): the torch it is tested with. pyproject's `compile` extra says the same.
COMPILE_TORCH = "2.13"


def compile_supported() -> str | None:
    """Why this torch cannot compile the step, or None when it can."""
    if torch.__version__ < COMPILE_TORCH:  # (a TorchVersion: compared as a version)
        return f"torch {torch.__version__} is older than {COMPILE_TORCH}, which the compiled step needs"
    return None


def default_precision(device: str) -> str:
    """The SAE math's precision where none is asked for: bfloat16 on a GPU, float32 on the CPU."""
    return "bf16" if device.startswith("cuda") else "fp32"


def autocast(device: str, precision: str | None = None) -> contextlib.AbstractContextManager:
    """The context the SAE math runs in at `precision` (default: the device's): bfloat16 autocast, or float32."""
    if (precision or default_precision(device)) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Executor:
    """The program of every stack's step: its device, shapes, compilation and precision."""

    device: str
    fixed: bool       # the fixed-shape step (False: the CPU's exact eager shortcuts)
    compiled: bool    # one graph per stack (fixed shapes only); CUDA graphs on CUDA
    precision: str    # fp32 or bf16 (autocast around the forward; weights, Adam and the losses' sums stay float32)

    @classmethod
    def choose(cls, device: str, compile: str = "auto", fixed_shape: str = "auto", precision: str = "auto",
               world: int = 1) -> Executor:
        """The executor from the settings (auto: what the device runs best) and the device. Compiling where this
        torch cannot says so on stderr in one line and runs the fixed-shape step eagerly."""
        for name, value, allowed in (("compile", compile, SWITCHES), ("fixed_shape", fixed_shape, SWITCHES),
                                     ("precision", precision, PRECISIONS)):
            if value not in allowed:
                raise PipelineError(f"{name}={value!r}; allowed: {', '.join(allowed)}")
        cuda = device.startswith("cuda")
        if compile == "on" and fixed_shape == "off":
            raise PipelineError("compile=on needs the fixed-shape step (fixed_shape on or auto); the exact CPU step "
                                "reads the device and has data-dependent shapes")
        compiled = compile == "on" or (compile == "auto" and cuda and world == 1 and fixed_shape != "off")
        if compiled and (why := compile_supported()):
            print(f"train: not compiling ({why}); the fixed-shape step runs eagerly", file=sys.stderr)
            compiled = False
        fixed = fixed_shape == "on" or (fixed_shape == "auto" and (cuda or compile == "on"))
        return cls(device, fixed, compiled, precision if precision != "auto" else default_precision(device))

    @property
    def name(self) -> str:
        """In words, for the log's first line: e.g. 'fixed-shape, compiled (CUDA graphs), bf16 on cuda'."""
        how = ("compiled (CUDA graphs)" if self.cuda_graphs else "compiled") if self.compiled else "eager"
        return f"{self.kernels.name}, {how}, {self.precision} on {self.device}"

    @property
    def kernels(self) -> FixedKernels:
        """The program the math runs as (kernels.py): the fixed-shape kernels, or the CPU's exact ones."""
        return FIXED if self.fixed else EXACT

    @property
    def cuda_graphs(self) -> bool:
        return self.compiled and self.device.startswith("cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the step's forward (and finish's θ and held-out passes) run in."""
        return autocast(self.device, self.precision)


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot make the graph (before the graph runs any of it)."""
    import torch._dynamo.exc as exc

    names = ("TorchDynamoException", "BackendCompilerFailed", "Unsupported", "TorchRuntimeError",
             "FailOnRecompileLimitHit", "InternalTorchDynamoError")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class CompiledStep:
    """A stack's step compiled whole (fullgraph, fixed shapes), with a compile cache of its own: a sweep of any
    number of stacks never meets torch's recompile limit, which counts per cache. `limit` bounds one stack's
    compiles (its auxiliary pool doubles at most log2(d_sae / start) times). Counts what it compiles: `compiles`
    (graphs made), and on CUDA `cudagraph_skips` (graphs that run without a CUDA graph). If compiling fails, it
    says so in one line and `__call__` returns False: the caller runs the step eagerly from then on."""

    def __init__(self, fn: Callable[..., Any], label: str, cuda_graphs: bool, limit: int):
        import torch._dynamo

        torch._dynamo.config.trace_autograd_ops = True  # backward inside the graph
        self.label, self.limit = label, limit
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda_graphs else None,
                                recompile_limit=limit, isolate_recompiles=True)
        self.compiles = 0
        self.cudagraph_skips = 0
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        if self.failed:
            return False
        graphs, skips = _graphs(), _cudagraph_skips()
        try:
            self.fn(*args, **kwargs)
        except compile_errors() as e:
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"train: compiling the step of {self.label} failed ({self.failed[:300]}); it runs eagerly from "
                  "here on", file=sys.stderr)
            return False
        finally:
            self.compiles += _graphs() - graphs
            self.cudagraph_skips += _cudagraph_skips() - skips
        return True


def compile_limit(d_sae: int, start: int) -> int:
    """The most graphs one stack's step may need: its first, and one per doubling of the auxiliary pool from
    `start` latents up to d_sae; plus one to spare."""
    return 2 + max(0, math.ceil(math.log2(max(1, d_sae) / max(1, start))))
