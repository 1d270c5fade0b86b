"""The VLM: vision encoders -> fusion -> LLM, with visual tokens spliced at the ``<image>`` positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlkit.config import Recipe
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message, TrainOn
from vlkit.data.processor import VLMProcessor
from vlkit.encoders.base import VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.fusions.base import Fusion
from vlkit.llms.base import LLM


class VLM(nn.Module):
    """A vision-language model assembled from parts.

    ``encoders`` maps each encoder's key (its recipe ``key:``, default its registered name) to the encoder;
    their streams reach the fusion as ``"<key>.<stream>"``. Each image becomes ``fusion.num_tokens`` visual
    tokens, written into the LLM's input embeddings where ``input_ids == IMAGE_TOKEN_ID``.
    """

    def __init__(self, encoders: dict[str, VisionEncoder], fusion: Fusion, llm: LLM) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.llm = llm

    # ------------------------------------------------------------------------------------------- shape

    @property
    def num_image_tokens(self) -> int:
        return self.fusion.num_tokens

    @property
    def image_size(self) -> int:
        """Size at which the data pipeline delivers images (the largest encoder input; each resizes)."""
        return max(e.image_size for e in self.encoders.values())

    def processor(self, max_length: int = 512, train_on: TrainOn = "assistant") -> VLMProcessor:
        """A processor that tokenizes conversations and images for this model."""
        return VLMProcessor(self.llm.tokenizer, self.llm.template, self.num_image_tokens, self.image_size,
                            max_length=max_length, train_on=train_on)

    # ----------------------------------------------------------------------------------------- forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(n_images, 3, S, S)`` pixels in [0, 1] -> visual tokens ``(n_images, T, H)``.

        An encoder whose parameters are all frozen runs without autograd; a trainable one gets gradients.
        """
        streams: dict[str, torch.Tensor] = {}
        for key, encoder in self.encoders.items():
            frozen = not any(p.requires_grad for p in encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                for name, tensor in encoder.encode(pixel_values).items():
                    streams[f"{key}.{name}"] = tensor
        return self.fusion(streams)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """LLM input embeddings with visual tokens written at the image-token positions."""
        image_mask = input_ids == IMAGE_TOKEN_ID
        pad = self.llm.tokenizer.pad_token_id or 0
        embeds = self.llm.embed(input_ids.masked_fill(image_mask, pad))
        n_slots = int(image_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image-token positions but no pixel_values were given")
            return embeds
        visual = self.encode_images(pixel_values.to(embeds.device)).to(embeds.dtype)
        if visual.shape[0] * visual.shape[1] != n_slots:
            raise ValueError(
                f"{visual.shape[0]} image(s) x {visual.shape[1]} visual tokens do not fill the {n_slots} "
                "image-token positions in input_ids; tokenize with this model's processor()"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: Any):
        """Causal-LM output (``.loss`` when ``labels`` are given, ``.logits``). Extra batch keys are ignored."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Decoded continuations of a left-padded prompt batch (special tokens stripped)."""
        embeds = self.embed(input_ids, pixel_values)
        out = self.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
        return [s.strip() for s in self.llm.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def answer(self, images: Sequence[Image.Image | None], questions: Sequence[str],
               max_new_tokens: int = 32) -> list[str]:
        """Answer one question per image (``None`` for a text-only question)."""
        proc = self.processor(max_length=1 << 20)
        features = [proc.prompt_features([Message("user", q)], img) for img, q in zip(images, questions)]
        batch = proc.collate(features, padding_side="left")
        device = next(self.parameters()).device
        pixels = batch["pixel_values"]
        return self.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             None if pixels is None else pixels.to(device), max_new_tokens=max_new_tokens)

    # ----------------------------------------------------------------------------------------- weights

    def load_weights(self, path: str | Path, strict: bool = True) -> None:
        """Load a ``model.safetensors`` written by vlkit (a file, or a folder that contains one)."""
        from vlkit.training.checkpoint import read_weights

        state = read_weights(path)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"{path} does not match this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Was it saved from another recipe?"
            )


def build_model(recipe: Recipe) -> VLM:
    """Build the VLM a validated recipe describes (this is where weights are loaded)."""
    from vlkit.registry import ENCODERS, FUSIONS, LLMS

    encoders: dict[str, VisionEncoder] = {}
    for i, section in enumerate(recipe.model.encoders):
        key = section.get("key") or section["name"]
        if key in encoders:
            raise RecipeError(f"two encoders share the key {key!r}; give each a distinct `key:`",
                              f"model.encoders[{i}].key")
        encoders[key] = ENCODERS.build(section, f"model.encoders[{i}]")
    llm = LLMS.build(recipe.model.llm, "model.llm")
    streams = {f"{key}.{name}": (enc.num_tokens, dim)
               for key, enc in encoders.items() for name, dim in enc.stream_dims.items()}
    fusion = FUSIONS.build(recipe.model.fusion, "model.fusion", streams=streams, hidden_size=llm.hidden_size)
    return VLM(encoders, fusion, llm)
