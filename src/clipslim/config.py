"""Typed configs from plain dicts (YAML): dataclasses + a strict builder.

Every key is checked before any compute starts: an unknown key or a wrong type is a one-line ``ConfigError`` that
names the dotted field, e.g. ``train.lr: expected float, got str 'fast'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad recipe or option; the message starts with the dotted field name."""


class RunError(RuntimeError):
    """A run that cannot go on (e.g. diverged); the one-line message says why and what was kept."""


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting int→float and list→tuple where the hint asks."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        arms = typing.get_args(hint)
        real = [arm for arm in arms if arm is not type(None)]
        if value is not None and len(real) == 1:  # Optional[X]: X's own error names the exact field
            return _coerce(value, real[0], where)
        for arm in arms:
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return build(hint, value, where)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            _, val_hint = typing.get_args(hint) or (str, Any)
            return {str(k): _coerce(v, val_hint, f"{where}.{k}") for k, v in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def build(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by dotted name."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(names)})")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key missing")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)
    return obj


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(obj: Any) -> Any:
    """Dataclass → plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
