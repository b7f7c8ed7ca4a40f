"""Settings declared once. A dataclass field made with `setting()` carries its help text, the group its
command-line option is listed in, and whether it is part of a run's identity; the click options, the
identity and the values a pipeline's section may set are all derived from the fields.

    @dataclass
    class S:
        lr: float = setting(1e-3, "Adam learning rate.", identity=ALWAYS)

    @click.command(cls=Command)
    @options(S)
    def main(**given): s = build(S, given, pipeline_section)

Groups: `main` options are the everyday ones `--help` shows; `recipe` options (experimental recipe
knobs) are listed by name there and in full with `--help-all`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click

from .errors import PipelineError

MAIN, RECIPE, ADVANCED = "main", "recipe", "advanced"
SECTIONS = {RECIPE: "Recipe options (experimental)", ADVANCED: "Advanced options"}
ALWAYS, IF_SET = "always", "if_set"  # identity: always part of it / only when not the default


def setting(default: Any = dataclasses.MISSING, help: str = "", *, group: str = MAIN, identity: str | None = None,
            cli: str | bool = True, choices: tuple[str, ...] | None = None, parse: Callable[[str], Any] | None = None,
            metavar: str | None = None, default_factory: Any = dataclasses.MISSING,
            applies_to: tuple[str, ...] | None = None, selects: bool = False, in_name: bool = False) -> Any:
    """A dataclass field with what the command line and the run identity need to know about it.

    cli: True (an option named after the field), a string (another option name, e.g. "layer" for
    `layers`), or False (not on the command line). parse: turns the option's text into the value
    (default: the field's type). identity: ALWAYS, IF_SET or None. For an SAE's settings: applies_to, the
    architectures that have it (None: every one); selects, a key that picks which SAEs (on the command line it
    replaces a pipeline's sweep rather than applying on top); in_name, shown in the SAE's name."""
    meta = {"help": help, "group": group, "identity": identity, "cli": cli, "choices": choices, "parse": parse,
            "metavar": metavar, "applies_to": applies_to, "selects": selects, "in_name": in_name}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> list[dataclasses.Field]:
    """The fields of cls made with setting()."""
    return [f for f in dataclasses.fields(cls) if "group" in f.metadata]


def option_name(f: dataclasses.Field) -> str | None:
    cli = f.metadata.get("cli", False)
    if cli is False:
        return None
    return (f.name if cli is True else cli).replace("_", "-")


def _base_type(f: dataclasses.Field, owner: type) -> Any:
    """The field's type without `| None` (bool, int, float, str, tuple, list, ...)."""
    hint = typing.get_type_hints(owner)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return typing.get_origin(hint) or hint


class GroupedOption(click.Option):
    """A click option that remembers the help group it is listed in (`group=`)."""

    def __init__(self, *args: Any, group: str = MAIN, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


def _click_option(f: dataclasses.Field, owner: type, as_text: bool) -> click.Option:
    name = option_name(f)
    meta = f.metadata
    kind = _base_type(f, owner)
    common = {"help": meta["help"], "hidden": False}
    decls = [f"--{name}", f.name]  # the value reaches the command under the field's name
    if as_text:  # sweep keys: one value or a comma-separated list, parsed by the sweep
        return click.Option(decls, type=str, default=None, metavar=meta["metavar"], **common)
    if meta["parse"] is None and kind is bool:  # a flag: absent leaves the pipeline's value (or the default)
        return click.Option(decls, is_flag=True, default=None, **common)
    if meta["choices"]:
        return click.Option(decls, type=click.Choice(meta["choices"]), default=None, **common)
    typ = {int: int, float: float}.get(kind, str) if meta["parse"] is None else str
    return click.Option(decls, type=typ, default=None, metavar=meta["metavar"], **common)


def options(*classes: type, skip: tuple[str, ...] = (), as_text: bool = False) -> Callable[[Callable], Callable]:
    """A decorator adding a click option for every command-line field of the classes (in field order),
    each remembering its group (Command lists recipe options apart). as_text: every option takes text
    (sweep keys, which take lists)."""
    def deco(fn: Callable) -> Callable:
        params = []
        for cls in classes:
            for f in declared(cls):
                if option_name(f) is None or f.name in skip:
                    continue
                opt = _click_option(f, cls, as_text)
                opt.group = f.metadata["group"]  # type: ignore[attr-defined]
                params.append(opt)
        fn.__click_params__ = getattr(fn, "__click_params__", []) + params[::-1]  # click reverses them
        return fn
    return deco


def value_of(f: dataclasses.Field, owner: type, given: Any) -> Any:
    """A command-line or pipelines.yaml value as the field holds it."""
    parse = f.metadata.get("parse")
    if parse is not None and isinstance(given, str):
        return parse(given)
    if _base_type(f, owner) is tuple and isinstance(given, list):
        return tuple(given)
    return given


def check_keys(section: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse a key that `section` (a pipelines.yaml section, or any mapping of settings) cannot hold: one line
    naming the key and `where` it is, a close match if there is one, and the allowed keys."""
    allowed = sorted(set(allowed))
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PipelineError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def settable(cls: type, fixed: Iterable[str] = ()) -> list[str]:
    """The declared fields of cls that a pipelines.yaml section may set (all but those the command fixes)."""
    return [f.name for f in declared(cls) if f.name not in set(fixed)]


def build(cls: type, given: dict[str, Any], section: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """An instance of cls: `fixed` values, then each declared field from the command line (`given`,
    keyed by field name; None means not given), else the pipeline's section, else its default. (The command
    refuses a section's unknown keys first: check_keys.)"""
    values = dict(fixed)
    section = section or {}
    for f in declared(cls):
        if f.name in values:
            continue
        if given.get(f.name) is not None:  # (a value may parse to None: tokens 'all')
            values[f.name] = value_of(f, cls, given[f.name])
        elif section.get(f.name) is not None:
            values[f.name] = value_of(f, cls, section[f.name])
    return cls(**values)


def identity(obj: Any) -> dict[str, Any]:
    """The fields of a settings object that make two runs the same run: ALWAYS ones, and IF_SET ones that
    differ from their defaults (settings added later leave the identity of older runs as it was)."""
    out = {}
    for f in declared(type(obj)):
        mode = f.metadata.get("identity")
        v = getattr(obj, f.name)
        if mode == ALWAYS or (mode == IF_SET and v != _default(f)):
            out[f.name] = v
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


class _GroupedHelp:
    """--help shows the everyday options and names the others by group; --help-all shows every option."""

    def _add_help_all(self) -> None:
        self.params.append(click.Option(["--help-all"], is_flag=True, expose_value=False, is_eager=True,
                                        callback=_help_all, help="Show every option in full."))

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        every = ctx.meta.get("help_all", False)
        by_group: dict[str, list] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec is not None:
                by_group.setdefault(getattr(p, "group", MAIN), []).append((p, rec))
        with formatter.section("Options"):
            formatter.write_dl([rec for _, rec in by_group.pop(MAIN, [])])
        for group, items in by_group.items():
            title = SECTIONS.get(group, group)
            with formatter.section(title if every else f"{title}; --help-all describes them"):
                if every:
                    formatter.write_dl([rec for _, rec in items])
                else:
                    formatter.write_text(", ".join(p.opts[0] for p, _ in items))
        if isinstance(self, click.Group):
            self.format_commands(ctx, formatter)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class Command(_GroupedHelp, click.Command):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)
        self._add_help_all()


class Group(_GroupedHelp, click.Group):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)
        self._add_help_all()


def _help_all(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ctx.meta["help_all"] = True
    click.echo(ctx.get_help(), color=ctx.color)
    ctx.exit()


def parse_tokens(value: Any) -> int | None:
    """A token count: a positive integer (1e6 and 1000000 both work), or 'all' (None): everything there is."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        n = int(float(value))
    except ValueError:
        raise PipelineError(f"tokens must be a positive integer or 'all', not {value!r}") from None
    if n <= 0:
        raise PipelineError(f"tokens must be a positive integer or 'all', not {value!r}")
    return n


def int_list(value: Any) -> list[int] | None:
    """'8' or '6,8,10' (or a list) -> [8] / [6, 8, 10]."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [int(x) for x in value]
    try:
        return [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"layer must be an integer or a comma-separated list of integers, not {value!r}") from None
