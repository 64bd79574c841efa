"""Command-line options generated from the config dataclasses: one flag per field, its default
the field's default, its help the field's comment (:mod:`pneumoscan.config`).

:func:`add_config` adds the options of a config class (or some of its fields) to a parser and
remembers which field each option came from; :func:`build` makes the config from the parsed
arguments. No default is restated here, so the CLI cannot drift from the Python API.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Iterable, Literal

from ..config import Field, describe

MISSING = dataclasses.MISSING


def dest(f: Field) -> str:
    """The argparse destination of a field's option (its flag without dashes, ``--no-`` dropped)."""
    name = f.flag.lstrip("-")
    return name[3:].replace("-", "_") if name.startswith("no-") else name.replace("-", "_")


def _parts(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _number(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):  # no setting means anything at nan or inf; nan passes every '<' check later
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value
    parse.__name__ = kind.__name__
    return parse


# what a field of this name means wherever it stands: its range (inclusive; None = open), before any work
BOUNDS: dict[str, tuple[int | None, int | None]] = {
    "seed": (0, 2**32 - 1),  # numpy's and torch's seed range
    "batch_size": (1, None),
    "n_boot": (0, 100_000),  # bootstrap resamples: past this the intervals no longer move, only the minutes do
}


def _bounded(parse, name: str):
    low, high = BOUNDS[name]

    def check(text: str):
        value = parse(text)
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"{value} must be " + (
                f"between {low} and {high}" if high is not None else f"at least {low}"))
        return value
    check.__name__ = getattr(parse, "__name__", "value")
    return check


def _optional(parse, text_none: str = "none"):
    def wrapped(text: str):
        return None if text.lower() == text_none else parse(text)
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _kwargs(f: Field) -> dict:
    tp, nullable = _parts(f.type)
    help_ = (f.help or " ").replace("%", "%%")  # argparse expands %-formats in help
    origin = typing.get_origin(tp)
    if tp is bool:
        if f.default:  # --no-NAME: the comment describes the feature the flag switches off
            return {"action": "store_false", "help": f"switch off (on by default): {help_.strip()}"}
        return {"action": "store_true", "help": help_}
    kw: dict[str, Any] = {"help": help_ + ("" if f.default in (None, MISSING) else " (default: %(default)s)")}
    if origin is Literal:
        kw["choices"] = list(typing.get_args(tp))
        return kw
    if origin is tuple:  # comma-separated values, e.g. --lrs 1e-3,2e-3
        inner, inner_null = _parts(typing.get_args(tp)[0])
        parse = _scalar(inner)
        kw["type"] = _comma_list(_optional(parse) if inner_null else parse)
        kw["action"] = _ExtendOnce
        kw["help"] = help_ + ("" if f.default is None else
                              f" (default: {','.join('none' if v is None else str(v) for v in f.default)})")
        return kw
    if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]
        kw["type"] = _union(typing.get_args(tp))
        return kw
    parse = _scalar(tp)
    kw["type"] = _optional(parse) if nullable and tp is not str else parse
    if f.name in BOUNDS and tp is int:
        kw["type"] = _bounded(kw["type"], f.name)
    return kw


class _ExtendOnce(argparse.Action):
    """A list option given once (``--lrs 1e-3,2e-3``) or repeated (``--backbone a --backbone b``): the
    first occurrence replaces the default, later ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, f"_given_{self.dest}", False)
        setattr(namespace, self.dest, (tuple(getattr(namespace, self.dest) or ()) if seen else ()) + tuple(values))
        setattr(namespace, f"_given_{self.dest}", True)


def _comma_list(parse):
    """argparse type: comma-separated values, each parsed by ``parse``; a tuple."""
    def parse_list(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give comma-separated values")
        return tuple(parse(t) for t in items)
    parse_list.__name__ = "list"
    return parse_list


def _union(members: tuple):
    """A parser for a union such as ``int | Literal["auto"]``: the words first, then numbers."""
    words = [w for m in members if typing.get_origin(m) is Literal for w in typing.get_args(m)]
    numbers = [m for m in members if m in (int, float)]

    def parse(text: str):
        if text in words:
            return text
        for kind in numbers:
            try:
                return kind(text)
            except ValueError:
                pass
        raise argparse.ArgumentTypeError(f"{text!r} is not " + " or ".join(
            [*(f"{'an integer' if k is int else 'a number'}" for k in numbers), *map(repr, words)]))
    parse.__name__ = "value"
    return parse


def _scalar(tp):
    if tp is int:
        return _number(int, "an integer")
    if tp is float:
        return _number(float, "a number")
    return str


def add_config(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None,
               exclude: Iterable[str] = (), group: str | None = None) -> list[Field]:
    """Add an option for each field of ``cls`` (``only`` some, or all but ``exclude``); nested
    config dataclasses get options for their own fields. Returns the fields added."""
    only = set(only) if only is not None else None
    exclude = set(exclude)
    target = parser.add_argument_group(group) if group else parser
    added = []
    for f in describe(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        if dataclasses.is_dataclass(f.type):
            added += add_config(parser, f.type, group=group)
            continue
        action = target.add_argument(f.flag, dest=dest(f), default=f.default, **_kwargs(f))
        action.config_field = (cls, f.name)  # read by the tests that compare every flag with its field
        added.append(f)
    return added


def build(cls: type, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed options (fields without an option keep their default;
    ``overrides`` win); nested configs are built from their own options."""
    values = {}
    for f in describe(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(f.type):
            values[f.name] = build(f.type, args)
        elif hasattr(args, dest(f)):
            values[f.name] = getattr(args, dest(f))
    return cls(**values)
