"""Settings are frozen dataclasses with a default and a one-line comment per field (nanoGPT style).

This module reads those definitions so that nothing restates them: :func:`describe` gives each
field's default, type and comment (the CLI's flags and help are generated from it, and model
cards name the flag of every recorded setting), and :func:`flag` is the one rule that names a
field's command-line option (``max_epochs`` -> ``--max-epochs``, unless the class renames it in
its ``FLAGS`` class variable).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One setting of a config dataclass, as the CLI and the model card see it."""

    name: str  # the dataclass field
    flag: str  # its command-line option, e.g. --head-batch-size
    default: Any  # the field's default (a nested config's default instance for nested configs)
    type: Any  # the resolved annotation
    help: str  # the field's one-line comment


def flag(cls: type, name: str) -> str:
    """The command-line option of field ``name`` of config class ``cls``."""
    return getattr(cls, "FLAGS", {}).get(name, "--" + name.replace("_", "-"))


@functools.lru_cache(maxsize=None)
def comments(cls: type) -> dict[str, str]:
    """``{field: its trailing '# comment'}`` read from the class's source (continuation lines of a
    comment that starts on the field's line are joined)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a zipped install): help texts stay empty
        return {}
    lines = src.splitlines()
    tree = ast.parse(src)
    out: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = []
        for i in range(node.lineno - 1, len(lines)):
            line = lines[i]
            if i > node.end_lineno - 1 and not line.strip().startswith("#"):
                break
            if "#" in line:
                parts.append(line.split("#", 1)[1].strip())
            elif i > node.end_lineno - 1:
                break
        out[node.target.id] = " ".join(parts)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def describe(cls: type) -> list[Field]:
    """Every field of config dataclass ``cls``: flag, default, resolved type and comment."""
    hints = typing.get_type_hints(cls)
    notes = comments(cls)
    return [Field(f.name, flag(cls, f.name), _default(f), hints.get(f.name, Any), notes.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a config dataclass."""
    return {f.name: f.default for f in describe(cls)}
