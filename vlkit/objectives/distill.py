"""``distill``: HoVLE stage I, distilling targets into a holistic encoder.

At image positions the targets are a frozen teacher vision encoder's tokens (optionally pixel-shuffled, and
projected to the LLM's width by a frozen projector); at text positions they are the LLM's own input
embeddings. The loss compares the holistic encoder's output with these targets per token (``cosine``:
1 - cosine similarity, ``mse``: mean squared error), weighted per modality. Only the encoder runs and
trains; the LLM is used as an embedding table. Validation runs on the distillation dataset's held-out part
and reports ``val/loss``, ``val/cos_image``, ``val/cos_text``. Recipe::

    - name: distill
      objective: distill
      trainable: [encoders]
      data: {name: distill_images, urls: ..., val_urls: ...}
      distill: {teacher: {name: clip, model: ViT-B-16}, projector: mlp2x_gelu, loss: cosine}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.constants import IMAGE_TOKEN_ID
from vlkit.encoders.holistic import pixel_shuffle
from vlkit.errors import CheckpointError, RecipeError
from vlkit.objectives.base import Objective
from vlkit.registry import ENCODERS, OBJECTIVES

if TYPE_CHECKING:
    from vlkit.model import VLM
    from vlkit.strategies.base import EmbeddingStrategy


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss ``(N,)`` between ``(N, C)`` predictions and targets: ``cosine`` (1 - cosine
    similarity) or ``mse`` (mean over channels). Zero exactly when the prediction equals the target."""
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if kind == "mse":
        return (pred - target).pow(2).mean(-1)
    raise ValueError(f"unknown distillation loss {kind!r} (cosine or mse)")


@dataclass
class DistillOutput:
    """The loss of one batch and its parts; cosine similarities as sums over tokens (for averaging)."""

    loss: torch.Tensor
    image_loss: torch.Tensor
    text_loss: torch.Tensor
    cos_image: float
    n_image: int
    cos_text: float
    n_text: int


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


@OBJECTIVES.register("distill")
class Distill(Objective):
    """A frozen teacher (+ projector) and the distillation loss of a holistic encoder.

    Lives in the training module (never in the VLM), so the model's checkpoints hold no teacher weights.
    Random-init teacher parts are drawn from ``seed`` (a fixed generator), so the targets are the same in
    every process and every rerun; the global random state is left untouched.
    """

    @dataclass
    class Args:
        """Targets of a distillation stage: a frozen teacher for the image positions, the LLM's input
        embeddings for the text positions; only the holistic encoder trains."""

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

    section: ClassVar[str] = "distill"
    data_kind: ClassVar[str] = "distill"
    data_description: ClassVar[str] = "a distillation dataset (e.g. distill_images)"
    validates_on_train_data: ClassVar[bool] = True
    needs_pixels: ClassVar[bool] = True
    progress_metrics: ClassVar[tuple[str, ...]] = ("val/loss", "val/cos_image", "val/cos_text")

    # ---------------------------------------------------------------------------------- recipe checks

    @classmethod
    def check_model(cls, strategy: type[EmbeddingStrategy], where: str) -> None:
        if not strategy.embeds_text:
            raise RecipeError("distillation trains a holistic encoder (HoVLE stage I); this model has none", where)

    @classmethod
    def complete_args(cls, args: Args, where: str) -> Args:
        from vlkit.fusions.projector import check_projector

        args.teacher = ENCODERS.complete(args.teacher, f"{where}.teacher")
        if getattr(ENCODERS.get(args.teacher["name"]), "embeds_sequence", False):
            raise RecipeError("the teacher must be a vision encoder, not a holistic one", f"{where}.teacher")
        if args.projector is not None:
            check_projector(args.projector, f"{where}.projector")
        elif args.projector_norm or args.projector_weights:
            raise RecipeError("`projector_norm` / `projector_weights` need a `projector`", f"{where}.projector")
        for name in ("image_weight", "text_weight"):
            if getattr(args, name) < 0:
                raise RecipeError("must be 0 or more", f"{where}.{name}")
        if args.image_weight == args.text_weight == 0:
            raise RecipeError("image_weight and text_weight are both 0: nothing to learn", where)
        return args

    # ------------------------------------------------------------------------------------------ build

    def __init__(self, args: Args, *, model: VLM, seed: int = 0, key: str = "distill", **context: Any) -> None:
        super().__init__(args, model=model, seed=seed, key=key, **context)
        where = key
        self.cfg = args
        if not model.strategy.embeds_text:
            raise RecipeError("distillation trains a holistic encoder; this model has none", where)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = ENCODERS.build(args.teacher, f"{where}.teacher")
            streams = list(teacher.stream_dims)
            stream = args.teacher_stream or (streams[0] if len(streams) == 1 else None)
            if stream not in teacher.stream_dims:
                raise RecipeError(f"pick one of the teacher's streams {streams}", f"{where}.teacher_stream")
            width = teacher.stream_dims[stream] * (4 if args.shuffle else 1)
            tokens = teacher.num_tokens // (4 if args.shuffle else 1)
            wanted = model.num_image_tokens
            if tokens != wanted and (_square(tokens) is None or _square(wanted) is None):
                raise RecipeError(f"the teacher gives {tokens} tokens per image, the holistic encoder {wanted}; "
                                  "they can only be pooled to match when both are square grids (keep_cls: false)",
                                  f"{where}.teacher")
            projector = _projector(args, width, model.llm.hidden_size, where)
        self.teacher = teacher
        self.stream = stream
        self.projector = projector if projector is not None else nn.Identity()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Distill:
        """The teacher and projector always stay in eval mode (no dropout, fixed statistics)."""
        return super().train(False)

    @torch.no_grad()
    def image_targets(self, pixel_values: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``(n, 3, S, S)`` pixels in [0, 1] -> targets ``(n, num_tokens, H)``: teacher tokens, pixel-shuffled
        if asked, average-pooled on their grid to ``num_tokens`` if the counts differ, projected."""
        tokens = self.teacher.encode(pixel_values)[self.stream]
        n, t, c = tokens.shape
        if self.cfg.shuffle:
            side = _square(t)
            if side is None or side % 2:
                raise ValueError(f"distill.shuffle needs an even square token grid; the teacher gives {t} tokens "
                                 "(drop its CLS token: keep_cls: false)")
            tokens = pixel_shuffle(tokens.reshape(n, side, side, c)).reshape(n, -1, 4 * c)
            t, c = tokens.shape[1], 4 * c
        if t != num_tokens:
            side, out = _square(t), _square(num_tokens)
            if side is None or out is None:
                raise ValueError(f"the teacher gives {t} tokens per image, the holistic encoder {num_tokens}; "
                                 "they can only be matched by pooling when both are square grids (drop the "
                                 "teacher's CLS token: keep_cls: false)")
            grid = tokens.transpose(1, 2).reshape(n, c, side, side)
            tokens = F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)
        return self.projector(tokens)

    def forward(self, model: VLM, batch: dict[str, Any]) -> DistillOutput:  # type: ignore[override]
        """The weighted loss of ``model``'s holistic encoder on a distillation batch (``input_ids`` with the
        image positions first, ``attention_mask``, ``pixel_values``)."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        pixels = batch.get("pixel_values")
        out = model.embed(input_ids, pixels, batch["attention_mask"])
        image_mask = input_ids == IMAGE_TOKEN_ID
        text_mask = mask & ~image_mask
        zero = out.new_zeros((), dtype=torch.float32)
        image_loss = text_loss = zero
        cos_image = cos_text = 0.0
        if image_mask.any():
            target = self.image_targets(pixels, model.num_image_tokens).reshape(-1, out.shape[-1])
            pred = out[image_mask]
            image_loss = distill_loss(pred, target, self.cfg.loss).mean()
            cos_image = float(F.cosine_similarity(pred.detach().float(), target.float(), dim=-1).sum())
        if text_mask.any():
            with torch.no_grad():
                target = model.llm.embed(input_ids[text_mask])
            pred = out[text_mask]
            text_loss = distill_loss(pred, target, self.cfg.loss).mean()
            cos_text = float(F.cosine_similarity(pred.detach().float(), target.float(), dim=-1).sum())
        loss = self.cfg.image_weight * image_loss + self.cfg.text_weight * text_loss
        return DistillOutput(loss, image_loss, text_loss, cos_image, int(image_mask.sum()), cos_text,
                             int(text_mask.sum()))


    # --------------------------------------------------------------------------- objective interface

    def training_step(self, model: VLM, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self(model, batch)
        return out.loss, {"image_loss": out.image_loss.detach(), "text_loss": out.text_loss.detach()}

    def reset_validation(self) -> None:
        self._loss = [0.0, 0]  # loss summed over samples, samples
        self._cos = [0.0, 0, 0.0, 0]  # cosine sum and count, image then text

    def validation_step(self, model: VLM, batch: dict[str, Any]) -> None:
        out = self(model, batch)
        n = batch["input_ids"].shape[0]
        self._loss[0] += float(out.loss) * n
        self._loss[1] += n
        for i, value in enumerate((out.cos_image, out.n_image, out.cos_text, out.n_text)):
            self._cos[i] += value

    def validation_state(self) -> Any:
        return self._loss, self._cos

    def validation_metrics(self, states: list[Any]) -> dict[str, float]:
        loss_sum, loss_n, cos = 0.0, 0, [0.0, 0, 0.0, 0]
        for (lsum, ln), part in states:
            loss_sum, loss_n = loss_sum + lsum, loss_n + ln
            cos = [a + b for a, b in zip(cos, part)]
        metrics: dict[str, float] = {}
        if loss_n:
            metrics["val/loss"] = loss_sum / loss_n
        if cos[1]:
            metrics["val/cos_image"] = cos[0] / cos[1]
        if cos[3]:
            metrics["val/cos_text"] = cos[2] / cos[3]
        return metrics


def _projector(cfg: Distill.Args, in_dim: int, out_dim: int, where: str) -> nn.Module | None:
    from vlkit.fusions.projector import build_projector

    if cfg.projector is None:
        if in_dim != out_dim:
            raise RecipeError(f"the teacher's tokens are {in_dim} wide but the LLM's hidden size is {out_dim}; "
                              "add a `projector` (e.g. mlp2x_gelu) to map them", f"{where}.projector")
        return None
    proj = build_projector(cfg.projector, in_dim, out_dim, key=f"{where}.projector")
    layers = list(proj) if isinstance(proj, nn.Sequential) else [proj]
    projector = nn.Sequential(*([nn.LayerNorm(in_dim)] if cfg.projector_norm else []), *layers)
    if cfg.projector_weights is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(cfg.projector_weights)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{where}.projector_weights: cannot read {cfg.projector_weights}: {exc}") from exc
        prefix = cfg.projector_prefix
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = projector.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{where}.projector_weights: {cfg.projector_weights} (prefix {prefix!r}) does "
                                  f"not fit a {cfg.projector} projector{' with LayerNorm' if cfg.projector_norm else ''}"
                                  f" from {in_dim} to {out_dim}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return projector
