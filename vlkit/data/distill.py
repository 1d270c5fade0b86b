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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlkit.data.base import Dataset, ProcessorArgs, ShardSource
from vlkit.data.conversation import IMAGE_TOKEN_ID
from vlkit.data.processor import VLMProcessor, image_to_tensor
from vlkit.data.reading import (
    ERROR_KEY,
    IMAGE_EXTENSIONS,
    EpochStream,
    Loader,
    Position,
    SampleSource,
    SkipReporter,
    carry_errors,
    count_samples,
    data_loader,
    expand_urls,
    indexed_counts,
    reader_split,
    share,
    split_shards,
)
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


class _Images:
    """Decoding and batching of (image, random text) samples, shared by the train and validation streams."""

    def __init__(self, processor: VLMProcessor, args: DistillImages.Args) -> None:
        self.image_size = processor.image_size
        self.num_image_tokens = processor.num_image_tokens
        self.vocab = text_vocabulary(processor)
        self.args = args
        self.report = SkipReporter(args.strict, prefix="distill_images: ")

    def decode(self, sample: dict[str, Any]) -> torch.Tensor | bool | None:
        """The sample's image tensor; False for a sample without an image (passed over); None when it is
        unusable (reported, counted by the caller)."""
        if ERROR_KEY in sample:
            self.report(sample["__url__"], sample["__key__"], sample[ERROR_KEY])
            return None
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return False
        try:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image_to_tensor(image.convert("RGB"), self.image_size)
        except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
            self.report(sample["__url__"], sample["__key__"],
                        f"cannot decode an image ({type(exc).__name__}: {exc})")
            return None

    def batch(self, pixels: list[torch.Tensor], urls: list[str], skipped: int, text_seed: int
              ) -> dict[str, Any]:
        """A batch; its random text is drawn with ``text_seed`` (one seed per batch: resumable)."""
        b = len(pixels)
        generator = torch.Generator().manual_seed(text_seed % 2**63)
        text = self.vocab[torch.randint(len(self.vocab), (b, self.args.text_length), generator=generator)]
        image = torch.full((b, self.num_image_tokens), IMAGE_TOKEN_ID, dtype=torch.long)
        input_ids = torch.cat([image, text], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.stack(pixels), "__url__": urls, "skipped": skipped}


def _text_seed(seed: Any, reader: int, index: int) -> int:
    return zlib.crc32(f"vlkit-distill-text:{seed}:{reader}:{index}".encode())


class _TrainStream(EpochStream):
    """Endless batches of (image, random text) from the shards, reshuffled every pass; readers (loader
    workers of every rank) split the shards, or the samples when there are fewer shards than readers."""

    def __init__(self, shards: list[str], images: _Images, seed: int, rank: int, world_size: int,
                 batches: int, workers: int, expected: dict[str, int]) -> None:
        super().__init__(batches, workers)
        self.shards = shards
        self.images = images
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.expected = expected

    def _batches(self, worker: int, workers: int, state: Any) -> Iterator[tuple[dict[str, Any], Any]]:
        reader, readers = self.rank * workers + worker, self.world_size * workers
        shards, stride, offset = reader_split(self.shards, reader, readers)
        args = self.images.args
        source = SampleSource(shards, f"distill:{self.seed}:{reader}", args.shuffle_buffer, args.strict,
                              self.expected, stride, offset)
        made, start = (int(state[0]), Position.from_state(state[1])) if state else (0, Position())
        pixels: list[torch.Tensor] = []
        urls: list[str] = []
        skipped = 0
        current, seen = start.pass_, start.taken > 0 or made > 0
        for sample, pos in source.samples(start):
            if pos.pass_ != current:
                if not seen:
                    raise DataError(f"distill_images: no readable image in {', '.join(shards)}")
                current, seen = pos.pass_, False
            image = self.images.decode(sample)
            if image is False:
                continue
            if image is None:
                skipped += 1
                continue
            seen = True
            pixels.append(image)
            urls.append(sample["__url__"])
            if len(pixels) == args.batch_size:
                batch = self.images.batch(pixels, urls, skipped, _text_seed(self.seed, reader, made))
                made += 1
                yield batch, [made, pos.to_state()]
                pixels, urls, skipped = [], [], 0


class _ValStream(IterableDataset):
    """One in-order pass over this reader's part of the held-out images; text from a fixed seed."""

    def __init__(self, shards: list[str], images: _Images, rank: int, world_size: int, cap: int | None,
                 expected: dict[str, int]) -> None:
        super().__init__()
        self.shards = shards
        self.images = images
        self.rank, self.world_size = rank, world_size
        self.cap = cap
        self.expected = expected

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return carry_errors(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        cap = None if self.cap is None else share(self.cap, readers, reader)
        shards, stride, offset = reader_split(self.shards, reader, readers)
        source = SampleSource(shards, "val", 0, self.images.args.strict, self.expected, stride, offset)
        pixels: list[torch.Tensor] = []
        urls: list[str] = []
        skipped = taken = made = 0
        for sample in source.one_pass(0):
            if cap is not None and taken >= cap:
                break
            image = self.images.decode(sample)
            if image is False:
                continue
            if image is None:
                skipped += 1
                continue
            taken += 1
            pixels.append(image)
            urls.append(sample["__url__"])
            if len(pixels) == self.images.args.batch_size:
                yield self.images.batch(pixels, urls, skipped, _text_seed(_VAL_TEXT_SEED, reader, made))
                made += 1
                pixels, urls, skipped = [], [], 0
        if pixels:
            yield self.images.batch(pixels, urls, skipped, _text_seed(_VAL_TEXT_SEED, reader, made))


@DATASETS.register("distill_images")
class DistillImages(Dataset):
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
        self._num_samples: int | None = None

    def __repr__(self) -> str:
        return f"DistillImages({self.args.urls!r}, {len(self.shards)} shards)"

    @property
    def processor_args(self) -> ProcessorArgs:
        """Batches are built here, not tokenized: the processor's defaults."""
        return ProcessorArgs()

    def has_validation(self) -> bool:
        """Whether held-out images (``val_urls``) are set."""
        return bool(self.val_shards)

    def shard_sources(self) -> list[ShardSource]:
        """The training and held-out shards; only their images are used."""
        return [ShardSource(list(self.shards + self.val_shards), conversations=False)]

    def num_samples(self) -> int:
        """Samples in the training shards (those without an image included): the loader epoch's length."""
        if self._num_samples is None:
            self._num_samples = count_samples(self.shards)
        return self._num_samples

    def train_loader(self, processor: VLMProcessor, *, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> Loader:
        """Endless stream of training batches for rank ``rank`` of ``world_size`` (see the module doc)."""
        mine = split_shards(self.shards, rank, world_size) if len(self.shards) >= world_size else self.shards
        workers = min(self.args.num_workers, len(mine))
        stream = _TrainStream(self.shards, _Images(processor, self.args), seed, rank, world_size,
                              self.batches_per_epoch(world_size), workers, indexed_counts(self.shards))
        return data_loader(stream, workers)

    def val_loader(self, processor: VLMProcessor, *, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> Loader:
        """One pass over this rank's part of the held-out images (at most ``val_samples`` / ``max_samples``
        of all ranks together); empty without ``val_urls``."""
        caps = [c for c in (self.args.val_samples, max_samples) if c is not None]
        cap = min(caps) if caps else None
        if not self.val_shards:
            cap = 0
        stream = _ValStream(self.val_shards, _Images(processor, self.args), rank, world_size, cap,
                            indexed_counts(self.val_shards))
        workers = min(self.args.num_workers, max(1, len(self.val_shards))) if self.val_shards else 0
        return data_loader(stream, workers)
