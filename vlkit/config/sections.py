"""The recipe's sections as dataclasses: what a recipe may say and its defaults (loading and validation live in
:mod:`vlkit.config.loading` and :mod:`vlkit.config.validation`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


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
