"""Registries turn the names in a recipe into classes.

Every part (encoder, fusion, LLM, dataset) is a class registered under a name. The class declares its
recipe arguments as a dataclass in the class attribute ``Args``; the registry validates a recipe section
against it (before any weight is loaded) and builds the part as ``cls(args, **context)``.

Third-party packages add parts through the entry-point groups ``vlkit.encoders``, ``vlkit.fusions``,
``vlkit.llms`` and ``vlkit.datasets`` (the entry point's value is a class, registered under the entry
point's name, or a module, imported for its ``@register`` side effects). A recipe can also name a class by
import path, ``name: mypkg.mymodule:MyEncoder``, without packaging anything (the working directory is
searched too).

Names are known without importing anything heavy: the built-in names come from reading the part modules'
``@REGISTRY.register("name")`` decorators (:mod:`ast`), the plugin names from the entry-point metadata. A
part's module is imported only when the part is looked up, so ``vlkit --help`` and ``vlkit list`` start
without torch, and a broken plugin affects only recipes that name it: its failure (import error, no
``Args``, wrong base class, a name clash) is one :class:`PluginWarning`, and looking it up raises
"installed but failed to load: <cause>".
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, TypeVar

from vlkit.errors import RecipeError

T = TypeVar("T", bound=type)


class PluginWarning(UserWarning):
    """A vlkit plugin could not be loaded; it was skipped and everything else works."""


@dataclass(frozen=True)
class PartInfo:
    """What is known about a registered name without importing its module."""

    name: str
    target: str
    """``module:Class`` (or just ``module`` for an entry point whose module registers its parts itself)."""
    doc: str = ""
    """The class docstring, as written (read from the source)."""
    entry_point: EntryPoint | None = None
    """None for a built-in part."""

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def origin(self) -> str:
        if self.entry_point is None:
            return f"built-in {self.target}"
        return _describe_entry_point(self.entry_point)


def _describe_entry_point(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    package = f"plugin {dist.name!r}" if dist is not None else "plugin"
    return f"{package}, entry point '{ep.name} = {ep.value}' in group {ep.group!r}"


def module_source(module: str) -> Path | None:
    """The ``.py`` file of ``module`` (dotted), found without importing it or its packages; None if absent
    or not plain source (e.g. compiled)."""
    top, _, rest = module.partition(".")
    try:
        spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for location in spec.submodule_search_locations or []:
        path = Path(location, *rest.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def registered_in_source(tree: ast.Module, registry_names: set[str]) -> list[tuple[str, ast.ClassDef]]:
    """``(name, class)`` for every ``@<R>.register("name")`` class decorator in a module's source, where
    ``<R>`` is one of ``registry_names`` (the name may also be a module-level string constant)."""
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "register" and dec.args):
                continue
            owner = dec.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            arg = dec.args[0]
            name = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""))
            if owner_name in registry_names and isinstance(name, str):
                found.append((name, node))
    return found


def _class_in_source(tree: ast.Module, qualname: str) -> ast.ClassDef | None:
    body: list[ast.stmt] = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def _ensure_cwd_on_path() -> None:
    """``module:Class`` names are documented to be found in the working directory too: the ``vlkit``
    console script does not put it on ``sys.path`` (``python -m`` does), so it is appended (last, so that
    installed packages win)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


class Registry:
    """An index of named part classes of one kind (e.g. all vision encoders)."""

    def __init__(self, kind: str, group: str, package: str | None = None, base: str | None = None,
                 common_args: Mapping[str, tuple[Any, str]] | None = None) -> None:
        """``package``: its public modules are the built-in parts (each one file with an ``@register``).
        ``base``: ``module:Class`` every plugin part must subclass. ``common_args``: recipe keys every part of
        this kind accepts (name -> (type, doc)) whether or not its ``Args`` declares them (e.g. an encoder's
        ``key:``); they are kept in the completed section and not passed to ``Args``."""
        self.kind = kind
        self.group = group
        self._package = package
        self._base = base
        self.common_args: dict[str, tuple[Any, str]] = dict(common_args or {})
        self._classes: dict[str, type] = {}
        self._index: dict[str, PartInfo] | None = None
        self._failed: dict[str, tuple[PartInfo, str]] = {}
        self._loaded: set[str] = set()

    # --------------------------------------------------------------------------------------- registration

    @property
    def _var_names(self) -> set[str]:
        """The names this registry has in this module (``ENCODERS``), as its decorators spell it."""
        return {k for k, v in globals().items() if v is self}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@ENCODERS.register("clip")``. The class must define an ``Args`` dataclass."""

        def decorator(cls: T) -> T:
            args = getattr(cls, "Args", None)
            if not (inspect.isclass(args) and dataclasses.is_dataclass(args)):
                raise TypeError(f"{self.kind} {name!r} ({cls.__qualname__}) must define a dataclass `Args`")
            existing = self._classes.get(name)
            builtin = self._builtin_index().get(name)
            if existing is None and builtin is not None and builtin.module != cls.__module__:
                existing_name = builtin.target.replace(":", ".")
            elif existing is not None and existing is not cls:
                existing_name = f"{existing.__module__}.{existing.__qualname__}"
            else:
                existing_name = None
            if existing_name is not None:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {existing_name}; pick "
                                 "another name")
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    # ------------------------------------------------------------------------------------ the static index

    def _builtin_index(self) -> dict[str, PartInfo]:
        if getattr(self, "_builtins", None) is None:
            self._builtins: dict[str, PartInfo] = {}
            if self._package is not None:
                spec = importlib.util.find_spec(self._package)
                for location in (spec.submodule_search_locations or []) if spec else []:
                    for path in sorted(Path(location).glob("*.py")):
                        tree = None if path.name.startswith("_") else _parse(path)
                        for name, node in registered_in_source(tree, self._var_names) if tree else []:
                            module = f"{self._package}.{path.stem}"
                            self._builtins[name] = PartInfo(name, f"{module}:{node.name}",
                                                            ast.get_docstring(node) or "")
        return self._builtins

    def index(self) -> dict[str, PartInfo]:
        """Every name (built-ins, then plugins) with what is known about it, without importing any part.

        Plugins whose failure shows without importing them (module not installed, class not in its module,
        a name already taken) are reported here, once, as a :class:`PluginWarning`."""
        if self._index is not None:
            return self._index
        index = dict(self._builtin_index())
        for ep in entry_points(group=self.group):
            module, _, attr = ep.value.partition(":")
            module = module.strip()
            attr = attr.split("[")[0].strip()
            source = module_source(module)
            tree = _parse(source) if source else None
            if attr:
                node = _class_in_source(tree, attr) if tree else None
                infos = [PartInfo(ep.name, f"{module}:{attr}", (ast.get_docstring(node) or "") if node else "", ep)]
                if tree is not None and node is None and "." not in attr:
                    self._fail(infos[0], f"{module} defines no class {attr!r}")
                    continue
            elif tree is not None:
                infos = [PartInfo(name, f"{module}:{node.name}", ast.get_docstring(node) or "", ep)
                         for name, node in registered_in_source(tree, self._var_names)] \
                    or [PartInfo(ep.name, module, "", ep)]
            else:
                infos = [PartInfo(ep.name, module, "", ep)]
            if source is None and importlib.util.find_spec(module.partition(".")[0]) is None:
                self._fail(infos[0], f"ModuleNotFoundError: No module named {module.partition('.')[0]!r}")
                continue
            for info in infos:
                taken = index.get(info.name)
                if taken is not None:  # the first keeps the name; the plugin is not loaded
                    self._loaded.add(self._load_key(info))
                    self._fail(info, f"registration clash: the name {info.name!r} is already taken by "
                               f"{taken.origin}; this plugin's part was skipped (rename it)", record=False)
                else:
                    index[info.name] = info
        self._index = index
        return index

    def names(self) -> list[str]:
        """All registered names, sorted (built-ins and plugins that did not fail), importing no part."""
        return sorted((set(self.index()) | set(self._classes)) - set(self._failed))

    def failures(self) -> dict[str, str]:
        """Plugins that failed to load so far: registered name -> cause."""
        return {name: cause for name, (_, cause) in self._failed.items()}

    def _fail(self, info: PartInfo, cause: str, record: bool = True) -> None:
        """Warn (once) that a plugin part was skipped; ``record``: looking its name up says why."""
        if info.name in self._failed:
            return
        if record:
            self._failed[info.name] = (info, cause)
            if self._index is not None and self._index.get(info.name) == info:
                del self._index[info.name]
        where = info.origin if info.entry_point is not None else info.target
        warnings.warn(f"vlkit {self.kind} plugin skipped ({where}): failed to load: {cause}", PluginWarning,
                      stacklevel=3)

    # -------------------------------------------------------------------------------------------- loading

    @staticmethod
    def _load_key(info: PartInfo) -> str:
        return info.module if info.entry_point is None else f"{info.entry_point.group}:{info.entry_point.name}"

    def _load(self, info: PartInfo) -> None:
        """Import the module of ``info`` (a built-in or a plugin); a plugin's failure is recorded, not raised."""
        if self._load_key(info) in self._loaded:
            return
        self._loaded.add(self._load_key(info))
        if info.entry_point is None:
            try:
                importlib.import_module(info.module)
            except ImportError as exc:
                raise RecipeError(f"built-in {self.kind} {info.name!r} ({info.module}) cannot be imported: "
                                  f"{type(exc).__name__}: {exc}") from exc
            return
        before = set(self._classes)
        try:
            obj = info.entry_point.load()
        except Exception as exc:  # a broken plugin must not break vlkit: any failure is one warning
            cause = f"{type(exc).__name__}: {exc}"
            for other in [i for i in self.index().values() if i.entry_point is info.entry_point] or [info]:
                self._fail(other, cause)
            return
        if ":" in info.entry_point.value:
            problem = self._plugin_problem(obj)
            if problem:
                self._fail(info, problem)
                return
            if info.name not in self._classes:
                try:
                    self.register(info.name)(obj)
                except (TypeError, ValueError) as exc:
                    self._fail(info, str(exc))
            return
        for name in set(self._classes) - before:  # a module that registered its parts itself
            problem = self._plugin_problem(self._classes[name])
            if problem:
                del self._classes[name]
                self._fail(dataclasses.replace(info, name=name), problem)

    def _plugin_problem(self, obj: Any) -> str | None:
        """Why ``obj`` cannot be a part of this kind (None if it can)."""
        if not inspect.isclass(obj):
            return f"expected a class, got {type(obj).__name__} {obj!r}"
        args = getattr(obj, "Args", None)
        if not (inspect.isclass(args) and dataclasses.is_dataclass(args)):
            return (f"{obj.__module__}.{obj.__qualname__} has no dataclass `Args` (declare its recipe "
                    "arguments as `@dataclass class Args: ...` inside the class)")
        base = self.base_class()
        if base is not None and not issubclass(obj, base):
            return (f"{obj.__module__}.{obj.__qualname__} does not subclass {base.__module__}."
                    f"{base.__qualname__}, the {self.kind} interface")
        return None

    def base_class(self) -> type | None:
        """The class every part of this kind subclasses (None if this registry has none)."""
        if self._base is None:
            return None
        module, _, attr = self._base.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None

    def load_all(self) -> None:
        """Import every built-in part and every plugin (each plugin failure is one warning)."""
        for info in list(self.index().values()):
            self._load(info)

    def get(self, name: str) -> type:
        """The class registered as ``name``, or the class at import path ``module:Class``."""
        if not isinstance(name, str):
            raise RecipeError(f"a part name must be a string, got {type(name).__name__} ({name!r})")
        if name in self._classes:
            return self._classes[name]
        if name in self._failed:
            info, cause = self._failed[name]
            raise RecipeError(f"{self.kind} {name!r} is installed ({info.origin}) but failed to load: {cause}")
        info = self.index().get(name)
        if info is None and ":" not in name:  # module entry points whose names the source did not show
            for other in [i for i in self.index().values() if i.entry_point is not None and ":" not in i.target]:
                self._load(other)
            if name in self._classes or name in self._failed:
                return self.get(name)
        if info is None:
            if ":" in name:
                return self._import_path(name)
            known = self.names()
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RecipeError(
                f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(known)}. "
                f"Third-party {self.kind}s are added via the {self.group!r} entry-point group or as "
                f"'package.module:Class'."
            )
        self._load(info)
        if name in self._classes:
            return self._classes[name]
        if name in self._failed:
            return self.get(name)
        raise RecipeError(f"{self.kind} {name!r}: {info.module} was imported but registers no {self.kind} "
                          f"named {name!r} (from {info.origin})")

    def _import_path(self, path: str) -> type:
        module_name, _, attr = path.partition(":")
        _ensure_cwd_on_path()
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RecipeError(f"cannot import {self.kind} {path!r}: {type(exc).__name__}: {exc}") from exc
        problem = self._plugin_problem(cls)
        if problem:
            raise RecipeError(f"{self.kind} {path!r}: {problem}")
        return cls

    # ---------------------------------------------------------------------------------------- validation

    def parse_args(self, cfg: Mapping[str, Any], where: str = "") -> Any:
        """Validate a recipe section ``{name: ..., **args}`` and return the part's ``Args`` instance."""
        from vlkit.schema import to_dataclass

        if not isinstance(cfg, Mapping):
            raise RecipeError(f"expected a mapping {{name: <{self.kind}>, ...}}, got {type(cfg).__name__} "
                              f"({cfg!r})", where or None)
        if "name" not in cfg:
            raise RecipeError(f"missing required key (one of {', '.join(self.names())})", f"{where}.name")
        try:
            cls = self.get(cfg["name"])
        except RecipeError as exc:
            raise RecipeError(exc.message, f"{where}.name" if where else None) from None
        declared = {f.name for f in dataclasses.fields(cls.Args)}
        body = {k: v for k, v in cfg.items() if k != "name" and (k in declared or k not in self.common_args)}
        try:
            return to_dataclass(cls.Args, body, where)
        except RecipeError as exc:
            if exc.key is None and where:  # raised by the part's own checks (e.g. in __post_init__)
                raise RecipeError(exc.message, where) from None
            raise
        except Exception as exc:  # a library's own check in __post_init__ (e.g. a transformers config)
            message = " ".join(str(exc).split())
            raise RecipeError(f"{self.kind} {cfg['name']!r} rejected its arguments: {type(exc).__name__}: "
                              f"{message}", where or None) from None

    def complete(self, cfg: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """``cfg`` validated, with every argument (defaults filled in) and the common keys it sets."""
        from vlkit.schema import _convert

        args = self.parse_args(cfg, where)
        out = {"name": cfg["name"], **dataclasses.asdict(args)}
        prefix = f"{where}." if where else ""
        for key, (tp, _) in self.common_args.items():
            if key in cfg and key not in out:
                out[key] = _convert(tp, cfg[key], f"{prefix}{key}")
        return out

    def build(self, cfg: Mapping[str, Any], where: str = "", **context: Any) -> Any:
        """Validate ``cfg`` and construct the part: ``cls(args, **context)``; its contract is checked now
        and on its first forward (:mod:`vlkit.contracts`)."""
        args = self.parse_args(cfg, where)
        part = self.get(cfg["name"])(args, **context)
        from vlkit.contracts import check_part  # imports torch: only once something is built

        check_part(self.kind, part, cfg["name"], where, **context)
        return part


ENCODERS = Registry("encoder", "vlkit.encoders", "vlkit.encoders", base="vlkit.encoders.base:VisionEncoder",
                    common_args={"key": (str | None, "The name of this encoder in the model: its streams reach the "
                                         "fusion as '<key>.<stream>' and its parameters live under "
                                         "encoders.<key> (default: the registered name).")})
FUSIONS = Registry("fusion", "vlkit.fusions", "vlkit.fusions", base="vlkit.fusions.base:Fusion")
LLMS = Registry("llm", "vlkit.llms", "vlkit.llms", base="vlkit.llms.base:LLM")
DATASETS = Registry("dataset", "vlkit.datasets", "vlkit.data", base="vlkit.data.base:Dataset")
OBJECTIVES = Registry("objective", "vlkit.objectives", "vlkit.objectives", base="vlkit.objectives.base:Objective")

REGISTRIES: dict[str, Registry] = {
    "encoders": ENCODERS,
    "fusions": FUSIONS,
    "llms": LLMS,
    "datasets": DATASETS,
    "objectives": OBJECTIVES,
}
