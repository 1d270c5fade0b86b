"""The ``shards`` dataset: webdataset tar shards of ``KEY.json`` (+ ``KEY.png`` / ``KEY.jpg``) samples.

Every sample's JSON holds LLaVA-style ``conversations`` and optionally a question ``type`` (for
per-type accuracy), a ``task`` (e.g. ``vqa``, ``caption``; see ``tasks:``) and ``types`` (one question
type per assistant turn of a multi-turn sample). A dataset folder also has ``index.json``::

    {"splits": {"train": {"shards": ["train-000000.tar", ...], "samples": N,
                          "shard_samples": [n0, ...], "shard_tasks": [{"vqa": n, ...}, ...]}, ...}}

(``shard_samples`` and ``shard_tasks`` are optional; they let a subset of shards, or a task filter, be
counted without reading the shards). This module also holds the writer used by ``vlkit data demo`` and
``vlkit data from-llava`` (:class:`SplitWriter`, :func:`prepare_out_dir`, :func:`write_index`).

Training streams are infinite: shards are split across ranks (shard ``i`` goes to rank
``i % world_size``) and then across data-loader workers; each pass over a worker's shards is reshuffled
with a seed derived from ``seed`` and the pass number, samples go through a shuffle buffer, and every
loader "epoch" yields exactly ``samples_per_epoch // (world_size * batch_size)`` batches so that
distributed ranks stay in step. Corrupt samples are skipped and counted in each batch's ``skipped``
(or raise :class:`~vlkit.errors.DataError` with ``strict: true``).

Other datasets can build on these streams (the ``mix`` dataset does): :meth:`ShardDataset.train_stream`
gives a rank's stream, whose ``features`` method yields single parsed samples, with an optional
``rewrite`` of each sample's messages before tokenizing; :func:`collate_batch` and :func:`data_loader`
make batches and loaders of them.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import io
import json
import os
import random
import re
import shutil
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlkit.data.conversation import Message, messages_from_llava
from vlkit.data.feature_cache import CacheReader
from vlkit.data.processor import VLMProcessor
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
"""Member extensions read as the sample's image (the first present, in this order)."""
INDEX_FILE = "index.json"
_MAX_SKIP_WARNINGS = 3
_MTIME = 1_704_067_200  # fixed member time (2024-01-01) so that rebuilding gives identical shards
_HOW_TO_BUILD = ("build the offline demo with `vlkit data demo --out DIR` or convert LLaVA-format JSON with "
                 "`vlkit data from-llava JSON IMAGE_DIR --out DIR`, then set urls to e.g. 'DIR/train-*.tar'")


# ------------------------------------------------------------------------------------------ shard paths


def expand_urls(urls: str) -> list[str]:
    """Shard paths named by ``urls``: brace patterns (``a-{000000..000003}.tar``) and/or globs
    (``a-*.tar``); several patterns may be joined with ``::``. Relative paths resolve against the CWD.

    Raises :class:`DataError` when a named shard is missing or a glob matches nothing.
    """
    if not isinstance(urls, str) or not urls.strip():
        raise DataError(f"data urls must name shard files, got {urls!r}; {_HOW_TO_BUILD}")
    found: list[str] = []
    missing: list[str] = []
    for pattern in urls.split("::"):
        pattern = os.path.expanduser(pattern.strip())
        if os.path.isdir(pattern):
            raise DataError(f"data urls {urls!r} names a folder; name its shards instead, e.g. "
                            f"'{pattern.rstrip('/')}/train-*.tar'")
        for path in braceexpand(pattern):
            if glob.has_magic(path):
                matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not matches:
                    missing.append(path)
                found.extend(matches)
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataError(f"no shard files for data urls {urls!r} (relative to {os.getcwd()}): missing {shown}. "
                        f"To get data, {_HOW_TO_BUILD}")
    # keep the first occurrence of each shard, in order
    return list(dict.fromkeys(found))


def split_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` of ``world_size`` reads: shard ``i`` goes to rank ``i % world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return list(shards[rank::world_size])


# ----------------------------------------------------------------------------------------- tar reading


def _split_name(name: str) -> tuple[str | None, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), the webdataset convention."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, ""
    return match.group(1), match.group(2).lower()


def iter_tar_samples(url: str, json_only: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a tar shard, in file order.

    ``json_only`` reads only the ``.json`` members (other members are listed with empty bytes), seeking
    past image data. Tar-level errors propagate (``tarfile.TarError``, ``OSError``, ``EOFError``).
    """
    mode = "r:*" if json_only else "r|*"
    with tarfile.open(url, mode=mode) as tar:
        key: str | None = None
        files: dict[str, bytes] = {}
        for member in tar:
            if not member.isreg():
                continue
            k, ext = _split_name(member.name)
            if k is None or os.path.basename(k).startswith("__"):
                continue
            if json_only and ext != "json":
                data = b""
            else:
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            files[ext] = data
        if key is not None:
            yield key, files


class _BadSample(Exception):
    """A sample that cannot be used; ``str(exc)`` is the reason."""


def _read_meta(files: dict[str, bytes]) -> dict[str, Any]:
    raw = files.get("json")
    if raw is None:
        raise _BadSample("no .json member")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _BadSample(f"malformed JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _BadSample(f"JSON must be an object, got {type(meta).__name__}")
    return meta


def _check_conversations(meta: dict[str, Any]) -> list[dict]:
    conv = meta.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _BadSample("missing or empty 'conversations' list in the JSON")
    return conv


def _image_bytes(files: dict[str, bytes]) -> bytes | None:
    """The sample's image file (the first of :data:`IMAGE_EXTENSIONS` present), undecoded."""
    return next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)


def _decode_image(files: dict[str, bytes]) -> Image.Image | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            try:
                image = Image.open(io.BytesIO(files[ext]))
                image.load()
                return image.convert("RGB")
            except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
                raise _BadSample(f"cannot decode image {ext!r} ({type(exc).__name__}: {exc})") from None
    return None


def _answers(conversations: list[Any]) -> list[str]:
    return [t["value"] for t in conversations if isinstance(t, dict) and isinstance(t.get("value"), str)
            and str(t.get("from", t.get("role"))).lower() in ("gpt", "assistant")]


# --------------------------------------------------------------------------------------------- streams


Rewrite = Callable[[list[Message]], list[Message]]
"""Applied to a sample's messages before tokenizing (e.g. the ``mix`` dataset's task instruction); must be
picklable (loader workers) and may raise :class:`~vlkit.errors.DataError` to skip the sample."""


def _worker() -> tuple[int, int]:
    """(id, count) of the data-loader worker running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def collate_batch(processor: VLMProcessor, feats: list[dict[str, Any]], skipped: int, prompt: bool
                  ) -> dict[str, Any]:
    """A batch of parsed samples: right-padded training features, or (``prompt``) left-padded prompts with
    the whole conversations as ``loss_batch``; ``skipped`` counts the samples skipped before them."""
    if prompt:
        losses = [f.pop("loss") for f in feats]
        batch = processor.collate(feats, padding_side="left")
        batch["loss_batch"] = processor.collate(losses, padding_side="right")
        batch["loss_batch"]["pixel_values"] = batch["pixel_values"]  # one tensor: pickled once
    else:
        batch = processor.collate(feats, padding_side="right")
    batch["skipped"] = skipped
    return batch


def data_loader(stream: IterableDataset, workers: int) -> DataLoader:
    """A loader over a stream that yields whole batches, with ``workers`` persistent worker processes."""
    if workers > 0:
        # tokenizers' thread pool does not survive fork; avoid its warning (and any deadlock)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None)


class EpochStream(IterableDataset):
    """An infinite stream of batches served in loader epochs of ``batches`` batches, split across the
    loader's workers. The stream persists across epochs (in the worker process when loader workers are
    used), so an epoch continues where the previous one stopped. Subclasses implement :meth:`_batches`."""

    batches: int
    _gen: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        if self._gen is None:
            self._gen = self._batches(worker, workers)
        count = self.batches // workers + (1 if worker < self.batches % workers else 0)
        for _ in range(count):
            yield next(self._gen)

    def _batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """The endless batches of loader worker ``worker`` of ``workers``."""
        raise NotImplementedError


class _Stream(IterableDataset):
    """Shared sample parsing for the train and validation streams (runs inside loader workers)."""

    def __init__(self, shards: list[str], processor: VLMProcessor, args: ShardDataset.Args,
                 cache: CacheReader | None = None, rewrite: Rewrite | None = None) -> None:
        super().__init__()
        self.shards = shards
        self.processor = processor
        self.args = args
        self.cache = cache
        self.rewrite = rewrite
        self.tasks = set(args.tasks) if args.tasks is not None else None
        self._warned = 0

    def _worker(self) -> tuple[int, int]:
        return _worker()

    def _skip(self, url: str, key: str, reason: str) -> None:
        """Raise under strict, else warn about the first few skipped samples."""
        message = f"{url}: sample {key}: {reason}"
        if self.args.strict:
            raise DataError(f"{message}. Fix or remove the sample, or set strict: false to skip corrupt samples")
        if self._warned < _MAX_SKIP_WARNINGS:
            self._warned += 1
            more = " (further skips are only counted)" if self._warned == _MAX_SKIP_WARNINGS else ""
            warnings.warn(f"skipping {message}{more}", RuntimeWarning, stacklevel=2)

    def _raw(self, url: str) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """``(url, key, files)`` of each sample of one shard; an unreadable shard ends early (or raises)."""
        try:
            for key, files in iter_tar_samples(url):
                yield url, key, files
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            reason = f"unreadable tar shard ({type(exc).__name__}: {exc})"
            if self.args.strict:
                raise DataError(f"{url}: {reason}. Fix or remove the shard, or set strict: false to skip "
                                "corrupt samples") from exc
            yield url, "<tar>", {"__error__": reason.encode()}

    def _parse(self, url: str, key: str, files: dict[str, bytes], prompt: bool
               ) -> dict[str, Any] | None:
        """Features of one sample, ``None`` if the task filter drops it; raises :class:`_BadSample`."""
        if "__error__" in files:
            raise _BadSample(files["__error__"].decode())
        meta = _read_meta(files)
        if self.tasks is not None and meta.get("task") not in self.tasks:
            return None
        conv = _check_conversations(meta)
        try:
            messages: list[Message] = messages_from_llava(conv)
            if self.rewrite is not None:
                messages = self.rewrite(messages)
            if self.cache is not None:
                image = self.cache.lookup(url, key, _image_bytes(files))
                if isinstance(image, str):
                    raise _BadSample(image)
            else:
                image = _decode_image(files)
            if prompt:
                if messages[-1].role != "assistant":
                    raise _BadSample("the conversation does not end with an assistant answer to evaluate")
                feats = self.processor.prompt_features(messages, image)
                train = self.processor.train_features(messages, image)
                train["pixel_values"] = None  # the batch's stacked images are shared with the loss batch
                feats["loss"] = train
            else:
                feats = self.processor.train_features(messages, image)
        except RecipeError:
            raise  # a configuration problem (e.g. the chat template), not a bad sample
        except DataError as exc:
            raise _BadSample(str(exc)) from None
        qtype = meta.get("type")
        feats.update({"__key__": key, "__url__": url, "type": qtype if isinstance(qtype, str) else None})
        return feats

    def _collate(self, feats: list[dict[str, Any]], skipped: int, prompt: bool) -> dict[str, Any]:
        return collate_batch(self.processor, feats, skipped, prompt)


class _TrainStream(_Stream, EpochStream):
    """Infinite, reshuffled stream of right-padded training batches; each epoch is ``batches`` long.

    :meth:`features` is the same stream one parsed sample at a time (what a ``mix`` dataset interleaves).
    """

    def __init__(self, shards: list[str], processor: VLMProcessor, args: ShardDataset.Args, seed: int,
                 rank: int, batches: int, samples_per_worker: int, cache: CacheReader | None = None,
                 rewrite: Rewrite | None = None) -> None:
        super().__init__(shards, processor, args, cache, rewrite)
        self.seed = seed
        self.rank = rank
        self.batches = batches
        self.samples_per_worker = samples_per_worker
        self.bufsize = max(1, min(args.shuffle_buffer, samples_per_worker)) if args.shuffle_buffer > 0 else 0
        self._gen: Iterator[dict[str, Any]] | None = None
        self._pass_size: int | None = None  # raw samples in one pass over the worker's shards, once known

    def _samples(self, worker: int, workers: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        shards = self.shards[worker::workers]
        shuffle = self.bufsize > 0
        buf_rng = random.Random(f"vlkit-buffer:{self.seed}:{self.rank}:{worker}")
        buffer: list[tuple[str, str, dict[str, bytes]]] = []
        epoch = 0
        while True:
            order = list(shards)
            if shuffle:
                random.Random(f"vlkit-shards:{self.seed}:{self.rank}:{worker}:{epoch}").shuffle(order)
            read = 0
            for url in order:
                for sample in self._raw(url):
                    read += 1
                    if not shuffle:
                        yield sample
                        continue
                    buffer.append(sample)
                    if len(buffer) >= self.bufsize:
                        i = buf_rng.randrange(len(buffer))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()
            if read == 0:
                raise DataError(f"the shards {', '.join(shards)} hold no samples; {_HOW_TO_BUILD}")
            self._pass_size = read
            epoch += 1

    def features(self, worker: int, workers: int) -> Iterator[tuple[dict[str, Any], int]]:
        """The endless training samples of loader worker ``worker`` of ``workers``, parsed and tokenized:
        ``(features, samples skipped since the previous one)``. Collate with :func:`collate_batch`."""
        skipped = 0
        since_valid = 0
        last_reason = "filtered out by tasks"
        for url, key, files in self._samples(worker, workers):
            try:
                f = self._parse(url, key, files, prompt=False)
            except _BadSample as exc:
                self._skip(url, key, str(exc))
                skipped += 1
                since_valid += 1
                last_reason = f"{url}: sample {key}: {exc}"
                f = None
            if f is None:
                since_valid += 1
                # two whole passes over the worker's shards without one usable sample: nothing is usable
                if self._pass_size is not None and since_valid > 2 * self._pass_size + self.bufsize:
                    what = f" with task in {sorted(self.tasks)}" if self.tasks is not None else ""
                    raise DataError(f"no usable training sample{what} in {since_valid} consecutive samples of "
                                    f"{', '.join(self.shards)} (last problem: {last_reason})")
                continue
            since_valid = 0
            yield f, skipped
            skipped = 0

    def _batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        feats: list[dict[str, Any]] = []
        skipped = 0
        for f, skips in self.features(worker, workers):
            feats.append(f)
            skipped += skips
            if len(feats) == self.args.batch_size:
                yield self._collate(feats, skipped, prompt=False)
                feats, skipped = [], 0


class _ValStream(_Stream):
    """One pass, in order, over this reader's part of the validation set: left-padded prompt batches.

    The readers are every loader worker of every rank. With at least as many shards as readers, each reads
    whole shards; otherwise each reads every shard and keeps every ``readers``-th sample, so that a single
    validation shard is still evaluated by all ranks and no sample twice. ``max_samples`` caps the samples
    of all readers together.
    """

    def __init__(self, shards: list[str], processor: VLMProcessor, args: ShardDataset.Args,
                 max_samples: int | None, rank: int = 0, world_size: int = 1, rewrite: Rewrite | None = None
                 ) -> None:
        super().__init__(shards, processor, args, rewrite=rewrite)
        self.max_samples = max_samples
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        reader, readers = self.rank * workers + worker, self.world_size * workers
        cap = None
        if self.max_samples is not None:
            cap = self.max_samples // readers + (1 if reader < self.max_samples % readers else 0)
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        taken = 0
        feats: list[dict[str, Any]] = []
        skipped = 0
        index = -1
        for url in shards:
            for _, key, files in self._raw(url):
                if cap is not None and taken >= cap:
                    break
                index += 1
                if not by_shard and index % readers != reader:
                    continue
                try:
                    f = self._parse(url, key, files, prompt=True)
                except _BadSample as exc:
                    self._skip(url, key, str(exc))
                    skipped += 1
                    continue
                if f is None:
                    continue
                taken += 1
                feats.append(f)
                if len(feats) == self.args.batch_size:
                    yield self._collate(feats, skipped, prompt=True)
                    feats, skipped = [], 0
            if cap is not None and taken >= cap:
                break
        if feats:
            yield self._collate(feats, skipped, prompt=True)


# --------------------------------------------------------------------------------------------- dataset


def loader_arg_problems(args: Any) -> list[str]:
    """What is wrong with the loader arguments every dataset section takes (``batch_size``, ``num_workers``,
    ``max_length``, ``samples_per_epoch``), one message each."""
    problems = []
    if args.batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        problems.append(f"num_workers must be 0 or more, got {args.num_workers}")
    if args.max_length < 1:
        problems.append(f"max_length must be positive, got {args.max_length}")
    if args.samples_per_epoch is not None and args.samples_per_epoch < 1:
        problems.append(f"samples_per_epoch must be positive, got {args.samples_per_epoch}")
    return problems


class EpochCounts:
    """Epoch arithmetic and per-dataset tokenizing options shared by the training datasets: needs ``args``
    (with ``samples_per_epoch``, ``batch_size``, ``max_length``, ``train_on``) and ``num_samples()``."""

    args: Any

    def num_samples(self) -> int:  # pragma: no cover - implemented by each dataset
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        """``samples_per_epoch`` if set, else :meth:`num_samples`."""
        return self.args.samples_per_epoch or self.num_samples()

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Batches each rank yields per loader epoch: ``samples_per_epoch // (world_size * batch_size)``."""
        return max(1, self.samples_per_epoch() // (world_size * self.args.batch_size))

    def _processor(self, processor: VLMProcessor) -> VLMProcessor:
        """``processor`` with this dataset's ``max_length`` and ``train_on``."""
        return dataclasses.replace(processor, max_length=self.args.max_length, train_on=self.args.train_on)


@DATASETS.register("shards")
class ShardDataset(EpochCounts):
    """Webdataset tar shards of LLaVA-style conversations (``vlkit data demo`` / ``from-llava`` output)."""

    @dataclass
    class Args:
        urls: str
        """Shards: a brace pattern ``data/demo/train-{000000..000003}.tar`` or a glob ``data/demo/train-*.tar``
        (several joined with ``::``); relative paths resolve against the working directory."""
        batch_size: int = 32
        num_workers: int = 1
        """Data-loader worker processes per rank (0: load in the training process)."""
        shuffle_buffer: int = 1000
        """Samples held for shuffling (0: no shuffling of shards or samples)."""
        tasks: list[str] | None = None
        """Keep only samples whose JSON ``task`` is one of these (e.g. ``[caption]``)."""
        strict: bool = False
        """True: a corrupt sample raises an error naming shard and key; False: skip it and count it."""
        max_length: int = 512
        """Longest sample in tokens (visual tokens included); longer samples are skipped."""
        train_on: Literal["assistant", "last", "all"] = "assistant"
        """Which tokens train: every assistant turn, the last assistant turn, or every text token."""
        samples_per_epoch: int | None = None
        """Samples per loader epoch (default: the shards' sample count, from index.json or by counting)."""

        def __post_init__(self) -> None:
            problems = loader_arg_problems(self)
            if self.shuffle_buffer < 0:
                problems.append(f"shuffle_buffer must be 0 (no shuffling) or more, got {self.shuffle_buffer}")
            if self.tasks is not None and not self.tasks:
                problems.append("tasks must name at least one task (or be null for all)")
            if problems:
                raise RecipeError("; ".join(problems))

    def __init__(self, args: ShardDataset.Args) -> None:
        self.args = args
        self.shards = expand_urls(args.urls)
        self._num_samples: int | None = None
        self.feature_cache: CacheReader | None = None
        """When set, training batches carry the images' cached encoder streams instead of pixels."""

    def with_feature_cache(self, cache: CacheReader) -> ShardDataset:
        """A copy whose training loader reads each image's encoder streams from ``cache`` (see
        :mod:`vlkit.data.feature_cache`) instead of decoding it; validation still reads pixels."""
        other = copy.copy(self)
        other.feature_cache = cache
        return other

    def __repr__(self) -> str:
        return f"ShardDataset({self.args.urls!r}, {len(self.shards)} shards)"

    # ------------------------------------------------------------------------------------------- counts

    def num_samples(self) -> int:
        """Samples in the shards (after the ``tasks`` filter): from ``index.json`` when it has the counts,
        otherwise by reading the shards' JSON members (cached)."""
        if self._num_samples is None:
            counted = _count_from_index(self.shards, self.args.tasks)
            if counted is None:
                counted = sum(_count_shard(url, self.args.tasks) for url in self.shards)
            self._num_samples = counted
        return self._num_samples

    # ------------------------------------------------------------------------------------------ loaders

    def rank_shards(self, rank: int, world_size: int) -> list[str]:
        """The training shards of rank ``rank`` (raises :class:`DataError` when there are fewer than ranks)."""
        if len(self.shards) < world_size:
            raise DataError(f"{self.args.urls!r} has {len(self.shards)} shard(s) but training runs on "
                            f"{world_size} ranks; every rank needs at least one shard: write more, smaller "
                            "shards (e.g. `vlkit data demo --out DIR` writes 4) or train on fewer devices")
        return split_shards(self.shards, rank, world_size)

    def train_stream(self, processor: VLMProcessor, seed: int, rank: int, world_size: int, workers: int,
                     rewrite: Rewrite | None = None) -> _TrainStream:
        """The training stream of rank ``rank`` read by ``workers`` loader workers (at most
        ``len(rank_shards(...))``): whole batches when iterated, single samples through its ``features``
        method. ``rewrite`` transforms each sample's messages before tokenizing."""
        shards = self.rank_shards(rank, world_size)
        per_worker = self.samples_per_epoch() // (world_size * max(1, workers))
        return _TrainStream(shards, self._processor(processor), self.args, seed, rank,
                            self.batches_per_epoch(world_size), per_worker, self.feature_cache, rewrite)

    def val_stream(self, processor: VLMProcessor, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None, rewrite: Rewrite | None = None) -> _ValStream:
        """The validation stream :meth:`val_loader` reads (``rewrite`` as in :meth:`train_stream`)."""
        return _ValStream(self.shards, self._processor(processor), self.args, max_samples, rank, world_size,
                          rewrite)

    def val_workers(self, rank: int, world_size: int, max_samples: int | None) -> int:
        """Loader workers for validation: ``num_workers``, capped by the rank's shards and ``max_samples``."""
        workers = self.args.num_workers
        if len(self.shards) >= world_size:
            workers = min(workers, len(split_shards(self.shards, rank, world_size)))
        if max_samples is not None:
            workers = min(workers, max(1, max_samples // world_size))
        return workers

    def train_loader(self, processor: VLMProcessor, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> DataLoader:
        """Infinite training stream of right-padded batches for rank ``rank`` of ``world_size``.

        Each iteration over the loader (an epoch) yields exactly :meth:`batches_per_epoch` batches and the
        next continues the stream. A batch is the processor's collate output plus lists ``__key__``,
        ``__url__``, ``type`` and the int ``skipped`` (samples the worker skipped since its last batch).
        """
        workers = min(self.args.num_workers, len(self.rank_shards(rank, world_size)))
        return data_loader(self.train_stream(processor, seed, rank, world_size, workers), workers)

    def val_loader(self, processor: VLMProcessor, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> DataLoader:
        """One in-order pass of left-padded prompt batches over rank ``rank``'s part of the validation set.

        A batch is the prompt collate output plus lists ``answer``, ``type``, ``__key__``, ``__url__``,
        ``loss_batch`` (the whole conversations, right-padded with labels, for the validation loss) and the
        int ``skipped``. Ranks split the shards, or the samples when there are fewer shards than ranks;
        ``max_samples`` caps the samples of all ranks together.
        """
        stream = self.val_stream(processor, rank, world_size, max_samples)
        return data_loader(stream, self.val_workers(rank, world_size, max_samples))

    # ------------------------------------------------------------------------------------------ answers

    def iter_answers(self, limit: int | None = None) -> Iterator[tuple[str | None, str]]:
        """``(question type, assistant answer)`` pairs, reading only the JSON members (no image decoding).

        One pair per sample (its ``type`` and final answer), or one per assistant turn when the sample
        lists ``types`` for each turn. ``limit`` caps the number of samples read. Bad samples are skipped.
        """
        seen = 0
        for url in self.shards:
            try:
                for _, files in iter_tar_samples(url, json_only=True):
                    if limit is not None and seen >= limit:
                        return
                    try:
                        meta = _read_meta(files)
                    except _BadSample:
                        continue
                    if self.args.tasks is not None and meta.get("task") not in self.args.tasks:
                        continue
                    conv = meta.get("conversations")
                    answers = _answers(conv) if isinstance(conv, list) else []
                    if not answers:
                        continue
                    seen += 1
                    types = meta.get("types")
                    if isinstance(types, list) and len(types) == len(answers):
                        for qtype, answer in zip(types, answers):
                            yield (qtype if isinstance(qtype, str) else None), answer
                    else:
                        qtype = meta.get("type")
                        yield (qtype if isinstance(qtype, str) else None), answers[-1]
            except (tarfile.TarError, OSError, EOFError) as exc:
                if self.args.strict:
                    raise DataError(f"{url}: unreadable tar shard ({exc})") from exc


def _load_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("splits"), dict) else None


def _count_from_index(shards: Sequence[str], tasks: Sequence[str] | None) -> int | None:
    """Sum of the shards' sample counts as recorded in the ``index.json`` next to them, or None."""
    total = 0
    by_folder: dict[Path, list[str]] = {}
    for url in shards:
        p = Path(url).resolve()
        by_folder.setdefault(p.parent, []).append(p.name)
    for folder, names in by_folder.items():
        index = _load_index(folder)
        if index is None:
            return None
        counts: dict[str, int] = {}
        for split in index["splits"].values():
            if not isinstance(split, dict):
                continue
            listed = [str(s) for s in split.get("shards", [])]
            per_shard = split.get("shard_samples")
            per_task = split.get("shard_tasks")
            for i, name in enumerate(listed):
                if tasks is not None:
                    if isinstance(per_task, list) and i < len(per_task) and isinstance(per_task[i], dict):
                        counts[name] = sum(int(per_task[i].get(t, 0)) for t in tasks)
                elif isinstance(per_shard, list) and i < len(per_shard):
                    counts[name] = int(per_shard[i])
            if (tasks is None and not isinstance(per_shard, list) and sorted(listed) == sorted(names)
                    and "samples" in split):
                # only the split's total is known: it fits when the urls name exactly the split's shards
                counts.update({n: 0 for n in names})
                counts[names[0]] = int(split["samples"])
        if any(n not in counts for n in names):
            return None
        total += sum(counts[n] for n in names)
    return total


def _count_shard(url: str, tasks: Sequence[str] | None) -> int:
    """Samples with a JSON member in one shard (with ``task`` in ``tasks`` when given)."""
    n = 0
    try:
        for _, files in iter_tar_samples(url, json_only=True):
            if "json" not in files:
                continue
            if tasks is not None:
                try:
                    if _read_meta(files).get("task") not in tasks:
                        continue
                except _BadSample:
                    continue
            n += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{url}: unreadable tar shard ({exc}); fix or remove it") from exc
    return n


# ---------------------------------------------------------------------------------------------- writing


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out`` for a new dataset. A non-empty folder is refused unless ``overwrite``; then its
    ``index.json`` is removed first (so a crash never leaves an old index over new shards), followed by
    the shards and ``tokenizer/`` of the previous dataset. Other files are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} is not empty; pass --overwrite (overwrite=True) to replace the dataset "
                            "there, or choose another output folder")
        (out / INDEX_FILE).unlink(missing_ok=True)
        for pattern in ("*.tar", "*.tar.tmp", ".tokenizer.tmp"):
            for p in out.glob(pattern):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if (out / "tokenizer").is_dir():
            shutil.rmtree(out / "tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    return out


def sample_key(text: str, used: set[str]) -> str:
    """A webdataset-safe, unique sample key from ``text`` (no dots or slashes)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "sample"
    if key.startswith("__"):
        key = key.lstrip("_") or "sample"
    base, i = key, 1
    while key in used:
        key = f"{base}_{i}"
        i += 1
    used.add(key)
    return key


class SplitWriter:
    """Writes one split as ``{split}-000000.tar``, ... with ``shard_size`` samples each.

    Shards are written under a ``.tmp`` name and renamed when complete; :meth:`close` returns the split's
    ``index.json`` entry (shards, samples, per-shard sample and task counts, per-type counts).
    """

    def __init__(self, out: Path, split: str, shard_size: int) -> None:
        if shard_size < 1:
            raise DataError(f"shard_size must be at least 1, got {shard_size}")
        self.out = Path(out)
        self.split = split
        self.shard_size = shard_size
        self.shards: list[str] = []
        self.shard_samples: list[int] = []
        self.shard_tasks: list[dict[str, int]] = []
        self.types: Counter[str] = Counter()
        self._writer: Any = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f"{name}.tmp"
        # an int mtime: a float one makes tarfile add a 1 KiB PAX header to every member
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=_MTIME)
        self.shards.append(name)
        self.shard_samples.append(0)
        self.shard_tasks.append({})

    def _finish(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            self._tmp.replace(self.out / self.shards[-1])
            self._writer = None

    def write(self, key: str, meta: dict[str, Any], image: bytes | None = None, ext: str = "png") -> None:
        """Add one sample: its JSON ``meta`` and, optionally, encoded image bytes with extension ``ext``."""
        if self._writer is None or self.shard_samples[-1] >= self.shard_size:
            self._finish()
            self._open()
        sample: dict[str, Any] = {"__key__": key,
                                  "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()}
        if image is not None:
            sample[ext] = image
        self._writer.write(sample)
        self.shard_samples[-1] += 1
        task = meta.get("task")
        if isinstance(task, str):
            self.shard_tasks[-1][task] = self.shard_tasks[-1].get(task, 0) + 1
        types = meta.get("types") if isinstance(meta.get("types"), list) else [meta.get("type")]
        self.types.update(t for t in types if isinstance(t, str))

    def abort(self) -> None:
        """Stop after an error: close and delete the shard being written (finished shards stay)."""
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None

    def close(self) -> dict[str, Any]:
        """Finish the last shard and return this split's index entry."""
        self._finish()
        return {"shards": list(self.shards), "samples": sum(self.shard_samples),
                "shard_samples": list(self.shard_samples), "shard_tasks": [dict(t) for t in self.shard_tasks],
                "types": dict(sorted(self.types.items()))}


def write_index(out: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically (it marks the dataset complete, so write it last)."""
    tmp = Path(out) / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(Path(out) / INDEX_FILE)


__all__ = ["IMAGE_EXTENSIONS", "EpochStream", "Rewrite", "ShardDataset", "SplitWriter", "collate_batch",
           "data_loader", "expand_urls", "iter_tar_samples", "prepare_out_dir", "sample_key", "split_shards",
           "write_index"]
