"""Registries turn the names in a recipe into classes.

Every part (encoder, fusion, LLM, dataset) is a class registered under a name. The class declares its
recipe arguments as a dataclass in the class attribute ``Args``; the registry validates a recipe section
against it (before any weight is loaded) and builds the part as ``cls(args, **context)``.

Third-party packages add parts through the entry-point groups ``vlkit.encoders``, ``vlkit.fusions``,
``vlkit.llms`` and ``vlkit.datasets`` (the entry point's value is a module, imported for its
``@register`` side effects, or a class, registered under the entry point's name). A recipe can also name
a class by import path, ``name: mypkg.mymodule:MyEncoder``, without packaging anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from vlkit.errors import RecipeError

T = TypeVar("T", bound=type)


class Registry:
    """An index of named part classes of one kind (e.g. all vision encoders)."""

    def __init__(self, kind: str, group: str, package: str | None = None) -> None:
        """``package``: every public module in it is imported on first lookup for its registrations, so a
        built-in part is one file with an ``@register`` and nothing else to edit."""
        self.kind = kind
        self.group = group
        self._package = package
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@ENCODERS.register("clip")``. The class must define an ``Args`` dataclass."""

        def decorator(cls: T) -> T:
            args = getattr(cls, "Args", None)
            if not (inspect.isclass(args) and dataclasses.is_dataclass(args)):
                raise TypeError(f"{self.kind} {name!r} ({cls.__qualname__}) must define a dataclass `Args`")
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; pick another name"
                )
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._package is not None:
            package = importlib.import_module(self._package)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self._package}.{info.name}")
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break vlkit
                warnings.warn(
                    f"vlkit plugin {ep.name!r} ({ep.value}) in entry-point group {self.group!r} failed to "
                    f"import and was skipped: {type(exc).__name__}: {exc}",
                    stacklevel=2,
                )
                continue
            if inspect.isclass(obj) and ep.name not in self._classes:
                self.register(ep.name)(obj)

    def names(self) -> list[str]:
        """All registered names, sorted (built-ins and plugins)."""
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as ``name``, or the class at import path ``module:Class``."""
        self._load()
        if name in self._classes:
            return self._classes[name]
        if ":" in name:
            return self._import_path(name)
        close = difflib.get_close_matches(name, list(self._classes), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(
            f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(sorted(self._classes))}. "
            f"Third-party {self.kind}s are added via the {self.group!r} entry-point group or as "
            f"'package.module:Class'."
        )

    def _import_path(self, path: str) -> type:
        module_name, _, attr = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RecipeError(f"cannot import {self.kind} {path!r}: {type(exc).__name__}: {exc}") from exc
        if not (inspect.isclass(cls) and dataclasses.is_dataclass(getattr(cls, "Args", None))):
            raise RecipeError(f"{self.kind} {path!r} must be a class with a dataclass `Args`")
        return cls

    def parse_args(self, cfg: Mapping[str, Any], where: str = "") -> Any:
        """Validate a recipe section ``{name: ..., **args}`` and return the part's ``Args`` instance."""
        from vlkit.config import to_dataclass  # config imports registries; avoid the cycle at import time

        if "name" not in cfg:
            raise RecipeError(f"missing required key (one of {', '.join(self.names())})", f"{where}.name")
        try:
            cls = self.get(cfg["name"])
        except RecipeError as exc:
            raise RecipeError(exc.message, f"{where}.name" if where else None) from None
        body = {k: v for k, v in cfg.items() if k != "name"}
        try:
            return to_dataclass(cls.Args, body, where)
        except RecipeError as exc:
            if exc.key is None and where:  # raised by the part's own checks (e.g. in __post_init__)
                raise RecipeError(exc.message, where) from None
            raise

    def build(self, cfg: Mapping[str, Any], where: str = "", **context: Any) -> Any:
        """Validate ``cfg`` and construct the part: ``cls(args, **context)``."""
        args = self.parse_args(cfg, where)
        return self.get(cfg["name"])(args, **context)


ENCODERS = Registry("encoder", "vlkit.encoders", "vlkit.encoders")
FUSIONS = Registry("fusion", "vlkit.fusions", "vlkit.fusions")
LLMS = Registry("llm", "vlkit.llms", "vlkit.llms")
DATASETS = Registry("dataset", "vlkit.datasets", "vlkit.data")

REGISTRIES: dict[str, Registry] = {
    "encoders": ENCODERS,
    "fusions": FUSIONS,
    "llms": LLMS,
    "datasets": DATASETS,
}
