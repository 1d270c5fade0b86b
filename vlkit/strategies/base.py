"""The embedding-strategy interface: what the model, generation, the feature cache and freezing ask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from vlkit.config import ModelConfig
    from vlkit.fusions.base import Fusion
    from vlkit.llms.base import LLM
    from vlkit.model import VLM


class EmbeddingStrategy:
    """How ``(input_ids, images)`` become the LLM's ``inputs_embeds``. Stateless: one instance per model,
    every method takes the model. Subclasses live one per module in :mod:`vlkit.strategies`."""

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    """Strategies are tried highest first; the first whose :meth:`matches` accepts the parts is used."""
    uses_fusion: ClassVar[bool] = True
    """Whether the recipe needs a ``fusion`` section."""
    embeds_text: ClassVar[bool] = False
    """Whether a trainable module (not the LLM's table) embeds the text positions too (HoVLE)."""
    cache_refusal: ClassVar[str | None] = None
    """Why this strategy's image features cannot be cached (None: the encoders' streams depend on the
    image only, so the feature cache serves them)."""
    packing_refusal: ClassVar[str | None] = None
    """Why this strategy cannot train on packed batches (``data.train.packing``; None: it can, because only
    the LLM sees the whole row, which keeps attention within each sample from the position ids)."""

    # ------------------------------------------------------------------------------------- selection

    @classmethod
    def matches(cls, encoder_classes: Sequence[type]) -> bool:
        """Whether a model with encoders of these classes uses this strategy (from declared attributes)."""
        raise NotImplementedError

    @classmethod
    def check_model(cls, model: ModelConfig, where: str = "model") -> None:
        """Recipe-time checks of the ``model`` section (before any weight loads); raise RecipeError."""

    @classmethod
    def build_fusion(cls, encoders: dict[str, nn.Module], llm: LLM, section: dict[str, Any] | None) -> Fusion | None:
        """The fusion for these parts (None without one); also binds parts to each other where needed."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ model

    def num_image_tokens(self, model: VLM) -> int:
        """``<image>`` positions per image in the LLM's sequence."""
        raise NotImplementedError

    def bypassed_parameters(self, model: VLM) -> list[nn.Parameter]:
        """Parameters outside the forward pass (kept frozen whatever a stage trains)."""
        return []

    def embed(self, model: VLM, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None,
              image_streams: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(B, L)`` ids + images -> ``(B, L, H)`` LLM input embeddings."""
        raise NotImplementedError

    def generate(self, model: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """New token ids ``(B, T)`` continuing a left-padded prompt batch."""
        embeds = self.embed(model, input_ids, pixel_values, attention_mask)
        return model.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens, **kwargs)


def run_frozen_without_grad(module: nn.Module):
    """Autograd off for ``module``'s forward when all its parameters are frozen (a context manager)."""
    frozen = not any(p.requires_grad for p in module.parameters())
    return torch.set_grad_enabled(torch.is_grad_enabled() and not frozen)


def trains_any(model: nn.Module, modules: Sequence[nn.Module | None]) -> bool:
    """Whether ``model`` is training with autograd on and some parameter of ``modules`` requires grad."""
    return model.training and torch.is_grad_enabled() and any(
        p.requires_grad for m in modules if m is not None for p in m.parameters())


def with_zero_weight(embeds: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``embeds`` unchanged in value but depending on ``tensor`` with weight 0, so every trainable parameter
    behind ``tensor`` gets a (zero) gradient.

    For text-only batches in training: data parallelism (DDP) needs every trainable parameter used on every
    rank at every step, and a rank whose batch has no image would otherwise leave the vision path out (the
    step fails or hangs); a sharded strategy also gathers those parameters in the forward on every rank.
    Summed in fp32: an fp16 sum of many values can overflow, and 0 * inf is NaN."""
    return embeds + tensor.float().sum().mul(0).to(embeds.dtype)


__all__ = ["EmbeddingStrategy", "run_frozen_without_grad", "trains_any", "with_zero_weight"]
