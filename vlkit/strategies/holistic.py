"""``holistic``: one module embeds the whole interleaved sequence, text included (HoVLE).

Chosen when the model's encoder declares ``embeds_sequence = True`` (the interface of
:class:`vlkit.encoders.holistic.HolisticEncoder`: ``embed_sequence``, ``bind_llm``, ``width``, ``num_tokens``).
Its output is the LLM's whole ``inputs_embeds``: there is no fusion and the LLM's input table is bypassed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlkit.errors import RecipeError
from vlkit.strategies.base import EmbeddingStrategy, run_frozen_without_grad

if TYPE_CHECKING:
    from vlkit.config import ModelConfig
    from vlkit.llms.base import LLM
    from vlkit.model import VLM


def _declares(cls: type) -> bool:
    return bool(getattr(cls, "embeds_sequence", False))


class HolisticStrategy(EmbeddingStrategy):
    """The encoder's :meth:`embed_sequence` gives every position's embedding; generation embeds each new
    token with it too (greedy only)."""

    name: ClassVar[str] = "holistic"
    priority: ClassVar[int] = 100
    uses_fusion: ClassVar[bool] = False
    embeds_text: ClassVar[bool] = True
    cache_refusal: ClassVar[str | None] = (
        "the feature cache serves vision encoders whose output depends only on the image; a holistic encoder "
        "embeds the text too, so it cannot be cached (remove data.feature_cache)")

    @classmethod
    def matches(cls, encoder_classes: Sequence[type]) -> bool:
        return any(_declares(c) for c in encoder_classes)

    @classmethod
    def check_model(cls, model: ModelConfig, where: str = "model") -> None:
        if len(model.encoders) > 1:
            raise RecipeError("a holistic encoder embeds the whole sequence for the LLM, so it must be the only "
                              "encoder", f"{where}.encoders")
        if model.fusion is not None:
            raise RecipeError("a holistic encoder feeds the LLM directly; set `fusion: null` (or leave it out)",
                              f"{where}.fusion")
        if model.views is not None:
            raise RecipeError("multi-view images are not supported with a holistic encoder", f"{where}.views")

    @classmethod
    def build_fusion(cls, encoders: dict[str, nn.Module], llm: LLM, section: dict[str, Any] | None) -> None:
        (encoder,) = encoders.values()
        if encoder.width != llm.hidden_size:
            raise RecipeError(f"the holistic encoder's output is the LLM's input, so its width ({encoder.width}) "
                              f"must equal the LLM's hidden size ({llm.hidden_size})", "model.encoders[0].width")
        encoder.bind_llm(llm.model.get_input_embeddings())
        return None

    @staticmethod
    def encoder(model: VLM) -> nn.Module:
        """The model's (only) encoder, the one that embeds the sequence."""
        return next(iter(model.encoders.values()))

    def num_image_tokens(self, model: VLM) -> int:
        return self.encoder(model).num_tokens

    def bypassed_parameters(self, model: VLM) -> list[nn.Parameter]:
        """The LLM's input embedding table, unless it is tied to the output head."""
        table = model.llm.model.get_input_embeddings().weight
        head = model.llm.model.get_output_embeddings()
        return [] if head is not None and head.weight is table else [table]

    def embed(self, model: VLM, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None,
              image_streams: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if image_streams:
            raise ValueError(self.cache_refusal)
        encoder = self.encoder(model)
        with run_frozen_without_grad(encoder):
            embeds = encoder.embed_sequence(input_ids, pixel_values, attention_mask)
        return embeds.to(model.llm.model.get_input_embeddings().weight.dtype)

    def generate(self, model: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy decoding through the holistic encoder: every new token is embedded by the encoder (not the
        LLM's table), so the encoder reruns on the grown sequence (by causality the earlier positions'
        embeddings do not change, so the LLM's key/value cache stays valid). Returns the new token ids."""
        if kwargs.get("do_sample") or kwargs.get("num_beams", 1) != 1:
            raise ValueError("generation with a holistic encoder is greedy only (do_sample and beam search are "
                             "not supported)")
        llm = model.llm
        stop = torch.tensor(llm.template.stop_token_ids(llm.tokenizer), device=input_ids.device)
        pad = llm.tokenizer.pad_token_id or 0
        mask = attention_mask.long()
        new = self.embed(model, input_ids, pixel_values, mask)
        past = None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
            out = llm.model(inputs_embeds=new, attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1).masked_fill(finished, pad)
            tokens.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = self.embed(model, input_ids, pixel_values, mask)[:, -1:]
        if not tokens:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(tokens, dim=1)
