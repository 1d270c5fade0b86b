"""``splice``: encoders -> fusion -> visual tokens written at the ``<image>`` positions (LLaVA, Florence-VL,
SPHINX). The fallback strategy: any vision encoders with a fusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlkit.constants import IMAGE_TOKEN_ID
from vlkit.errors import RecipeError
from vlkit.strategies.base import EmbeddingStrategy, trains_any, with_zero_weight

if TYPE_CHECKING:
    from vlkit.config import ModelConfig
    from vlkit.fusions.base import Fusion
    from vlkit.llms.base import LLM
    from vlkit.model import VLM


class SpliceStrategy(EmbeddingStrategy):
    """The LLM embeds the text; the fusion's visual tokens replace the image positions. With ``views``
    each image takes ``views * fusion.num_tokens`` positions; cached ``image_streams`` skip the encoders."""

    name: ClassVar[str] = "splice"
    priority: ClassVar[int] = -1000  # the fallback: tried last

    @classmethod
    def matches(cls, encoder_classes: Sequence[type]) -> bool:
        return True

    @classmethod
    def check_model(cls, model: ModelConfig, where: str = "model") -> None:
        if model.fusion is None:
            raise RecipeError("missing required key (only a holistic encoder goes without a fusion)",
                              f"{where}.fusion")

    @classmethod
    def build_fusion(cls, encoders: dict[str, nn.Module], llm: LLM, section: dict[str, Any] | None) -> Fusion:
        from vlkit.registry import FUSIONS

        streams = {f"{key}.{name}": (enc.num_tokens, dim)
                   for key, enc in encoders.items() for name, dim in enc.stream_dims.items()}
        return FUSIONS.build(section, "model.fusion", streams=streams, hidden_size=llm.hidden_size)

    def num_image_tokens(self, model: VLM) -> int:
        return model.num_views * model.fusion.num_tokens

    def embed(self, model: VLM, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None,
              image_streams: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        image_mask = input_ids == IMAGE_TOKEN_ID
        pad = model.llm.tokenizer.pad_token_id or 0
        embeds = model.llm.embed(input_ids.masked_fill(image_mask, pad))
        n_slots = int(image_mask.sum())
        if image_streams:
            n_images = next(iter(image_streams.values())).shape[0]
            visual = model.fuse({k: v.to(embeds.device).flatten(0, 1) for k, v in image_streams.items()}, n_images)
        elif pixel_values is not None and pixel_values.shape[0] > 0:
            visual = model.encode_images(pixel_values.to(embeds.device))
        elif n_slots:
            raise ValueError(f"input_ids hold {n_slots} image-token positions but no pixel_values were given")
        elif trains_any(model, [*model.encoders.values(), model.fusion]):
            # a text-only batch while the vision path trains: one blank image through it, with weight 0
            blank = embeds.new_zeros(1, 3, model.image_size, model.image_size, dtype=torch.float32)
            return with_zero_weight(embeds, model.encode_images(blank))
        else:
            return embeds
        visual = visual.to(embeds.dtype)
        if visual.shape[0] * visual.shape[1] != n_slots:
            raise ValueError(
                f"{visual.shape[0]} image(s) x {visual.shape[1]} visual tokens do not fill the {n_slots} "
                "image-token positions in input_ids; tokenize with this model's processor()"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
