"""Turn samples (image + conversation) into model inputs, and lists of them into padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlkit.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    Message,
    TrainOn,
    tokenize_conversation,
)
from vlkit.data.feature_cache import CachedImage
from vlkit.data.views import image_to_square_tensor
from vlkit.errors import DataError


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB ``(3, size, size)`` float tensor in [0, 1] (bicubic resize of the whole image)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


@dataclass
class VLMProcessor:
    """Tokenizes conversations for one model: its tokenizer, chat template and visual-token count."""

    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    num_image_tokens: int
    image_size: int
    max_length: int = 512
    train_on: TrainOn = "assistant"
    pad: str | None = None
    """Pad images to square with this colour (``mean``, ``white``, ``black``; see :mod:`vlkit.data.views`)
    before resizing; None stretches the whole image to ``image_size``."""

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _check(self, messages: Sequence[Message], image: Image.Image | CachedImage | None, n_images: int,
               n_ids: int) -> None:
        expected = 0 if image is None else 1
        if n_images != expected:
            raise DataError(f"sample has {expected} image(s) but {n_images} {IMAGE_PLACEHOLDER!r} placeholder(s) "
                            "in its conversation; put exactly one placeholder per image")
        if n_ids > self.max_length:
            raise DataError(f"sample is {n_ids} tokens long (incl. {self.num_image_tokens} visual tokens), over "
                            f"max_length={self.max_length}; raise data.*.max_length or shorten the sample")

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The ``(3, image_size, image_size)`` pixels in [0, 1] this processor delivers for ``image``."""
        if self.pad is None:
            return image_to_tensor(image, self.image_size)
        return image_to_square_tensor(image, self.image_size, self.pad)

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

    def train_features(self, messages: Sequence[Message], image: Image.Image | CachedImage | None
                       ) -> dict[str, Any]:
        """Input ids and labels of a whole conversation (for the training loss)."""
        messages = self._with_placeholder(messages, image)
        ids, labels, n = tokenize_conversation(messages, self.tokenizer, self.template, self.num_image_tokens,
                                               self.train_on)
        self._check(messages, image, n, len(ids))
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("sample has no trainable tokens (no assistant turn?)")
        return {"input_ids": ids, "labels": labels, **self.image_inputs(image)}

    def prompt_features(self, messages: Sequence[Message], image: Image.Image | CachedImage | None
                        ) -> dict[str, Any]:
        """Prompt ids up to the last assistant turn (with the generation prompt) and that turn's answer."""
        messages = self._with_placeholder(messages, image)
        answer = ""
        if messages and messages[-1].role == "assistant":
            answer = messages[-1].content
            messages = messages[:-1]
        ids, _, n = tokenize_conversation(messages, self.tokenizer, self.template, self.num_image_tokens,
                                          add_generation_prompt=True)
        self._check(messages, image, n, len(ids))
        return {"input_ids": ids, "answer": answer, **self.image_inputs(image)}

    def collate(self, features: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample (dynamic padding); stack the images of the samples that have one.

        Cached streams (``image_streams``) are stacked per stream. Keys other than ``input_ids``, ``labels``,
        ``pixel_values`` and ``image_streams`` are gathered into lists.
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
        images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None,
        }
        if labels is not None:
            batch["labels"] = labels
        cached = [f["image_streams"] for f in features if f.get("image_streams") is not None]
        if cached:
            batch["image_streams"] = {name: torch.stack([c[name] for c in cached]) for name in cached[0]}
        for key in features[0]:
            if key not in batch and key not in ("labels", "image_streams"):
                batch[key] = [f.get(key) for f in features]
        return batch
