"""The ``distill_images`` dataset: unpaired images and random text for HoVLE's distillation stage.

Each sample is one image taken from any image shards (``vlkit data demo`` / ``from-llava`` output; the
conversations are ignored, samples without an image are passed over) followed by ``text_length`` token ids
drawn uniformly from the LLM's vocabulary (special tokens excluded), unrelated to the image::

    input_ids:      [IMAGE_TOKEN_ID] * num_image_tokens + [random text ids] * text_length
    attention_mask: all ones
    pixel_values:   (B, 3, S, S) in [0, 1]

Training batches come from ``urls`` (an endless, reshuffled stream whose text follows the loader seed);
validation batches from the held-out images of ``val_urls`` with text from a fixed, different seed, so every
validation sees the same inputs. Use it as a stage's own dataset::

    stages:
      - name: distill
        objective: distill
        data: {name: distill_images, urls: "data/demo/train-*.tar", val_urls: "data/demo/val-000000.tar"}
"""

from __future__ import annotations

import io
import random
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlkit.data.conversation import IMAGE_TOKEN_ID
from vlkit.data.processor import VLMProcessor, image_to_tensor
from vlkit.data.shards import IMAGE_EXTENSIONS, expand_urls, iter_tar_samples, split_shards
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS

_VAL_TEXT_SEED = 7_919  # validation text never follows the training seeds


def text_vocabulary(processor: VLMProcessor) -> torch.Tensor:
    """Ids random text is drawn from: every id of the tokenizer except its special tokens."""
    special = set(processor.tokenizer.all_special_ids)
    ids = [i for i in range(len(processor.tokenizer)) if i not in special]
    if not ids:
        raise DataError("the tokenizer has no non-special tokens to draw random text from")
    return torch.tensor(ids, dtype=torch.long)


class _Stream(IterableDataset):
    """Batches of (image, random text) samples from ``shards``; endless when ``train``, else one pass."""

    def __init__(self, shards: list[str], processor: VLMProcessor, args: DistillImages.Args, seed: int,
                 rank: int, world_size: int, train: bool, cap: int | None) -> None:
        super().__init__()
        self.shards = shards
        self.image_size = processor.image_size
        self.num_image_tokens = processor.num_image_tokens
        self.vocab = text_vocabulary(processor)
        self.args = args
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.train = train
        self.cap = cap
        self._warned = 0

    def _readers(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _images(self, shards: list[str], stride: int, offset: int) -> Iterator[tuple[str, bytes | None]]:
        """``(url, image bytes)`` of the samples of ``shards`` that have an image (every ``stride``-th from
        ``offset``); an unreadable shard gives ``(url, None)`` once."""
        index = -1
        for url in shards:
            try:
                for _, files in iter_tar_samples(url):
                    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                    if ext is None:
                        continue
                    index += 1
                    if index % stride == offset:
                        yield url, files[ext]
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                self._bad(url, f"unreadable tar shard ({type(exc).__name__}: {exc})")
                yield url, None

    def _bad(self, url: str, reason: str) -> None:
        if self.args.strict:
            raise DataError(f"{url}: {reason}. Fix or remove it, or set strict: false to skip bad images")
        if self._warned < 3:
            self._warned += 1
            warnings.warn(f"distill_images: skipping {url}: {reason}", RuntimeWarning, stacklevel=2)

    def _decode(self, url: str, data: bytes) -> torch.Tensor | None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image_to_tensor(image.convert("RGB"), self.image_size)
        except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
            self._bad(url, f"cannot decode an image ({type(exc).__name__}: {exc})")
            return None

    def _batch(self, pixels: list[torch.Tensor], urls: list[str], skipped: int,
               generator: torch.Generator) -> dict[str, Any]:
        b = len(pixels)
        text = self.vocab[torch.randint(len(self.vocab), (b, self.args.text_length), generator=generator)]
        image = torch.full((b, self.num_image_tokens), IMAGE_TOKEN_ID, dtype=torch.long)
        input_ids = torch.cat([image, text], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.stack(pixels), "__url__": urls, "skipped": skipped}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._readers()
        # with at least one shard per reader, readers split the shards; otherwise they split the samples
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        stride, offset = (1, 0) if by_shard else (readers, reader)
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + reader) % 2**63 if self.train else _VAL_TEXT_SEED * 1_000_003 + reader)
        yield from (self._train(shards, stride, offset, reader, generator) if self.train
                    else self._val(shards, stride, offset, readers, reader, generator))

    def _train(self, shards: list[str], stride: int, offset: int, reader: int,
               generator: torch.Generator) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"vlkit-distill:{self.seed}:{reader}")
        buffer: list[tuple[str, bytes]] = []
        pixels: list[torch.Tensor] = []
        urls: list[str] = []
        skipped = 0
        while True:
            order = list(shards)
            rng.shuffle(order)
            seen = 0
            for url, data in self._images(order, stride, offset):
                if data is None:
                    skipped += 1
                    continue
                seen += 1
                buffer.append((url, data))
                if len(buffer) < max(1, self.args.shuffle_buffer):
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                url, data = buffer.pop()
                image = self._decode(url, data)
                if image is None:
                    skipped += 1
                    continue
                pixels.append(image)
                urls.append(url)
                if len(pixels) == self.args.batch_size:
                    yield self._batch(pixels, urls, skipped, generator)
                    pixels, urls, skipped = [], [], 0
            if not seen and not buffer:
                raise DataError(f"distill_images: no readable image in {', '.join(shards)}")

    def _val(self, shards: list[str], stride: int, offset: int, readers: int, reader: int,
             generator: torch.Generator) -> Iterator[dict[str, Any]]:
        cap = None if self.cap is None else self.cap // readers + (1 if reader < self.cap % readers else 0)
        pixels: list[torch.Tensor] = []
        urls: list[str] = []
        skipped = taken = 0
        for url, data in self._images(shards, stride, offset):
            if cap is not None and taken >= cap:
                break
            image = None if data is None else self._decode(url, data)
            if image is None:
                skipped += 1
                continue
            taken += 1
            pixels.append(image)
            urls.append(url)
            if len(pixels) == self.args.batch_size:
                yield self._batch(pixels, urls, skipped, generator)
                pixels, urls, skipped = [], [], 0
        if pixels:
            yield self._batch(pixels, urls, skipped, generator)


@DATASETS.register("distill_images")
class DistillImages:
    """Unpaired images (from any image shards) + random token sequences, for ``objective: distill``."""

    objective: ClassVar[str] = "distill"
    """The batches this dataset gives: inputs for a distillation stage (no conversations, no labels)."""

    @dataclass
    class Args:
        urls: str
        """Shards whose images are used (brace pattern or glob, as for ``shards``)."""
        val_urls: str | None = None
        """Held-out shards for validation (cosine similarity per modality); None: the stage is not validated."""
        batch_size: int = 32
        num_workers: int = 1
        """Data-loader worker processes per rank (0: load in the training process)."""
        text_length: int = 32
        """Random text tokens after each image."""
        shuffle_buffer: int = 1000
        """Images held for shuffling (1: none)."""
        val_samples: int | None = 512
        """Held-out images per validation (None: all of ``val_urls``)."""
        strict: bool = False
        """True: an unreadable shard or image raises; False: it is skipped and counted."""

        def __post_init__(self) -> None:
            problems = [f"{name} must be at least {low}, got {getattr(self, name)}"
                        for name, low in (("batch_size", 1), ("num_workers", 0), ("text_length", 1),
                                          ("shuffle_buffer", 1))
                        if getattr(self, name) < low]
            if self.val_samples is not None and self.val_samples < 1:
                problems.append(f"val_samples must be positive (or null for all), got {self.val_samples}")
            if problems:
                raise RecipeError("; ".join(problems))

    def __init__(self, args: DistillImages.Args) -> None:
        self.args = args
        self.shards = expand_urls(args.urls)
        self.val_shards = expand_urls(args.val_urls) if args.val_urls else []

    def __repr__(self) -> str:
        return f"DistillImages({self.args.urls!r}, {len(self.shards)} shards)"

    def has_validation(self) -> bool:
        """Whether held-out images (``val_urls``) are set."""
        return bool(self.val_shards)

    @staticmethod
    def _loader(stream: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=2 if workers > 0 else None)

    def train_loader(self, processor: VLMProcessor, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> DataLoader:
        """Endless stream of training batches for rank ``rank`` of ``world_size`` (see the module doc)."""
        stream = _Stream(self.shards, processor, self.args, seed, rank, world_size, train=True, cap=None)
        mine = split_shards(self.shards, rank, world_size) if len(self.shards) >= world_size else self.shards
        return self._loader(stream, min(self.args.num_workers, len(mine)))

    def val_loader(self, processor: VLMProcessor, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> DataLoader:
        """One pass over this rank's part of the held-out images (at most ``val_samples`` / ``max_samples``
        of all ranks together); empty without ``val_urls``."""
        if not self.val_shards:
            return self._loader(_Stream([], processor, self.args, 0, rank, world_size, False, 0), 0)
        caps = [c for c in (self.args.val_samples, max_samples) if c is not None]
        stream = _Stream(self.val_shards, processor, self.args, 0, rank, world_size, train=False,
                         cap=min(caps) if caps else None)
        return self._loader(stream, min(self.args.num_workers, max(1, len(self.val_shards))))
