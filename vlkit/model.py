"""The VLM: vision encoders -> fusion -> LLM, with visual tokens spliced at the ``<image>`` positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlkit.config import Recipe, ViewsConfig
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message, TrainOn
from vlkit.data.processor import VLMProcessor
from vlkit.data.views import num_views, split_views
from vlkit.encoders.base import VisionEncoder
from vlkit.encoders.holistic import HolisticEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.fusions.base import Fusion
from vlkit.llms.base import LLM


class VLM(nn.Module):
    """A vision-language model assembled from parts.

    ``encoders`` maps each encoder's key (its recipe ``key:``, default its registered name) to the encoder;
    their streams reach the fusion as ``"<key>.<stream>"``. Each image becomes ``fusion.num_tokens`` visual
    tokens, written into the LLM's input embeddings where ``input_ids == IMAGE_TOKEN_ID``.

    With ``views`` (SPHINX-1k sub-images), each image is split into a global view plus ``grid x grid``
    sub-images that are encoded and fused separately; the image then takes ``(1 + grid**2) *
    fusion.num_tokens`` visual tokens, the views' tokens in order (global first).

    With a :class:`~vlkit.encoders.holistic.HolisticEncoder` (HoVLE; the only encoder, ``fusion`` None)
    the encoder embeds the whole sequence, text included, and its output is the LLM's ``inputs_embeds``
    (the LLM's own input embedding table is bypassed).
    """

    def __init__(self, encoders: dict[str, VisionEncoder], fusion: Fusion | None, llm: LLM,
                 views: ViewsConfig | None = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.llm = llm
        self.views = views

    # ------------------------------------------------------------------------------------------- shape

    @property
    def num_views(self) -> int:
        """Views encoded per image: 1, or ``1 + grid**2`` with ``views``."""
        return 1 if self.views is None else num_views(self.views.grid)

    @property
    def holistic(self) -> HolisticEncoder | None:
        """The encoder that embeds the whole sequence (HoVLE), if this model has one."""
        encoders = list(self.encoders.values())
        return encoders[0] if len(encoders) == 1 and isinstance(encoders[0], HolisticEncoder) else None

    def bypassed_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the forward pass (kept frozen whatever a stage trains): with a holistic
        encoder, the LLM's input embedding table, unless it is tied to the output head."""
        if self.holistic is None:
            return []
        table = self.llm.model.get_input_embeddings().weight
        head = self.llm.model.get_output_embeddings()
        return [] if head is not None and head.weight is table else [table]

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the fusion's tokens per view times the views per image (a holistic
        encoder's ``num_tokens``)."""
        if self.holistic is not None:
            return self.holistic.num_tokens
        return self.num_views * self.fusion.num_tokens

    @property
    def image_size(self) -> int:
        """Size at which the data pipeline delivers images: ``grid * size`` with views, otherwise the
        largest encoder input (each encoder resizes to its own)."""
        if self.views is not None:
            return self.views.grid * self.views.size
        return max(e.image_size for e in self.encoders.values())

    def processor(self, max_length: int = 512, train_on: TrainOn = "assistant") -> VLMProcessor:
        """A processor that tokenizes conversations and images for this model."""
        pad = None if self.views is None or self.views.pad == "none" else self.views.pad
        return VLMProcessor(self.llm.tokenizer, self.llm.template, self.num_image_tokens, self.image_size,
                            max_length=max_length, train_on=train_on, pad=pad)

    # ----------------------------------------------------------------------------------------- forward

    def image_streams(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(n_images, 3, S, S)`` pixels in [0, 1] -> every encoder's streams ``{"<key>.<stream>": (n_images *
        views, N, C)}`` (with ``views``, the rows of image ``b`` are ``b * views ... (b + 1) * views - 1``).

        An encoder whose parameters are all frozen runs without autograd; a trainable one gets gradients.
        """
        if self.views is not None:
            pixel_values = split_views(pixel_values, self.views.grid, self.views.size)
        streams: dict[str, torch.Tensor] = {}
        for key, encoder in self.encoders.items():
            frozen = not any(p.requires_grad for p in encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                for name, tensor in encoder.encode(pixel_values).items():
                    streams[f"{key}.{name}"] = tensor
        return streams

    def fuse(self, streams: dict[str, torch.Tensor], n_images: int) -> torch.Tensor:
        """Streams of ``n_images`` images (as :meth:`image_streams` returns them) -> visual tokens
        ``(n_images, T, H)``; with ``views``, each image's views' tokens are concatenated (global first)."""
        tokens = self.fusion(streams)
        return tokens.reshape(n_images, -1, tokens.shape[-1]) if self.views is not None else tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(n_images, 3, S, S)`` pixels in [0, 1] -> visual tokens ``(n_images, T, H)``."""
        return self.fuse(self.image_streams(pixel_values), pixel_values.shape[0])

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None,
              image_streams: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """LLM input embeddings with visual tokens written at the image-token positions (with a holistic
        encoder: its output for every position; ``attention_mask`` marks the real tokens).

        ``image_streams`` (``{"<key>.<stream>": (n_images, views, N, C)}``, from the feature cache) replace
        ``pixel_values``: the encoders do not run.
        """
        holistic = self.holistic
        if holistic is not None:
            frozen = not any(p.requires_grad for p in holistic.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                embeds = holistic.embed_sequence(input_ids, pixel_values, attention_mask)
            return embeds.to(self.llm.model.get_input_embeddings().weight.dtype)
        image_mask = input_ids == IMAGE_TOKEN_ID
        pad = self.llm.tokenizer.pad_token_id or 0
        embeds = self.llm.embed(input_ids.masked_fill(image_mask, pad))
        n_slots = int(image_mask.sum())
        if image_streams:
            n_images = next(iter(image_streams.values())).shape[0]
            visual = self.fuse({k: v.to(embeds.device).flatten(0, 1) for k, v in image_streams.items()}, n_images)
        elif pixel_values is not None and pixel_values.shape[0] > 0:
            visual = self.encode_images(pixel_values.to(embeds.device))
        elif n_slots:
            raise ValueError(f"input_ids hold {n_slots} image-token positions but no pixel_values were given")
        else:
            return embeds
        visual = visual.to(embeds.dtype)
        if visual.shape[0] * visual.shape[1] != n_slots:
            raise ValueError(
                f"{visual.shape[0]} image(s) x {visual.shape[1]} visual tokens do not fill the {n_slots} "
                "image-token positions in input_ids; tokenize with this model's processor()"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_streams: dict[str, torch.Tensor] | None = None, **_: Any):
        """Causal-LM output (``.loss`` when ``labels`` are given, ``.logits``). Extra batch keys are ignored.
        ``image_streams`` (cached encoder streams) replace ``pixel_values``; see :meth:`embed`."""
        embeds = self.embed(input_ids, pixel_values, attention_mask, image_streams)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Decoded continuations of a left-padded prompt batch (special tokens stripped)."""
        if self.holistic is not None:
            out = self._generate_holistic(input_ids, attention_mask, pixel_values, max_new_tokens, **kwargs)
            return [s.strip() for s in self.llm.tokenizer.batch_decode(out, skip_special_tokens=True)]
        embeds = self.embed(input_ids, pixel_values)
        out = self.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
        return [s.strip() for s in self.llm.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _generate_holistic(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           pixel_values: torch.Tensor | None, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy decoding through the holistic encoder: every new token is embedded by the encoder (not the
        LLM's table), so the encoder reruns on the grown sequence (by causality the earlier positions'
        embeddings do not change, so the LLM's key/value cache stays valid). Returns the new token ids."""
        if kwargs.get("do_sample") or kwargs.get("num_beams", 1) != 1:
            raise ValueError("generation with a holistic encoder is greedy only (do_sample and beam search are "
                             "not supported)")
        holistic = self.holistic
        assert holistic is not None
        stop = torch.tensor(self.llm.template.stop_token_ids(self.llm.tokenizer), device=input_ids.device)
        pad = self.llm.tokenizer.pad_token_id or 0
        mask = attention_mask.long()
        embeds = self.embed(input_ids, pixel_values, mask)
        new = embeds
        past = None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
            out = self.llm.model(inputs_embeds=new, attention_mask=mask, position_ids=positions,
                                 past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1).masked_fill(finished, pad)
            tokens.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = self.embed(input_ids, pixel_values, mask)[:, -1:]
        if not tokens:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(tokens, dim=1)

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
        key = section.get("key") or section["name"].rpartition(":")[2]  # `pkg.mod:Class` -> `Class`
        if key in encoders:
            raise RecipeError(f"two encoders share the key {key!r}; give each a distinct `key:`",
                              f"model.encoders[{i}].key")
        encoders[key] = ENCODERS.build(section, f"model.encoders[{i}]")
    llm = LLMS.build(recipe.model.llm, "model.llm")
    holistic = [(i, enc) for i, enc in enumerate(encoders.values()) if isinstance(enc, HolisticEncoder)]
    if holistic:  # HoVLE: the encoder embeds the whole sequence for the LLM; no fusion
        i, encoder = holistic[0]
        if encoder.width != llm.hidden_size:
            raise RecipeError(f"the holistic encoder's output is the LLM's input, so its width ({encoder.width}) "
                              f"must equal the LLM's hidden size ({llm.hidden_size})", f"model.encoders[{i}].width")
        encoder.bind_llm(llm.model.get_input_embeddings())
        return VLM(encoders, None, llm, views=recipe.model.views)
    streams = {f"{key}.{name}": (enc.num_tokens, dim)
               for key, enc in encoders.items() for name, dim in enc.stream_dims.items()}
    fusion = FUSIONS.build(recipe.model.fusion, "model.fusion", streams=streams, hidden_size=llm.hidden_size)
    return VLM(encoders, fusion, llm, views=recipe.model.views)
