"""Turn samples (image + conversation) into model inputs, and lists of them into padded batches.

Samples longer than ``max_length`` follow ``overflow``: ``skip`` (the sample is unusable) or ``truncate``
(the text after the last image-token block is cut, keeping at least one trained token; an image block is
never cut). Every per-sample problem raises :class:`UnusableSample`, a :class:`~vlkit.errors.DataError`
that the data layer skips and counts (``strict: false``) or reports with the sample's shard and key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlkit.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    ChatTemplate,
    Message,
    TrainOn,
    tokenize_conversation,
)
from vlkit.data.feature_cache import CachedImage
from vlkit.data.packing import collate_packed
from vlkit.data.views import PAD_COLORS, ResizePolicy, image_to_square_tensor
from vlkit.errors import DataError

Overflow = Literal["skip", "truncate"]


class UnusableSample(DataError):
    """A sample that cannot train or be evaluated as it is (no trained token, too long for ``max_length``,
    placeholders not matching its images); ``str(exc)`` says why and how to fix it. The data layer skips and
    counts it, or raises it with the shard and sample key under ``strict: true``."""


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB ``(3, size, size)`` float tensor in [0, 1] (bicubic resize of the whole image: ``resize`` policy)."""
    return image_to_square_tensor(image, size, "resize")


@dataclass
class Encoded:
    """A conversation as the model trains on it."""

    input_ids: list[int]
    labels: list[int]
    n_images: int
    truncated: int = 0
    """Tokens cut from the end by ``overflow: truncate`` (0: the whole conversation fits)."""


@dataclass
class VLMProcessor:
    """Tokenizes conversations for one model: its tokenizer, chat template and visual-token count."""

    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    num_image_tokens: int
    image_size: int
    max_length: int = 512
    train_on: TrainOn = "assistant"
    overflow: Overflow = "skip"
    """Samples over ``max_length``: ``skip`` them, or ``truncate`` the text after the last image block."""
    resize_policy: ResizePolicy = "resize"
    """How a non-square image becomes square (:func:`vlkit.data.views.square_image`)."""
    pad_color: tuple[int, int, int] = PAD_COLORS["mean"]
    """Fill of the ``pad`` policy (RGB)."""
    pack_tokens: int | None = None
    """Training batches (:meth:`train_batch`): pack the samples into rows of at most this many tokens
    (``data.train.packing.max_tokens``); None: pad every sample to the longest."""

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def image_spec(self) -> str:
        """What the pixels depend on besides the image: ``pad(R, G, B)``, ``resize`` or ``crop`` at the size."""
        policy = f"pad{tuple(self.pad_color)}" if self.resize_policy == "pad" else self.resize_policy
        return f"{policy}@{self.image_size}"

    def _check_images(self, image: Image.Image | CachedImage | None, n_images: int) -> None:
        expected = 0 if image is None else 1
        if n_images != expected:
            raise UnusableSample(f"sample has {expected} image(s) but {n_images} {IMAGE_PLACEHOLDER!r} "
                                 "placeholder(s) in its conversation; put exactly one placeholder per image")

    def _too_long(self, n_ids: int, n_images: int) -> str:
        return (f"sample is {n_ids} tokens long (incl. {n_images * self.num_image_tokens} visual tokens), over "
                f"max_length={self.max_length}")

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The ``(3, image_size, image_size)`` pixels in [0, 1] this processor delivers for ``image``."""
        return image_to_square_tensor(image, self.image_size, self.resize_policy, self.pad_color)

    def image_inputs(self, image: Image.Image | CachedImage | None) -> dict[str, Any]:
        """``{"pixel_values": ...}`` for an image, ``{"image_streams": ...}`` for one from the feature cache."""
        if isinstance(image, CachedImage):
            return {"pixel_values": None, "image_streams": image.streams}
        return {"pixel_values": None if image is None else self.pixels(image)}

    @staticmethod
    def _with_placeholder(messages: Sequence[Message], image: Image.Image | CachedImage | None) -> list[Message]:
        """Samples with an image but no placeholder get one at the start of the first user turn."""
        messages = list(messages)
        if image is not None and not any(IMAGE_PLACEHOLDER in m.content for m in messages):
            first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
            if first is not None:
                m = messages[first]
                messages[first] = Message(m.role, f"{IMAGE_PLACEHOLDER}\n{m.content}", m.trainable)
        return messages

    def encode(self, messages: Sequence[Message], image: Image.Image | CachedImage | None) -> Encoded:
        """The whole conversation's ids and labels, fitted to ``max_length`` per ``overflow``.

        Raises :class:`UnusableSample` when no token trains, when the sample is too long under ``skip``, or
        when truncating would cut an image block or leave no trained token.
        """
        messages = self._with_placeholder(messages, image)
        ids, labels, n = tokenize_conversation(messages, self.tokenizer, self.template, self.num_image_tokens,
                                               self.train_on)
        self._check_images(image, n)
        if all(label == IGNORE_INDEX for label in labels):
            raise UnusableSample(f"sample has no trained token (train_on: {self.train_on}; no assistant turn?)")
        if len(ids) <= self.max_length:
            return Encoded(ids, labels, n)
        too_long = self._too_long(len(ids), n)
        if self.overflow == "skip":
            raise UnusableSample(f"{too_long}; raise data.*.max_length, shorten the sample, or set "
                                 "data.*.overflow: truncate")
        image_end = max((i + 1 for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID), default=0)
        if image_end > self.max_length:
            raise UnusableSample(f"{too_long}, and its image tokens end at position {image_end}: truncating "
                                 "would cut an image; raise data.*.max_length")
        cut_ids, cut_labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in cut_labels):
            raise UnusableSample(f"{too_long}, and truncating it leaves no trained token; raise "
                                 "data.*.max_length")
        return Encoded(cut_ids, cut_labels, n, truncated=len(ids) - self.max_length)

    def train_features(self, messages: Sequence[Message], image: Image.Image | CachedImage | None
                       ) -> dict[str, Any]:
        """Input ids and labels of a whole conversation (for the training loss); see :meth:`encode`."""
        enc = self.encode(messages, image)
        return {"input_ids": enc.input_ids, "labels": enc.labels, **self.image_inputs(image),
                "truncated": enc.truncated}

    def prompt_features(self, messages: Sequence[Message], image: Image.Image | CachedImage | None
                        ) -> dict[str, Any]:
        """Prompt ids up to the last assistant turn (with the generation prompt) and that turn's answer.

        A prompt over ``max_length`` is unusable whatever ``overflow`` says (the answer follows the prompt).
        """
        messages = self._with_placeholder(messages, image)
        answer = ""
        if messages and messages[-1].role == "assistant":
            answer = messages[-1].content
            messages = messages[:-1]
        ids, _, n = tokenize_conversation(messages, self.tokenizer, self.template, self.num_image_tokens,
                                          add_generation_prompt=True)
        self._check_images(image, n)
        if len(ids) > self.max_length:
            raise UnusableSample(f"the prompt: {self._too_long(len(ids), n)}; raise data.*.max_length or "
                                 "shorten the sample")
        return {"input_ids": ids, "answer": answer, **self.image_inputs(image)}

    def collate(self, features: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample (dynamic padding); stack the images of the samples that have one.

        Cached streams (``image_streams``) are stacked per stream. Keys other than ``input_ids``, ``labels``,
        ``pixel_values`` and ``image_streams`` are gathered into lists. A batch with labels of which none
        trains raises :class:`~vlkit.errors.DataError` naming its samples (a loss of 0 must never pass
        silently).
        """
        if not features:
            raise DataError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        batch_size = len(features)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        has_labels = "labels" in features[0]
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, sl] = 1
            if labels is not None:
                labels[i, sl] = torch.tensor(f["labels"], dtype=torch.long)
        if labels is not None:
            self.require_trained(labels, features)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 **self.stack_images(features)}
        if labels is not None:
            batch["labels"] = labels
        for key in features[0]:
            if key not in batch and key not in ("labels", "image_streams"):
                batch[key] = [f.get(key) for f in features]
        return batch

    def train_batch(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A training batch of :meth:`train_features`: packed into rows of at most :attr:`pack_tokens`
        (:func:`vlkit.data.packing.collate_packed`) when set, else right-padded (:meth:`collate`)."""
        if self.pack_tokens is not None:
            return collate_packed(self, features, self.pack_tokens)
        return self.collate(features, padding_side="right")

    @staticmethod
    def stack_images(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``pixel_values`` (the images of the samples that have one, stacked in order, or None) and, when
        samples come from the feature cache, ``image_streams`` stacked per stream."""
        images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        out: dict[str, Any] = {"pixel_values": torch.stack(images) if images else None}
        cached = [f["image_streams"] for f in features if f.get("image_streams") is not None]
        if cached:
            out["image_streams"] = {name: torch.stack([c[name] for c in cached]) for name in cached[0]}
        return out

    @staticmethod
    def require_trained(labels: torch.Tensor, features: Sequence[dict[str, Any]]) -> None:
        """Raise :class:`~vlkit.errors.DataError` naming the samples when no label of a batch trains (a loss
        of 0 must never pass silently)."""
        if bool((labels != IGNORE_INDEX).any()):
            return
        keys = [str(f.get("__key__", f"#{i}")) for i, f in enumerate(features)]
        shown = ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
        raise DataError(f"a batch has no trained token (every label is -100): samples {shown}; the loss would "
                        "be 0. Check the chat template and train_on, or run `vlkit data inspect RECIPE`")
