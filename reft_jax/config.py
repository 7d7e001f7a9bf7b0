"""Typed dataclass configs filled from YAML and `a.b.c=value` overrides, strictly.

The dataclasses are the single source of truth: YAML only supplies values. Everything a user can
get wrong (a typo, a string where a float belongs, a value a dataclass rejects) becomes one
`ConfigError` that names the full dotted key, the bad value and, for typos, the likely intent, so
a run fails at start-up rather than hours in.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from reft_jax.ranges import field_range

T = TypeVar("T")
_NoneType = type(None)


class ConfigError(ValueError):
    """A bad config. Inside a dataclass's `__post_init__`/`validate`, raise it with `key=` (the
    field name) and `value=`; the loader prefixes the dataclass's dotted path."""

    def __init__(self, message: str, *, key: str | None = None, value: Any = ...):
        self.key, self.value, self.detail = key, value, message
        shown = "" if value is ... else f"={value!r}"
        super().__init__(f"{key}{shown}: {message}" if key else message)


# --- YAML -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-7` and `1e5` as floats (YAML 1.1 needs a dot; YAML 1.2 and every
    user do not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: invalid YAML: {err}") from None


def load_yaml(path: str | pathlib.Path, _seen: tuple[pathlib.Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving `base: other.yaml` (or a list of them, relative to this
    file) first; keys here win over the bases', merging nested mappings key by key."""
    path = pathlib.Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"base cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(), str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases or []:
        merged = _deep_merge(merged, load_yaml(path.parent / base, (*_seen, path)))
    return _deep_merge(merged, data)


def _deep_merge(low: Mapping, high: Mapping) -> dict:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Set `a.b.c=value` (value parsed as a YAML scalar/list/mapping) in a nested dict copy.
    Missing intermediate mappings are created; the dataclass schema checks the result."""
    out = _deep_merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value", key=key or None)
        value = _parse_yaml(text, f"override {item!r}")
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"cannot set {key!r}: {where!r} holds {child!r}, not a mapping",
                                  key=key)
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


# --- dict -> dataclass ------------------------------------------------------------------------


def load_config(cls: type[T], yaml_path: str | pathlib.Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build `cls` from an optional YAML file plus dotted overrides (applied in order, last wins)."""
    data = load_yaml(yaml_path) if yaml_path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every value against the type hints and
    `RANGES`. Raises one ConfigError listing every problem found, each with its dotted key
    (under `prefix`, for a section built on its own); one problem is one line."""
    problems: list[str] = []
    result = _build(cls, data, prefix, problems)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return result


# --- numeric ranges (the table: reft_jax/ranges.py) ------------------------------------------


def range_problem(cls: type, name: str, value: Any) -> str | None:
    """Why `value` is out of range for `cls.name` ("must be > 0"), or None when it is fine."""
    allowed = field_range(cls, name)
    if value is None or allowed is None or allowed.allows(value):
        return None
    return f"must be {allowed}"


def check_ranges(obj: Any, prefix: str = "") -> None:
    """ConfigError naming the first field of dataclass `obj` (and its nested sections) that is
    out of its RANGES entry; for configs built in code rather than by `load_config`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, _join(prefix, f.name))
        elif (problem := range_problem(type(obj), f.name, value)) is not None:
            raise ConfigError(problem, key=_join(prefix, f.name), value=value)


class _Bad(Exception):
    """One value that does not fit its type (caught and recorded by the caller)."""


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _suggest(word: Any, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=2, cutoff=0.6)
    named = " or ".join(repr(_join(prefix, c)) for c in close)
    return f" (did you mean {named}?)" if close else ""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Dataclass from a mapping; records problems instead of raising so all are reported."""
    where = prefix or cls.__name__
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for key, value in data.items():
        dotted = _join(prefix, key)
        if key not in fields:
            problems.append(f"{dotted}: unknown key{_suggest(key, list(fields), prefix)}; "
                            f"valid keys here: {', '.join(fields)}")
            continue
        base = _field_default(fields[key])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(base) and not isinstance(base, type):
            # A section given in part starts from the parent's default for it, not the section
            # class's own defaults: `sft.run_dir=x` keeps the rest of the parent's `sft`.
            value = _deep_merge(to_dict(base), value)
        try:
            kwargs[key] = _coerce(value, hints[key], dotted, problems)
        except _Bad as bad:
            problems.append(f"{dotted}={value!r}: {bad}")
            continue
        if (problem := range_problem(cls, key, kwargs[key])) is not None:
            problems.append(f"{dotted}={value!r}: {problem}")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in data or not no_default:
            continue
        if dataclasses.is_dataclass(hints[name]):  # fill from its own defaults, name what lacks
            kwargs[name] = _build(hints[name], {}, _join(prefix, name), problems)
        else:
            problems.append(f"{_join(prefix, name)}: missing required key")
    if len(problems) > before:
        return None
    try:
        obj = cls(**kwargs)
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    except ConfigError as err:
        if err.key is None:
            problems.append(f"{where}: {err.detail}")
        else:
            shown = "" if err.value is ... else f"={err.value!r}"
            problems.append(f"{_join(prefix, err.key)}{shown}: {err.detail}")
        return None
    except (ValueError, TypeError) as err:
        problems.append(f"{where}: {err}")
        return None
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """`value` checked (and minimally converted: int->float, str->Path, list->tuple) against
    `tp`; raises _Bad with the reason, or records nested dataclass problems."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Bad(f"expected a mapping for {tp.__name__}")
        return _build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        reasons = []
        for arm in (a for a in args if a is not _NoneType):
            try:
                return _coerce(value, arm, key, problems)
            except _Bad as bad:
                reasons.append(str(bad))
        raise _Bad(f"expected {_type_name(tp)}" + (f" ({'; '.join(reasons)})" if len(reasons) == 1 else ""))
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        raise _Bad(f"{value!r} is not one of {', '.join(map(repr, args))}"
                   f"{_suggest(value, [c for c in args if isinstance(c, str)])}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise _Bad(f"{value!r} is not one of {', '.join(repr(m.value) for m in tp)}"
                   f"{_suggest(value, [str(m.value) for m in tp])}")
    elif tp in (list, tuple) or origin in (list, tuple, Sequence):
        return _coerce_sequence(value, tp, key, problems)
    elif tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Bad(f"expected a mapping ({_type_name(tp)})")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}", problems): _coerce(v, vt, f"{key}.{k}", problems)
                for k, v in value.items()}
    else:
        raise _Bad(f"unsupported annotation {_type_name(tp)} (config module limitation)")
    raise _Bad(f"expected {_type_name(tp)}, got {type(value).__name__}")


def _coerce_sequence(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _Bad(f"expected a list ({_type_name(tp)}), got {type(value).__name__}")
    fixed = origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
    if fixed and len(value) != len(args):
        raise _Bad(f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
    out = []
    for i, item in enumerate(value):
        item_tp = (args[i] if fixed else args[0]) if args else Any
        try:
            out.append(_coerce(item, item_tp, f"{key}[{i}]", problems))
        except _Bad as bad:
            raise _Bad(f"{key}[{i}]={item!r}: {bad}") from None
    return tuple(out) if origin is tuple else out


# --- dataclass -> plain data ------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-safe data (dicts, lists, str, numbers) from a config dataclass."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, pathlib.PurePath):
        return str(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def save_config(cfg: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Write the resolved config as YAML (loadable by `load_config`) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))
    return path


# --- derived sizes ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def describe_derived(derived: Mapping[str, Any], indent: str = "  ") -> str:
    """Aligned `name = value  (how)` lines for the sizes a run derives (global batch, steps per
    epoch, ...); a value may be a `(value, explanation)` pair."""
    width = max((len(k) for k in derived), default=0)
    lines = []
    for name, value in derived.items():
        how = ""
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
            value, how = value[0], f"  ({value[1]})"
        lines.append(f"{indent}{name.ljust(width)} = {_fmt(value)}{how}")
    return "\n".join(lines)
