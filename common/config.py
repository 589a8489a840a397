"""Typed configs: dataclass defaults, YAML files holding only differences, dotted overrides.

    cfg = load_config(TrainJobConfig, "configs/tiny/unet3d.yaml", ["train.steps=20"])

Every error is a `ConfigError` naming the key (and the file it came from); the CLI prints it
on one line and exits 2. Values are checked against the field's declared type, and then by the
dataclass's own `__post_init__` (which raises `ValueError("field: why")`). A field typed as a
union of config dataclasses is a tagged union: the section's tag (each member's first field, a
`Literal`) picks the member, e.g. `objective: {task: lvdm_prediction, p_pred: 0.5}`.
A YAML value `???` (REQUIRED) is a key the command line must set (a weights folder: no real
paths in YAML); left unset it is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

REQUIRED = "???"
"""A YAML value that the command line must override."""


class ConfigError(Exception):
    """A config problem, already phrased for the user: `key: what is wrong (in file)`."""

    def __init__(self, key: str, message: str, source: str | None = None):
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {message}{where}" if key else f"{message}{where}")
        self.key = key


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build `cls` from its defaults, then the YAML file at `path`, then `a.b=value` overrides."""
    source = str(path) if path is not None else None
    data = _read_yaml(Path(path)) if path is not None else {}
    sources: dict[str, str | None] = {key: source for key in _flatten(data)}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        sources[key] = "command line"
    missing = [key for key in _flatten(data) if _get_dotted(data, key) == REQUIRED]
    try:  # an unknown key or a bad value elsewhere is named before a missing required key
        config = from_dict(cls, data, sources=sources)
    except ConfigError as err:
        if err.key not in missing:
            raise
    if missing:
        raise ConfigError(missing[0], f"required: give it on the command line ({missing[0]}=PATH)", sources.get(missing[0]))
    return config


def given_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys the YAML file at `path` and the `a.b=value` overrides set themselves (the
    keys a loaded config holds by choice rather than by default)."""
    keys = set(_flatten(_read_yaml(Path(path)))) if path is not None else set()
    return keys | {_parse_override(item)[0] for item in overrides}


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError("", f"not a text file (byte {err.start} is not UTF-8)", str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError("", f"invalid YAML{line}: {problem}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping of sections", str(path))
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(item, "override must look like section.key=value", "command line")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(key or item, "invalid override key", "command line")
    return key, _RawString(raw)


class _RawString(str):
    """An override value as typed: parsed as YAML only when the field is not a string."""


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part} is a value, not a section", "command line")
        node = child
    node[parts[-1]] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys.extend(_flatten(value, full + "."))
    return keys


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", sources: dict[str, str | None] | None = None) -> Any:
    """Build dataclass `cls` from a nested dict, naming the first bad key."""
    sources = sources or {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), "expected a section (mapping)", sources.get(prefix.rstrip(".")))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            leaves = [leaf for leaf in _flatten({key: data[key]}, prefix) if leaf in sources]
            full = max(leaves, key=len, default=full)  # name what the user typed: bogus.key, not bogus
            raise ConfigError(full, f"unknown key; valid keys: {', '.join(sorted(fields))}", sources.get(full))
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        members = _tagged_members(hints[key])
        if members is None:
            kwargs[key] = _convert(hints[key], value, full, sources)
        else:
            kwargs[key] = _convert_tagged(members, value, full, sources, _default(fields[key]))
    try:
        return cls(**kwargs)
    except ValueError as err:
        field, _, why = str(err).partition(": ")
        key = f"{prefix}{field}" if why and field in fields else prefix.rstrip(".")
        message = why if why and field in fields else str(err)
        raise ConfigError(key, message, sources.get(key)) from None


def _tagged_members(tp: Any) -> tuple[str, dict[str, type]] | None:
    """A tagged union's tag field and its members by tag value, or None if `tp` is not one.

    A tagged union is a union of config dataclasses whose first field, the tag, is a `Literal`
    with a default: the tag's value in a section picks the member that reads the section.
    """
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    members = typing.get_args(tp)
    if not all(dataclasses.is_dataclass(member) for member in members):
        return None
    tag = dataclasses.fields(members[0])[0].name
    by_value = {}
    for member in members:
        hint = typing.get_type_hints(member).get(tag)
        if dataclasses.fields(member)[0].name != tag or typing.get_origin(hint) is not Literal:
            raise TypeError(f"{member.__name__}: a tagged union member's first field must be the Literal tag {tag!r}")
        by_value.update({value: member for value in typing.get_args(hint)})
    return tag, by_value


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _convert_tagged(
    members: tuple[str, dict[str, type]], value: Any, key: str, sources: dict[str, str | None], default: Any
) -> Any:
    """The member of a tagged union named by the section's tag (the default's member when absent)."""
    tag, by_value = members
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a section (mapping)", sources.get(key))
    chosen = value.get(tag, getattr(default, tag, None))
    if not isinstance(chosen, str) or chosen not in by_value:
        tag_key = f"{key}.{tag}"
        got = "nothing" if chosen is None else repr(str(chosen))
        raise ConfigError(tag_key, f"must be one of {', '.join(map(repr, by_value))}, got {got}", sources.get(tag_key, sources.get(key)))
    return from_dict(by_value[chosen], {**value, tag: str(chosen)}, prefix=key + ".", sources=sources)


def _convert(tp: Any, value: Any, key: str, sources: dict[str, str | None]) -> Any:
    source = sources.get(key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".", sources=sources)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _RawString) and tp is not str and not _accepts_str(tp):
        value = _yaml_scalar(value, key)
    elif isinstance(value, _RawString):
        value = str(value)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, sources)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}", source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}", source)
        return value
    if origin is tuple:
        if isinstance(value, str) and not isinstance(value, _RawString):
            value = _yaml_scalar(value, key) if value.startswith("[") else value
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list ({_type_name(tp)}), got {value!r}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", sources) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}", source)
        return tuple(_convert(a, v, f"{key}[{i}]", sources) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}", source)
        return {str(k): _plain(v) for k, v in value.items()}
    return _scalar(tp, value, key, source)


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, _RawString):
        return yaml.safe_load(str(value)) if str(value) else ""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _yaml_scalar(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(key, f"cannot parse value {raw!r}", "command line") from None


def _scalar(tp: Any, value: Any, key: str, source: str | None) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(key, f"unsupported field type {tp!r}", source)
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}", source)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists), the inverse of `from_dict`."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = to_dict(value) if dataclasses.is_dataclass(value) else _plain_value(value)
    return out


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def diff_from_defaults(config: Any) -> dict[str, Any]:
    """Only the values that differ from the dataclass defaults (what a YAML file should hold).

    A section holding another member of a tagged union than the default does is compared with
    that member's own defaults, and keeps its tag.
    """
    return _config_diff(config, type(config)())


def _config_diff(config: Any, default: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value, base = getattr(config, field.name), getattr(default, field.name)
        if not dataclasses.is_dataclass(value):
            out.update(_dict_diff({field.name: _plain_value(value)}, {field.name: _plain_value(base)}))
        elif type(value) is type(base):
            sub = _config_diff(value, base)
            out.update({field.name: sub} if sub else {})
        else:
            tag = dataclasses.fields(value)[0].name
            out[field.name] = {tag: getattr(value, tag), **_config_diff(value, type(value)())}
    return out


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _dict_diff(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in full.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = _dict_diff(value, base[key])
            if sub:
                out[key] = sub
        elif base.get(key) != value:
            out[key] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (a command line that repeats a config's
    default takes it from here, so the default is written once, in the dataclass)."""
    spec = cls.__dataclass_fields__[name]
    if spec.default is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return spec.default
