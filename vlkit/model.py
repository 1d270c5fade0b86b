"""The VLM: vision encoders (+ fusion) -> LLM; how images enter the LLM's input is its embedding strategy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlkit.config import Recipe, ViewsConfig
from vlkit.data.conversation import Message, TrainOn
from vlkit.data.processor import VLMProcessor
from vlkit.data.views import ResizePolicy, num_views, resize_settings, split_views
from vlkit.encoders.base import VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.fusions.base import Fusion
from vlkit.llms.base import LLM
from vlkit.strategies import strategy_for
from vlkit.strategies.base import EmbeddingStrategy, run_frozen_without_grad
from vlkit.weights import read_weights


class VLM(nn.Module):
    """A vision-language model assembled from parts.

    ``encoders`` maps each encoder's key (its recipe ``key:``, default its registered name) to the encoder;
    their streams reach the fusion as ``"<key>.<stream>"``. Each image becomes ``fusion.num_tokens`` visual
    tokens, written into the LLM's input embeddings where ``input_ids == IMAGE_TOKEN_ID``.

    With ``views`` (SPHINX-1k sub-images), each image is split into a global view plus ``grid x grid``
    sub-images that are encoded and fused separately; the image then takes ``(1 + grid**2) *
    fusion.num_tokens`` visual tokens, the views' tokens in order (global first).

    How token ids and images become the LLM's ``inputs_embeds`` is the model's :attr:`strategy`, picked from
    the parts' declared interfaces (:mod:`vlkit.strategies`): ``splice`` (the above) or ``holistic`` (an
    encoder declaring ``embeds_sequence``, HoVLE: it embeds the whole sequence, text included; ``fusion``
    None, the LLM's own input embedding table bypassed).

    In train mode, every submodule whose parameters are all frozen runs in eval mode (no dropout or
    drop-path, fixed batch-norm statistics), so frozen parts compute what they compute at inference and in
    the feature cache; see :meth:`train`.
    """

    def __init__(self, encoders: dict[str, VisionEncoder], fusion: Fusion | None, llm: LLM,
                 views: ViewsConfig | None = None, resize_policy: ResizePolicy | None = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.llm = llm
        self.views = views
        self.resize_policy = resize_policy
        """How the data pipeline squares non-square images (None: pad with views, else resize)."""
        self.strategy: EmbeddingStrategy = strategy_for([type(e) for e in encoders.values()])()
        """How ``(input_ids, images)`` become the LLM's input embeddings."""

    def train(self, mode: bool = True) -> VLM:
        """Train mode for the parts that train; eval mode for every submodule whose parameters are all
        frozen (outermost ones), so that dropout, drop-path and batch-norm statistics of frozen parts stay
        off. Re-applied whenever the mode is set (Lightning sets it at fit start and restores it after
        validation), so it follows the current stage's freezing."""
        super().train(mode)
        if mode:
            for module in frozen_modules(self):
                module.eval()
        return self

    # ------------------------------------------------------------------------------------------- shape

    @property
    def num_views(self) -> int:
        """Views encoded per image: 1, or ``1 + grid**2`` with ``views``."""
        return 1 if self.views is None else num_views(self.views.grid)

    def bypassed_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the forward pass (kept frozen whatever a stage trains), as the strategy says
        (holistic: the LLM's input embedding table, unless it is tied to the output head)."""
        return self.strategy.bypassed_parameters(self)

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` positions per image, as the strategy says (splice: the fusion's tokens per view times
        the views per image; holistic: the encoder's ``num_tokens``)."""
        return self.strategy.num_image_tokens(self)

    @property
    def image_size(self) -> int:
        """Size at which the data pipeline delivers images: ``grid * size`` with views, otherwise the
        largest encoder input (each encoder resizes to its own)."""
        if self.views is not None:
            return self.views.grid * self.views.size
        return max(e.image_size for e in self.encoders.values())

    def processor(self, max_length: int = 512, train_on: TrainOn = "assistant") -> VLMProcessor:
        """A processor that tokenizes conversations and images for this model."""
        mean = next((e.preprocess.mean for e in self.encoders.values() if hasattr(e, "preprocess")), None)
        policy, fill = resize_settings(self.resize_policy, None if self.views is None else self.views.pad, mean)
        return VLMProcessor(self.llm.tokenizer, self.llm.template, self.num_image_tokens, self.image_size,
                            max_length=max_length, train_on=train_on, resize_policy=policy, pad_color=fill)

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
            with run_frozen_without_grad(encoder):
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
        """LLM input embeddings of ``input_ids`` with the images in, by the model's strategy (splice: visual
        tokens at the image-token positions; holistic: the encoder's output for every position).
        ``attention_mask`` marks the real tokens.

        ``image_streams`` (``{"<key>.<stream>": (n_images, views, N, C)}``, from the feature cache) replace
        ``pixel_values``: the encoders do not run.
        """
        return self.strategy.embed(self, input_ids, pixel_values, attention_mask, image_streams)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_streams: dict[str, torch.Tensor] | None = None,
                position_ids: torch.Tensor | None = None, **_: Any):
        """Causal-LM output (``.loss`` when ``labels`` are given, ``.logits``). Extra batch keys are ignored.
        ``image_streams`` (cached encoder streams) replace ``pixel_values``; see :meth:`embed`.
        ``position_ids`` (packed batches, :mod:`vlkit.data.packing`) restart at every sample, and attention
        stays within each sample."""
        embeds = self.embed(input_ids, pixel_values, attention_mask, image_streams)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Decoded continuations of a left-padded prompt batch (special tokens stripped)."""
        out = self.strategy.generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, **kwargs)
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

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str = "5GB") -> Path:
        """Write config.json, safetensors weights, tokenizer and processor settings (see :mod:`vlkit.io.pretrained`)."""
        from vlkit.io.pretrained import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size)

    def load_weights(self, path: str | Path, strict: bool = True) -> None:
        """Load a ``model.safetensors`` written by vlkit (a file, or a folder that contains one)."""
        state = read_weights(path)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"{path} does not match this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Was it saved from another recipe?"
            )


def build_model(recipe: Recipe) -> VLM:
    """Build the VLM a validated recipe describes (this is where weights are loaded)."""
    from vlkit.registry import ENCODERS, LLMS

    encoders: dict[str, VisionEncoder] = {}
    for i, section in enumerate(recipe.model.encoders):
        key = section.get("key") or section["name"].rpartition(":")[2]  # `pkg.mod:Class` -> `Class`
        if key in encoders:
            raise RecipeError(f"two encoders share the key {key!r}; give each a distinct `key:`",
                              f"model.encoders[{i}].key")
        encoders[key] = ENCODERS.build(section, f"model.encoders[{i}]")
    llm = LLMS.build(recipe.model.llm, "model.llm")
    # the strategy builds the fusion its parts need (none for a holistic encoder, which binds to the LLM)
    fusion = strategy_for([type(e) for e in encoders.values()]).build_fusion(encoders, llm, recipe.model.fusion)
    model = VLM(encoders, fusion, llm, views=recipe.model.views, resize_policy=recipe.model.resize_policy)
    if recipe.model.init is not None:  # `model: {init: ...}`: start from that model's weights
        from vlkit.io.init import load_init_weights

        load_init_weights(model, recipe.model.init)
    return model


def frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that have parameters, all of them frozen."""
    out: list[nn.Module] = []
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(child)
        else:
            out += frozen_modules(child)
    return out
