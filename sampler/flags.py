"""Command-line flags generated from config dataclasses.

A field `decode_context` becomes `--decode-context`, its docstring the help, `metadata["alias"]`
a second option (a paper's name for the knob), and a `bool` field that defaults to True a
`--no-<name>` switch. Every flag's argparse default is None ("not given"), so the dataclass
default applies: each default is written once, in its dataclass. Fields with
`metadata["flag"] = False` get no flag; `metadata["choices"]` limits a flag's values, and
`metadata["flag_default"]` says in the help what the command line defaults to instead.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

from common.config import field_docs


@dataclass(frozen=True, kw_only=True)
class Flag:
    """One command-line option, for a field of one or more config dataclasses."""

    dest: str
    """The field name (and argparse destination)."""
    options: tuple[str, ...]
    """`--name`, then the alias if any."""
    kind: type
    """int, float, str, or bool (a switch)."""
    required: bool
    """The field has no default."""
    choices: tuple[str, ...] | None
    """The values allowed (`metadata["choices"]`), if limited."""
    helps: tuple[str, ...]
    """One help line per group of configs that share the field."""


def docs_of(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass, its bases' included."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if is_dataclass(base):
            docs.update(field_docs(base))
    return docs


def field_kind(annotation: Any) -> type:
    """int for `int` and `int | None`, and so on."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    if annotation not in (int, float, str, bool):
        raise TypeError(f"no command-line flag for a field of type {annotation!r}")
    return annotation


def help_for(spec: Field, doc: str) -> str:
    """The field's docstring, with its default (or `metadata["flag_default"]`) when that says something."""
    if spec.default is True:
        return f"turns off: {doc}"
    shown = spec.metadata.get("flag_default", spec.default)
    return doc if spec.default is MISSING or shown is None else f"{doc} (default: {shown})"


def flag_for(spec: Field, annotation: Any, doc: str) -> Flag:
    kind = field_kind(annotation)
    name = spec.name.replace("_", "-")
    if kind is bool and spec.default is not True:
        raise TypeError(f"{spec.name}: only bool fields that default to True get a (--no-) flag")
    primary = f"--no-{name}" if kind is bool else f"--{name}"
    alias = spec.metadata.get("alias")
    return Flag(
        dest=spec.name,
        options=(primary,) if alias is None else (primary, alias),
        kind=kind,
        required=spec.default is MISSING and spec.default_factory is MISSING,
        choices=spec.metadata.get("choices"),
        helps=(help_for(spec, doc),),
    )


def dataclass_flags(cls: type) -> list[Flag]:
    """The flags of `cls`'s fields, in field order."""
    docs, hints = docs_of(cls), get_type_hints(cls)
    return [
        flag_for(spec, hints[spec.name], docs.get(spec.name, ""))
        for spec in fields(cls)
        if spec.metadata.get("flag", True)
    ]


def merged_flags(configs: dict[str, type]) -> list[Flag]:
    """The flags of several config dataclasses (by name), one per field name: a field that several
    of them have is one flag, whose help has a line per distinct docstring and default, saying
    whose it is."""
    first: dict[str, Flag] = {}
    owners: dict[str, dict[str, list[str]]] = {}
    for name, cls in configs.items():
        for flag in dataclass_flags(cls):
            known = first.setdefault(flag.dest, flag)
            if (known.options, known.kind) != (flag.options, flag.kind):
                raise TypeError(f"{flag.dest}: {name} declares it unlike another config does")
            owners.setdefault(flag.dest, {}).setdefault(flag.helps[0], []).append(name)
    return [
        replace(flag, required=False, helps=tuple(f"{', '.join(names)}: {text}" for text, names in owners[dest].items()))
        for dest, flag in first.items()
    ]


def add_flags(parser: argparse.ArgumentParser | Any, flags: list[Flag]) -> None:
    """Add `flags` to `parser` (or an argument group), each with default None."""
    for flag in flags:
        help_text = " | ".join(flag.helps).replace("%", "%%")
        if flag.kind is bool:
            parser.add_argument(
                *flag.options, dest=flag.dest, action="store_const", const=False, default=None, help=help_text
            )
        else:
            parser.add_argument(
                *flag.options,
                dest=flag.dest,
                type=flag.kind,
                default=None,
                required=flag.required,
                choices=flag.choices,
                help=help_text,
            )


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that the command line set."""
    return {
        spec.name: getattr(args, spec.name)
        for spec in fields(cls)
        if spec.metadata.get("flag", True) and getattr(args, spec.name, None) is not None
    }
