"""Recipe schemas: check a mapping against a dataclass's type annotations, converting where lossless.

Imports nothing of vlkit but :mod:`vlkit.errors`, so every layer (the registries, the parts' ``Args``,
the recipe loader) can validate with it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from vlkit.errors import RecipeError


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` (converting where lossless); raise RecipeError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        present = [arg for arg in args if arg is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own error is the precise one (e.g. a nested dataclass key)
            return _convert(present[0], value, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except RecipeError as exc:
                errors.append(exc.message)
        raise RecipeError(f"expected {_type_name(tp)}, got {type(value).__name__} ({value!r})", key)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{value!r} is not one of {list(args)}.{hint}", key)
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise RecipeError(f"expected a list, got {type(value).__name__} ({value!r})", key)
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"expected a mapping, got {type(value).__name__} ({value!r})", key)
        vt = args[1] if args else Any
        return {k: _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return to_dataclass(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"expected float, got {type(value).__name__} ({value!r})", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"expected int, got {type(value).__name__} ({value!r})", key)
    if tp in (str, bool):
        if type(value) is tp:
            return value
        raise RecipeError(f"expected {tp.__name__}, got {type(value).__name__} ({value!r})", key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise RecipeError(f"expected {_type_name(tp)}, got {type(value).__name__} ({value!r})", key)


def to_dataclass(schema: type, data: Any, where: str = "") -> Any:
    """Build ``schema`` (a dataclass) from a mapping, rejecting unknown keys, wrong types, missing fields.

    ``where`` is the key path of ``data`` inside the recipe, used in error messages.
    """
    if isinstance(data, (DictConfig, ListConfig)):
        data = OmegaConf.to_container(data, resolve=True)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"expected a mapping, got {type(data).__name__} ({data!r})", where or None)
    prefix = f"{where}." if where else ""
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"unknown key.{hint} Valid keys here: {', '.join(fields)}", f"{prefix}{key}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError("missing required key", f"{prefix}{name}")
    return schema(**kwargs)


__all__ = ["to_dataclass"]
