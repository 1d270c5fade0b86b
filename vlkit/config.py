"""Recipes: OmegaConf YAML with ``base:`` inheritance and dotted overrides, validated before anything loads.

A recipe is validated in full (top-level schema below, plus each part's ``Args`` dataclass from its
registry) before any weight is read, and every error names the file that set the offending key (or the
command-line override) and the key path, e.g.::

    recipes/demo/clip_mlp.yaml: model.fusion.projector: expected str, got int (2)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlkit.errors import RecipeError

# ----------------------------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Which parts make the model. Each entry is ``{name: <registered name>, **args}``."""

    encoders: list[dict[str, Any]]
    fusion: dict[str, Any]
    llm: dict[str, Any]


@dataclass
class DataConfig:
    """Datasets (``{name: <registered dataset>, **args}``) for training and validation."""

    train: dict[str, Any]
    val: dict[str, Any] | None = None


@dataclass
class StageConfig:
    """One training stage: what trains, for how long, and with which optimizer settings."""

    name: str
    trainable: list[str]
    """Parts that train: ``encoders``, ``fusion``, ``llm``, or module paths such as ``llm.model.layers.0``."""
    max_steps: int
    lr: float = 1.0e-4
    lrs: dict[str, float] = field(default_factory=dict)
    """Per-part learning rates (keys as in ``trainable``), overriding ``lr`` for those parameters."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0.03
    """Warmup length: a fraction of ``max_steps`` when < 1, otherwise a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accumulate: int = 1
    precision: str | None = None
    """Overrides ``trainer.precision`` for this stage (e.g. ``bf16-mixed``)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into ``data.train`` for this stage (e.g. ``{tasks: [caption]}``)."""
    val_every: int | None = None
    """Validate every N optimizer steps (default: only at the end of the stage)."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by all stages."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    checkpoint_every: int = 500
    """Save the stage checkpoint every N optimizer steps (and always at the end of a stage)."""
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Validation: loss plus exact-match accuracy of generated answers."""

    max_new_tokens: int = 8
    max_samples: int | None = None
    """Cap on validation samples per evaluation (None: the whole validation set)."""
    baseline_samples: int = 50000
    """Training samples scanned to find the majority answer per question type (the baseline)."""


@dataclass
class Recipe:
    """A validated recipe. Part sections are complete dicts: the name plus every argument with defaults."""

    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""
    """The recipe file this was loaded from (informational)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        data = self.to_dict()
        data.pop("source")
        return yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------- validation


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


# ---------------------------------------------------------------------------------------------- loading


class _Layers:
    """The files (and overrides) a recipe was merged from, to say which one set a key."""

    def __init__(self) -> None:
        self.layers: list[tuple[str, Any]] = []

    def add(self, source: str, data: Any) -> None:
        self.layers.append((source, data))

    def origin(self, key: str) -> str:
        parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p]
        for depth in range(len(parts), 0, -1):
            for source, data in reversed(self.layers):
                if _has_path(data, parts[:depth]):
                    return source
        return self.layers[-1][0] if self.layers else "<recipe>"


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
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml(path.parent / str(base), layers, (*chain, path)))
    layers.add(str(path), OmegaConf.to_container(cfg, resolve=False))
    return OmegaConf.merge(merged, cfg)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str], layers: _Layers) -> DictConfig:
    override_tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key.path=value (e.g. model.fusion.name=linear)")
        value = yaml.safe_load(raw) if raw else ""
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise RecipeError(f"cannot apply override {item!r}: {exc}") from exc
        node = override_tree
        parts = key.replace("[", ".").replace("]", "").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    layers.add("command-line override", override_tree)
    return cfg


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge (``base:``), override (``a.b=c``) and validate a recipe. Nothing is built or loaded."""
    layers = _Layers()
    cfg = _load_yaml(Path(path), layers)
    cfg = _apply_overrides(cfg, overrides, layers)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    try:
        recipe = to_dataclass(Recipe, data)
        recipe.source = str(path)
        _validate_parts(recipe)
    except RecipeError as exc:
        origin = layers.origin(exc.key) if exc.key else str(path)
        raise RecipeError(f"{origin}: {exc}") from None
    return recipe


def _complete(registry: Any, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    args = registry.parse_args(section, where)
    return {"name": section["name"], **dataclasses.asdict(args)}


def _validate_parts(recipe: Recipe) -> None:
    """Validate every part section against its registered ``Args`` and fill in defaults."""
    from vlkit.registry import DATASETS, ENCODERS, FUSIONS, LLMS

    m = recipe.model
    if not m.encoders:
        raise RecipeError("at least one encoder is required", "model.encoders")
    m.encoders = [_complete(ENCODERS, e, f"model.encoders[{i}]") for i, e in enumerate(m.encoders)]
    m.fusion = _complete(FUSIONS, m.fusion, "model.fusion")
    m.llm = _complete(LLMS, m.llm, "model.llm")
    recipe.data.train = _complete(DATASETS, recipe.data.train, "data.train")
    if recipe.data.val is not None:
        recipe.data.val = _complete(DATASETS, recipe.data.val, "data.val")
    if not recipe.stages:
        raise RecipeError("at least one stage is required", "stages")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if names.count(stage.name) > 1:
            raise RecipeError(f"duplicate stage name {stage.name!r}; stage names must be unique", f"{where}.name")
        if stage.max_steps <= 0:
            raise RecipeError("must be positive", f"{where}.max_steps")
        if not stage.trainable:
            raise RecipeError("name at least one part to train (encoders, fusion, llm or a module path)",
                              f"{where}.trainable")
        if stage.data:
            _complete(DATASETS, {**recipe.data.train, **stage.data}, f"{where}.data")
