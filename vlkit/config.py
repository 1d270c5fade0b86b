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
class ViewsConfig:
    """Multi-scale views (SPHINX-1k): each image becomes a global view plus ``grid x grid`` sub-images.

    The data pipeline pads images to square and resizes them to ``grid * size``; the model encodes the
    ``1 + grid**2`` views of side ``size`` separately and hands the LLM their tokens in order (global first,
    then the sub-images row by row). See :mod:`vlkit.data.views`.
    """

    grid: int = 2
    """Sub-images per side (2: global + 4 views from a 2*size image; 3: global + 9)."""
    size: int = 224
    """Side of every view in pixels (each encoder still resizes a view to its own input size)."""
    pad: Literal["mean", "white", "black", "none"] = "mean"
    """Fill when padding to square: the CLIP mean colour (LLaVA/SPHINX), white, black, or ``none`` (stretch)."""


@dataclass
class ModelConfig:
    """Which parts make the model. Each entry is ``{name: <registered name>, **args}``."""

    encoders: list[dict[str, Any]]
    fusion: dict[str, Any] | None = field(default=None, kw_only=True)
    """Required, except with a holistic encoder (HoVLE), which feeds the LLM directly: then null."""
    llm: dict[str, Any]
    views: ViewsConfig | None = None
    """Split each image into a global view + sub-images (e.g. ``{grid: 2, size: 224}``); null: one view."""


@dataclass
class DataConfig:
    """Datasets (``{name: <registered dataset>, **args}``) for training and validation."""

    train: dict[str, Any]
    val: dict[str, Any] | None = None
    feature_cache: str | None = None
    """A folder for the frozen encoders' streams: in every stage whose encoders are all frozen, training
    reads each image's cached streams instead of running the encoders (built on first use; see
    :mod:`vlkit.data.feature_cache`). Validation still reads pixels."""


@dataclass
class DistillConfig:
    """Targets of a distillation stage (HoVLE stage I): a frozen teacher for the image positions, the LLM's
    input embeddings for the text positions; only the holistic encoder trains."""

    teacher: dict[str, Any]
    """A vision-encoder section (``{name: <registered encoder>, **args}``), built frozen."""
    teacher_stream: str | None = None
    """Which of the teacher's streams gives the targets (default: its only stream)."""
    shuffle: bool = False
    """Pixel-shuffle (ratio 0.5) the teacher's token grid before the projector, as InternVL does."""
    projector: str | None = None
    """Frozen projector from the teacher's width to the LLM's: ``linear`` or ``mlp{N}x_gelu`` (None: the
    teacher's width must equal the LLM's hidden size)."""
    projector_norm: bool = False
    """LayerNorm before the projector (InternVL's ``mlp1`` layout: LayerNorm, Linear, GELU, Linear)."""
    projector_weights: str | None = None
    """A ``.safetensors`` file with the projector's weights (e.g. a VLM's trained projector); None: random."""
    projector_prefix: str = ""
    """Key prefix of the projector's tensors in ``projector_weights`` (e.g. ``mlp1.``)."""
    loss: Literal["cosine", "mse"] = "cosine"
    """``cosine``: 1 - cosine similarity per token; ``mse``: mean squared error per channel."""
    image_weight: float = 1.0
    text_weight: float = 1.0


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
    """Overrides merged into ``data.train`` for this stage (e.g. ``{tasks: [caption]}``); a section whose
    ``name`` differs from ``data.train``'s is a dataset of its own that replaces it for this stage."""
    val_every: int | None = None
    """Validate every N optimizer steps (default: only at the end of the stage)."""
    objective: Literal["lm", "distill"] = "lm"
    """``lm``: next-token prediction; ``distill``: regress the targets of ``distill`` (HoVLE stage I)."""
    distill: DistillConfig | None = None
    """Teacher and loss of an ``objective: distill`` stage."""


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
    if m.views is not None:
        if not 1 <= m.views.grid <= 8:
            raise RecipeError(f"must be between 1 and 8 (sub-images per side), got {m.views.grid}",
                              "model.views.grid")
        if m.views.size <= 0:
            raise RecipeError(f"must be a positive number of pixels, got {m.views.size}", "model.views.size")
    m.encoders = [_complete(ENCODERS, e, f"model.encoders[{i}]") for i, e in enumerate(m.encoders)]
    holistic = _holistic_encoders(m.encoders)
    if holistic:
        if len(m.encoders) > 1:
            raise RecipeError("a holistic encoder embeds the whole sequence for the LLM, so it must be the only "
                              "encoder", "model.encoders")
        if m.fusion is not None:
            raise RecipeError("a holistic encoder feeds the LLM directly; set `fusion: null` (or leave it out)",
                              "model.fusion")
        if m.views is not None:
            raise RecipeError("multi-view images are not supported with a holistic encoder", "model.views")
    elif m.fusion is None:
        raise RecipeError("missing required key (only a holistic encoder goes without a fusion)", "model.fusion")
    else:
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
        train_name = recipe.data.train["name"]
        if stage.data and stage.data.get("name", train_name) != train_name:  # its own dataset replaces data.train
            stage.data = _complete(DATASETS, stage.data, f"{where}.data")
        elif stage.data:
            _complete(DATASETS, {**recipe.data.train, **stage.data}, f"{where}.data")
        _validate_objective(stage, where, bool(holistic), stage.data.get("name", train_name))


def _holistic_encoders(encoders: list[dict[str, Any]]) -> list[int]:
    """Indices of the encoder sections whose class declares the holistic interface (HoVLE)."""
    from vlkit.encoders.holistic import HolisticEncoder
    from vlkit.registry import ENCODERS

    return [i for i, e in enumerate(encoders) if issubclass(ENCODERS.get(e["name"]), HolisticEncoder)]


def _validate_objective(stage: StageConfig, where: str, holistic: bool, dataset: str) -> None:
    """A distillation stage: a holistic model, a distillation dataset and a complete ``distill`` section."""
    from vlkit.fusions.projector import check_projector
    from vlkit.registry import DATASETS, ENCODERS

    if stage.objective == "distill" and not holistic:
        raise RecipeError("distillation trains a holistic encoder (HoVLE stage I); this model has none",
                          f"{where}.objective")
    provides = getattr(DATASETS.get(dataset), "objective", "lm")
    if provides != stage.objective:
        need = "a distillation dataset (e.g. distill_images)" if stage.objective == "distill" else "conversations"
        raise RecipeError(f"dataset {dataset!r} gives {provides!r} batches but this stage's objective is "
                          f"{stage.objective!r}, which needs {need}", f"{where}.data")
    if stage.objective != "distill":
        if stage.distill is not None:
            raise RecipeError("only used by `objective: distill` stages", f"{where}.distill")
        return
    d = stage.distill
    if d is None:
        raise RecipeError("missing: `objective: distill` needs a `distill:` section (teacher, loss)",
                          f"{where}.distill")
    d.teacher = _complete(ENCODERS, d.teacher, f"{where}.distill.teacher")
    if _holistic_encoders([d.teacher]):
        raise RecipeError("the teacher must be a vision encoder, not a holistic one", f"{where}.distill.teacher")
    if d.projector is not None:
        check_projector(d.projector, f"{where}.distill.projector")
    elif d.projector_norm or d.projector_weights:
        raise RecipeError("`projector_norm` / `projector_weights` need a `projector`", f"{where}.distill.projector")
    for name in ("image_weight", "text_weight"):
        if getattr(d, name) < 0:
            raise RecipeError("must be 0 or more", f"{where}.distill.{name}")
    if d.image_weight == d.text_weight == 0:
        raise RecipeError("image_weight and text_weight are both 0: nothing to learn", f"{where}.distill")
