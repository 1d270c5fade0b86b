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
from vlkit.strategies.base import EmbeddingStrategy, run_frozen_without_grad, trains_any, with_zero_weight

if TYPE_CHECKING:
    from vlkit.config import ModelConfig
    from vlkit.llms.base import LLM
    from vlkit.model import VLM


def _declares(cls: type) -> bool:
    return bool(getattr(cls, "embeds_sequence", False))


class HolisticStrategy(EmbeddingStrategy):
    """The encoder's :meth:`embed_sequence` gives every position's embedding; generation embeds each new
    token with it too (against the encoder's key/value cache)."""

    name: ClassVar[str] = "holistic"
    priority: ClassVar[int] = 100
    uses_fusion: ClassVar[bool] = False
    embeds_text: ClassVar[bool] = True
    cache_refusal: ClassVar[str | None] = (
        "the feature cache serves vision encoders whose output depends only on the image; a holistic encoder "
        "embeds the text too, so it cannot be cached (remove data.feature_cache)")
    packing_refusal: ClassVar[str | None] = (
        "a holistic encoder (HoVLE) runs its own attention blocks over the whole row, with its own padding mask "
        "and rotary positions, so samples packed into one row would attend to each other inside it; remove "
        "`packing` (batches are padded)")

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
            if (pixel_values is None or pixel_values.shape[0] == 0) and trains_any(model, [encoder]):
                # a text-only batch leaves the image path (patch embedding, ...) out: one blank image, weight 0
                blank = embeds.new_zeros(1, 3, encoder.image_size, encoder.image_size, dtype=torch.float32)
                embeds = with_zero_weight(embeds, encoder.encode(blank)["tokens"])
        return embeds.to(model.llm.model.get_input_embeddings().weight.dtype)

    def generate(self, model: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Decoding through the holistic encoder: every new token is embedded by the encoder (not the LLM's
        table). The encoder and the LLM each keep a key/value cache, so a step runs only the new token
        through the encoder's blocks and the LLM (by causality the earlier positions' embeddings do not
        change: the tokens are those of re-embedding the whole sequence every step).

        Greedy, or sampling with ``do_sample``/``temperature``/``top_k``/``top_p`` as transformers'
        ``generate`` does it (its logits warpers, one ``torch.multinomial`` draw per step); its
        ``stopping_criteria`` and ``streamer`` work too. Beam search is refused. Returns the new token ids."""
        unknown = set(kwargs) - _GENERATE_KWARGS
        if unknown:
            raise ValueError(f"generation with a holistic encoder does not take {sorted(unknown)} (it takes "
                             f"{sorted(_GENERATE_KWARGS)})")
        if (kwargs.get("num_beams") or 1) != 1:
            raise ValueError("generation with a holistic encoder does not support beam search (num_beams > 1); "
                             "decode greedily or sample")
        sample = bool(kwargs.get("do_sample"))
        warpers = logits_warpers(kwargs) if sample else None
        stopping, streamer = kwargs.get("stopping_criteria"), kwargs.get("streamer")
        llm, encoder = model.llm, self.encoder(model)
        dtype = llm.model.get_input_embeddings().weight.dtype
        stop = torch.tensor(llm.template.stop_token_ids(llm.tokenizer), device=input_ids.device)
        pad = llm.tokenizer.pad_token_id or 0
        mask = attention_mask.long()
        cache = encoder.new_cache()
        generated = input_ids.new_zeros(input_ids.shape[0], 0)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if streamer is not None:
            streamer.put(generated.cpu())  # the (empty) prompt, as transformers' generate with inputs_embeds
        with torch.no_grad():
            new = encoder.embed_sequence(input_ids, pixel_values, mask, cache=cache).to(dtype)
            past = None
            for step in range(max_new_tokens):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
                out = llm.model(inputs_embeds=new, attention_mask=mask, position_ids=positions,
                                past_key_values=past, use_cache=True)
                past = out.past_key_values
                scores = out.logits[:, -1].float()
                if warpers is not None:
                    scores = warpers(generated, scores)
                    token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
                else:
                    token = scores.argmax(-1)
                token = token.masked_fill(finished, pad)
                generated = torch.cat([generated, token[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(token.cpu())
                finished |= torch.isin(token, stop)
                if stopping is not None:
                    finished |= stopping(generated, scores)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                new = encoder.embed_sequence(token[:, None], None, mask, cache=cache).to(dtype)
        if streamer is not None:
            streamer.end()
        return generated


_GENERATE_KWARGS = {"do_sample", "num_beams", "temperature", "top_k", "top_p", "stopping_criteria", "streamer"}


def logits_warpers(kwargs: dict[str, Any]) -> Any:
    """transformers' sampling warpers for ``temperature``/``top_k``/``top_p``, in the order its ``generate``
    applies them (a ``LogitsProcessorList``; ``top_k`` 0 or None and ``top_p`` 1 are off)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    temperature = kwargs.get("temperature")
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if kwargs.get("top_k"):
        warpers.append(TopKLogitsWarper(kwargs["top_k"]))
    if kwargs.get("top_p") is not None and kwargs["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(kwargs["top_p"]))
    return warpers
