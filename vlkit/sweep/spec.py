"""Sweep files: parse and validate a sweep YAML into cells x seeds, every run's recipe loaded up front.

The file format is described in :mod:`vlkit.sweep`. Nothing here runs or reports anything.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlkit.config import Recipe, load_recipe
from vlkit.errors import RecipeError
from vlkit.schema import to_dataclass

DEFAULT_METRIC = "val/accuracy"
LMMS_PREFIX = "lmms/"
Status = Literal["ok", "failed", "interrupted", "pending"]


@dataclass
class SweepEval:
    """A sweep's ``eval:`` block: lmms-eval tasks run by ``vlkit eval`` on every finished run."""

    tasks: list[str]
    """lmms-eval task names (local ones need ``include_path``)."""
    limit: float | None = None
    """Samples per task (a fraction of each task when below 1); None: every sample."""
    include_path: str | None = None
    """Folder of local lmms-eval task YAMLs, relative to the sweep file."""
    batch_size: int = 8
    max_new_tokens: int = 32
    """Generation budget of tasks that do not set their own ``max_new_tokens``."""


@dataclass
class SweepFile:
    """The schema of a sweep YAML file (see the module docstring)."""

    recipe: str
    """Base recipe, relative to the sweep file."""
    grid: dict[str, list[Any]] | None = None
    """Dotted recipe key -> values; one cell per combination (cartesian product, in key order)."""
    cells: list[dict[str, Any]] | None = None
    """Explicit cells: each a mapping of dotted key -> value, plus an optional ``name``."""
    seeds: list[int] | None = None
    """Seeds to run every cell with (``seed=`` override); None: once, with the recipe's own seed."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides applied to every cell before the cell's own."""
    metrics: list[str] | None = None
    """Summary metrics to report (default: ``val/accuracy`` and every ``val/accuracy/<type>`` found; with
    ``eval:``, every lmms-eval metric found after them)."""
    rank_by: str | None = None
    """The metric that ranks cells (best first, by mean over seeds) and is plotted: a ``val/...`` key of the
    runs' ``summary.json`` or ``lmms/<task>/<metric>``; default: the first reported metric."""
    eval: SweepEval | None = None
    """lmms-eval tasks to run on every finished run (``vlkit eval``; ``pip install 'vlkit[eval]'``)."""
    out: str | None = None
    """Output folder, relative to the sweep file (default: ``runs/<sweep file name>``)."""


@dataclass
class Cell:
    """One configuration of the sweep: a name (its folder) and its dotted overrides."""

    name: str
    overrides: list[str]
    """The cell's own overrides as ``key=value`` strings (without the sweep's common overrides)."""


@dataclass
class Run:
    """One cell trained with one seed."""

    cell: Cell
    seed: int
    overrides: list[str]
    """Everything passed to ``vlkit fit`` after the recipe: common, cell and seed overrides."""
    run_dir: Path
    log: Path
    recipe: Recipe
    """The resolved recipe (validated up front); its YAML must match a reused run folder's."""


@dataclass
class Sweep:
    """A validated sweep: every run's recipe has been loaded and checked, nothing has run."""

    path: Path
    recipe: Path
    cells: list[Cell]
    runs: list[Run]
    out: Path
    metrics: list[str] | None
    seeds: list[int] | None
    common: list[str] = field(default_factory=list)
    """The sweep's ``overrides:`` as ``key=value`` strings (applied before every cell's own)."""
    rank_by: str | None = None
    eval: SweepEval | None = None
    """The ``eval:`` block, ``include_path`` resolved against the sweep file."""


@dataclass
class RunResult:
    """What is known about one run after (or without) this invocation."""

    run: Run
    status: Status
    reused: bool = False
    """True when the run had finished in an earlier invocation and was skipped this time."""
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The run's final validation metrics (``summary.json``'s ``val``)."""
    error: str = ""


def format_value(value: Any) -> str:
    """An override value as text that the recipe loader (YAML) reads back as ``value``."""
    if isinstance(value, str) and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _label(value: Any) -> str:
    """A short readable form of an override value for cell names: ``token_concat+projector=linear``."""
    if isinstance(value, Mapping):
        parts = [_label(value["name"])] if "name" in value else []
        parts += [f"{k}={_label(v)}" for k, v in value.items() if k != "name"]
        return "+".join(parts)
    if isinstance(value, list):
        return "_".join(_label(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` as a folder name: unusual characters become ``_``; long names are cut and made unique."""
    name = re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text).strip("._") or "cell"
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def _auto_name(overrides: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``fusion.name=mlp,lr=0.001``-style name: the last key component unless two keys share it."""
    if not overrides:
        return "base"
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for key, value in overrides.items():
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{key if lasts.count(short) > 1 else short}={_label(value)}")
    return safe_name(",".join(parts))


def _check_keys(mapping: Mapping[Any, Any], where: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or not key or "=" in key:
            raise RecipeError(f"override keys must be dotted recipe keys such as stages.0.lr, got {key!r}", where)


def _cells(spec: SweepFile) -> list[tuple[str, dict[str, Any]]]:
    if (spec.grid is None) == (spec.cells is None):
        raise RecipeError("give exactly one of `grid` (dotted key -> list of values) or `cells` (a list of "
                          "override mappings)")
    cells: list[tuple[str, dict[str, Any]]] = []
    if spec.grid is not None:
        if not spec.grid:
            raise RecipeError("name at least one key to vary", "grid")
        _check_keys(spec.grid, "grid")
        for key, values in spec.grid.items():
            if not values:
                raise RecipeError("needs at least one value", f"grid.{key}")
        keys = list(spec.grid)
        for combo in itertools.product(*spec.grid.values()):
            overrides = dict(zip(keys, combo))
            cells.append((_auto_name(overrides, keys), overrides))
    else:
        assert spec.cells is not None
        if not spec.cells:
            raise RecipeError("list at least one cell", "cells")
        all_keys = sorted({k for c in spec.cells for k in c if k != "name"})
        for i, cell in enumerate(spec.cells):
            overrides = {k: v for k, v in cell.items() if k != "name"}
            _check_keys(overrides, f"cells[{i}]")
            name = cell.get("name")
            if name is None:
                name = _auto_name(overrides, all_keys)
            elif not isinstance(name, str) or safe_name(name) != name:
                raise RecipeError(f"cell names become folder names: use letters, digits and . _ = + , - "
                                  f"(e.g. {safe_name(str(name))!r}), got {name!r}", f"cells[{i}].name")
            cells.append((name, overrides))
    seen: dict[str, int] = {}
    for i, (name, _) in enumerate(cells):
        if name in seen:
            raise RecipeError(f"cells {seen[name]} and {i} are both named {name!r}; give them distinct `name`s")
        seen[name] = i
    return cells


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read a sweep file and validate every run's recipe (base recipe + overrides) before anything runs.

    Raises RecipeError naming the sweep file, and the cell, for a malformed sweep or an invalid override.
    ``out`` overrides the sweep file's ``out`` (relative to the working directory).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    try:
        spec = to_dataclass(SweepFile, data)
        cells = _cells(spec)
        if spec.seeds is not None and (not spec.seeds or len(set(spec.seeds)) != len(spec.seeds)):
            raise RecipeError("list one or more distinct seeds (or leave `seeds` out)", "seeds")
        _check_keys(spec.overrides, "overrides")
        _check_eval(spec)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    recipe_path = Path(os.path.normpath(path.parent / spec.recipe))
    if out is None:
        out = path.parent / spec.out if spec.out else path.parent / "runs" / path.stem
    out = Path(os.path.normpath(out))
    common = [f"{k}={format_value(v)}" for k, v in spec.overrides.items()]
    if spec.eval is not None and spec.eval.include_path is not None:
        include = Path(os.path.normpath(path.parent / spec.eval.include_path))
        if not include.is_dir():
            raise RecipeError(f"{path}: eval.include_path: folder not found: {include}")
        spec.eval.include_path = str(include)

    sweep_cells: list[Cell] = []
    runs: list[Run] = []
    for name, overrides in cells:
        cell = Cell(name, [f"{k}={format_value(v)}" for k, v in overrides.items()])
        sweep_cells.append(cell)
        for seed in spec.seeds if spec.seeds is not None else [None]:
            extra = [] if seed is None else [f"seed={seed}"]
            try:
                recipe = load_recipe(recipe_path, [*common, *cell.overrides, *extra])
            except RecipeError as exc:
                raise RecipeError(f"{path}: cell {name!r}: {exc}") from None
            run_dir = out / name / f"seed{recipe.seed}"
            runs.append(Run(cell, recipe.seed, [*common, *cell.overrides, *extra], run_dir,
                            run_dir.with_name(f"{run_dir.name}.log"), recipe))
    return Sweep(path, recipe_path, sweep_cells, runs, out, spec.metrics, spec.seeds, common, spec.rank_by,
                 spec.eval)


def _check_eval(spec: SweepFile) -> None:
    """The ``eval:`` block and ``rank_by`` name something this sweep reports."""
    if spec.eval is not None:
        if not spec.eval.tasks or not all(isinstance(t, str) and t and "," not in t for t in spec.eval.tasks):
            raise RecipeError("list one or more lmms-eval task names (without commas)", "eval.tasks")
        if spec.eval.limit is not None and spec.eval.limit <= 0:
            raise RecipeError(f"must be positive (samples, or a fraction below 1), got {spec.eval.limit}",
                              "eval.limit")
    for where, key in [("rank_by", spec.rank_by), *((f"metrics[{i}]", m) for i, m in enumerate(spec.metrics or []))]:
        if key is None:
            continue
        if not isinstance(key, str) or not key.startswith(("val/", LMMS_PREFIX)):
            raise RecipeError(f"{key!r} is not a metric: use a validation metric (val/accuracy, val/anls/<type>, "
                              f"...) or an lmms-eval score ({LMMS_PREFIX}<task>/<metric>)", where)
        if key.startswith(LMMS_PREFIX):
            task = key[len(LMMS_PREFIX):].split("/", 1)[0]
            tasks = spec.eval.tasks if spec.eval is not None else []
            if task not in tasks or key.count("/") != 2:
                raise RecipeError(f"{key!r}: lmms-eval scores are {LMMS_PREFIX}<task>/<metric> of a task in the "
                                  f"sweep's eval.tasks ({', '.join(tasks) or 'no eval: block'})", where)

