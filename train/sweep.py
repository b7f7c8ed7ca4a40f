"""Sweeps: grids of SAE settings (from pipelines.yaml or the command line) -> SAE configs.

A grid maps keys to a value or a list of values; the product of the lists is the sweep. Every
SAEConfig field is a key, plus `dict` (sizes, or multiples of d_model like `8x`), `init_l0` (for
jumprelu_init_l0) and `seeds` (replicates 0..n-1 of every config, from different initial weights).
Keys that do not apply to an architecture (k for JumpReLU, l0_coeff for TopK, ...) are ignored for it.

Selection keys (which SAEs: arch, dict, k, coefficients) given on the command line replace a
pipeline's sweep; every other key (the recipe: norm, center, grad_clip, seeds, ...) applies on top
of each of its grids, as do the SAE settings written directly in the pipeline's `train` section.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from batchtopk.core.errors import PipelineError
from batchtopk.core.options import check_keys, declared, option_name, setting

from .archs import ARCHS
from .sae import SETTINGS, SAEConfig
from .sae import applies_to as settings_applies_to

ALIASES = {"init_l0": "jumprelu_init_l0"}


@dataclass
class Grid:
    """The sweep keys that are not SAEConfig fields."""

    dict: str = setting("4x", "Dictionary size(s): integers, or multiples of d_model like 8x.", metavar="SIZES",
                        selects=True)
    seeds: int = setting(1, "Seeds (replicates 0..n-1) of every SAE, trained in the same pass.", metavar="N")
def applies_to(key: str) -> tuple[str, ...]:
    """The architectures that have a sweep key (every one for a key that is not an SAE setting)."""
    name = ALIASES.get(key, key)
    return settings_applies_to(name) if name in SETTINGS else tuple(ARCHS)


GRID_KEYS = tuple(k for k in SETTINGS if k not in ("arch", "d_in", "d_sae")) + ("arch", "dict", "seeds", *ALIASES)


def _split(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise PipelineError(f"{what} must be an integer, not {v!r}") from None


def dict_size(v: Any, d_in: int) -> int:
    """An integer, or a multiple of d_model written like '8x'."""
    s = str(v).strip().lower()
    n = _int(s[:-1], "dictionary multiple") * d_in if s.endswith("x") else _int(s, "dictionary size")
    if n < 1:
        raise PipelineError(f"dictionary size {v} must be at least 1")
    return n


def _coerce(key: str, v: Any) -> Any:
    """One value of a key, as the SAEConfig field's type wants it."""
    kind = str(SETTINGS[key].type)
    if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
        if "None" not in kind:
            raise PipelineError(f"{key} cannot be none")
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(v, bool):
                return v
            if str(v).lower() in ("1", "true", "yes", "on"):
                return True
            if str(v).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(v)
        if kind.startswith("tuple"):
            parts = v if isinstance(v, (list, tuple)) else str(v).replace(":", "/").split("/")
            if key == "betas" and len(parts) != 2:
                raise ValueError(v)
            return tuple(float(p) for p in parts)
        if kind.startswith("int"):
            return _int(v, key)
        if kind.startswith("float"):
            return float(v)
        return str(v)
    except (TypeError, ValueError):
        raise PipelineError(f"{key}={v!r} is not a valid {kind.replace(' | None', '')}") from None


def _values(key: str, value: Any) -> list:
    """A grid entry -> its list of values (betas, groups: a list of numbers is one value, a list of lists a grid)."""
    if key in ("betas", "groups") and isinstance(value, (list, tuple)) and value and not isinstance(
            value[0], (list, tuple, str)):
        return [_coerce(key, value)]
    vals = _split(value) if not isinstance(value, bool) else [value]
    return [_coerce(key, v) for v in vals]


def expand(grid: dict[str, Any], d_in: int) -> list[dict[str, Any]]:
    """One grid -> SAE configs (dicts of SAEConfig fields without d_in)."""
    check_keys(grid, GRID_KEYS, "sweep")  # (a pipeline's sweep entries, --set keys)
    grid = {ALIASES.get(k, k): v for k, v in grid.items()}
    archs = _split(grid.get("arch", "batchtopk"))
    for a in archs:
        if a not in ARCHS:
            raise PipelineError(f"unknown architecture {a!r}; allowed: {', '.join(ARCHS)}")
    sizes = [dict_size(m, d_in) for m in _split(grid.get("dict", Grid.dict))]
    seeds = _int(grid.get("seeds", Grid.seeds), "seeds")
    if seeds < 1:
        raise PipelineError(f"seeds={seeds} must be at least 1")
    keys = [k for k in grid if k in SETTINGS and k not in ("arch", "d_in", "d_sae")]
    out = []
    for arch in archs:
        mine = [k for k in keys if arch in applies_to(k)]
        lists = [_values(k, grid[k]) for k in mine]  # (k unset: SAEConfig's default)
        for m, combo in itertools.product(sizes, itertools.product(*lists)):
            base = {"arch": arch, "d_sae": m, **dict(zip(mine, combo))}
            out += [base | ({"replicate": base.get("replicate", 0) + r} if seeds > 1 else {}) for r in range(seeds)]
    return out


# the keys that pick which SAEs (declared with selects=True), and their aliases
SELECTION = tuple(f.name for cls in (SAEConfig, Grid) for f in declared(cls) if f.metadata.get("selects"))
SELECTION += tuple(a for a, name in ALIASES.items() if name in SELECTION)
RUN_LEVEL = ("lr", "betas")  # in a pipeline's train section these are the run's, not per-SAE overrides
# the sweep keys with an option of their own on `python -m train` (every other one goes through --set)
SWEEP_KEYS = tuple(f.name for cls in (SAEConfig, Grid) for f in declared(cls) if option_name(f))


def sweep_from(train: dict[str, Any], cli: dict[str, Any], d_in: int) -> list[dict]:
    """The SAE configs of a training run: the pipeline's train section and sweep, and the command line."""
    given = {k: v for k, v in cli.items() if v is not None}
    common = {k: train[k] for k in GRID_KEYS if k in train and k not in SELECTION + RUN_LEVEL}
    select = {k: v for k, v in given.items() if k in SELECTION}
    recipe = {k: v for k, v in given.items() if k not in SELECTION}
    if "sweep" in train and not select:
        grids = [common | g | recipe for g in train["sweep"]]
    else:
        grids = [common | {k: train[k] for k in SELECTION if k in train} | select | recipe]
    archs = {a for g in grids for a in _split(g.get("arch", "batchtopk"))}
    for key in given:  # a setting the command line gives that none of the run's SAEs has
        allowed = applies_to(key)
        if archs <= set(ARCHS) and not archs & set(allowed):
            raise PipelineError(f"{key} is a setting of {', '.join(allowed)} SAEs; this run trains "
                                f"{', '.join(sorted(archs))} (drop {key}, or choose an architecture that has it)")
    saes = [c for g in grids for c in expand(g, d_in)]
    for c in saes:
        try:
            SAEConfig(d_in=d_in, **c)  # validates every value with a one-line error ...
        except PipelineError as e:  # ... naming the SAE of the sweep it is about
            raise PipelineError(f"sweep entry {describe(c)}: {e}") from None
    return saes


def describe(c: dict[str, Any]) -> str:
    """A sweep entry in words: arch, k, dict, then every other key it sets."""
    first = [("arch", c.get("arch")), ("k", c.get("k")), ("dict", c.get("d_sae"))]
    rest = [(k, v) for k, v in c.items() if k not in ("arch", "k", "d_sae") and not (k == "replicate" and v == 0)]
    return ", ".join(f"{k}={v}" for k, v in first + rest if v is not None)
