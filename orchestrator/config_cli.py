"""Command lines built from config dataclasses, so each default is defined once.

Every field of a frozen config dataclass becomes an option: ``max_num_seqs`` is
``--max-num-seqs`` (with a prefix for a nested config: ``--monitor-window``), its type
comes from the annotation, its default from the field, and its help from the field's
docstring (the string literal under it, read from the source). Per-field details that
the annotation cannot say (a parser such as ``parse_bytes``, choices, another flag name,
an option given several times) go in ``field(metadata=cli(...))``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class CliField:
    """How one config field appears on the command line."""

    flag: str | None = None
    """The option's name without the prefix and dashes (default: the field's name), or a
    whole flag (``--tritonserver``) taken as it is."""
    parse: Callable[[str], Any] | None = None
    """Turns the option's text into the field's value (default: the annotated type)."""
    show: Callable[[Any], str] | None = None
    """How ``--help`` shows the default (default: as it is)."""
    choices: Callable[[], list[str]] | None = None
    """The accepted values (a callable, so registries can fill after import)."""
    repeat: bool = False
    """The option may be given several times; the values form a tuple."""
    metavar: str | None = None


def cli(**kwargs: Any) -> dict[str, CliField]:
    """``field(metadata=cli(parse=parse_bytes))``."""
    return {"cli": CliField(**kwargs)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _meta(f: dataclasses.Field) -> CliField:
    return f.metadata.get("cli", CliField())


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _flag(f: dataclasses.Field, prefix: str) -> str:
    flag = _meta(f).flag or f.name
    return flag if flag.startswith("--") else "--" + prefix + flag.replace("_", "-")


def _dest(f: dataclasses.Field, prefix: str) -> str:
    return (prefix + f.name).replace("-", "_")


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                    skip: tuple[str, ...] = ()) -> None:
    """An option for every field of ``cls`` but those in ``skip`` (nested configs, say)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, tp = _meta(f), _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = docs.get(f.name, "").replace("``", "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _dest(f, prefix), "default": default, "metavar": meta.metavar}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar")
        else:
            parse = meta.parse or (tp if tp in (int, float, str, Path) else str)
            kwargs["type"] = parse
            if meta.repeat:
                kwargs["action"] = "append"
                kwargs["default"] = None
            if meta.choices is not None:
                kwargs["choices"] = meta.choices()
        if required:
            kwargs["required"] = True
        elif not meta.repeat and default is not None:  # a None default: the docstring says what happens
            shown = meta.show(default) if meta.show else default
            help_text += f" (default: {shown})"
        parser.add_argument(_flag(f, prefix), help=help_text.strip(), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **given: Any) -> Any:
    """``cls`` from the options ``add_config_args`` added; ``given`` fills the skipped fields."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        value = getattr(args, _dest(f, prefix))
        if _meta(f).repeat:
            value = tuple(value or ())
        values[f.name] = value
    return cls(**values)


def fmt_bytes(n: int) -> str:
    """``4294967296`` -> ``4GiB`` (for ``--help``)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def comma_list(text: str) -> tuple[str, ...]:
    """``a, b,c`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
