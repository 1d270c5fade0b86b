"""The ``shards`` dataset: webdataset tar shards of ``KEY.json`` (+ ``KEY.png`` / ``KEY.jpg``) samples.

Every sample's JSON holds LLaVA-style ``conversations`` and optionally a question ``type`` (for
per-type accuracy), a ``task`` (e.g. ``vqa``, ``caption``; see ``tasks:``) and ``types`` (one question
type per assistant turn of a multi-turn sample). A dataset folder also has ``index.json``::

    {"splits": {"train": {"shards": ["train-000000.tar", ...], "samples": N,
                          "shard_samples": [n0, ...], "shard_tasks": [{"vqa": n, ...}, ...]}, ...}}

(``shard_samples`` and ``shard_tasks`` are optional; they let a subset of shards, or a task filter, be
counted without reading the shards, and a truncated shard be recognised). Reading is
:mod:`vlkit.data.reading` (webdataset's pipeline), writing :mod:`vlkit.data.writing`.

Training streams are infinite: shards are split across ranks (shard ``i`` goes to rank
``i % world_size``) and then across data-loader workers; each pass over a worker's shards has its own
shard order and shuffle-buffer seed derived from ``seed`` and the pass number, and every loader "epoch"
yields exactly ``samples_per_epoch // (world_size * batch_size)`` batches so that distributed ranks stay
in step. The stream's position (the next sample of each worker) is saved in checkpoints, so a resumed
run continues with exactly the samples an uninterrupted one would read. Corrupt samples, and what is lost
of an unreadable shard, are skipped and counted in each batch's ``skipped`` (or raise
:class:`~vlkit.errors.DataError` with ``strict: true``).

Other datasets can build on these streams (the ``mix`` dataset does): :meth:`ShardDataset.train_stream`
gives a rank's stream, whose ``features`` method yields single parsed samples, with an optional
``rewrite`` of each sample's messages before tokenizing; :func:`collate_batch` and
:func:`~vlkit.data.reading.data_loader` make batches and loaders of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import IterableDataset

from vlkit.data.base import Dataset, EpochCounts, ShardSource
from vlkit.data.conversation import Message, messages_from_llava
from vlkit.data.feature_cache import CacheReader
from vlkit.data.packing import PackingArgs, check_packing
from vlkit.data.processor import VLMProcessor
from vlkit.data.reading import (
    ERROR_KEY,
    HOW_TO_BUILD,
    IMAGE_EXTENSIONS,
    INDEX_FILE,
    LOST_KEY,
    TAR_ERRORS,
    BadSample,
    EpochStream,
    Loader,
    Position,
    SampleSource,
    SkipReporter,
    answers,
    carry_errors,
    check_conversations,
    count_samples,
    data_loader,
    decode_image,
    expand_urls,
    image_bytes,
    indexed_counts,
    iter_tar_samples,
    read_meta,
    reader_split,
    share,
    split_shards,
    worker_info,
)
from vlkit.data.writing import SplitWriter, prepare_out_dir, sample_key, write_index
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS

# former private names, still imported by the feature cache and tests
_BadSample = BadSample
_decode_image = decode_image
_image_bytes = image_bytes

Rewrite = Callable[[list[Message]], list[Message]]
"""Applied to a sample's messages before tokenizing (e.g. the ``mix`` dataset's task instruction); must be
picklable (loader workers) and may raise :class:`~vlkit.errors.DataError` to skip the sample."""


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
        batch = processor.train_batch(feats)  # padded, or packed with data.train.packing
    batch["skipped"] = skipped
    return batch


class _Parser:
    """Turns one raw webdataset sample into features (runs inside loader workers)."""

    def __init__(self, processor: VLMProcessor, args: ShardDataset.Args, cache: CacheReader | None = None,
                 rewrite: Rewrite | None = None) -> None:
        self.processor = processor
        self.args = args
        self.cache = cache
        self.rewrite = rewrite
        self.tasks = set(args.tasks) if args.tasks is not None else None
        self.report = SkipReporter(args.strict)

    def __call__(self, sample: dict[str, Any], prompt: bool) -> dict[str, Any] | None:
        """Features of one sample, ``None`` if the task filter drops it; raises :class:`BadSample`."""
        url, key = sample["__url__"], sample["__key__"]
        if ERROR_KEY in sample:
            raise BadSample(sample[ERROR_KEY])
        meta = read_meta(sample)
        if self.tasks is not None and meta.get("task") not in self.tasks:
            return None
        conv = check_conversations(meta)
        try:
            messages: list[Message] = messages_from_llava(conv)
            if self.rewrite is not None:
                messages = self.rewrite(messages)
            if self.cache is not None:
                image = self.cache.lookup(url, key, image_bytes(sample))
                if isinstance(image, str):
                    raise BadSample(image)
            else:
                image = decode_image(sample)
            if prompt:
                if messages[-1].role != "assistant":
                    raise BadSample("the conversation does not end with an assistant answer to evaluate")
                feats = self.processor.prompt_features(messages, image)
                train = self.processor.train_features(messages, image)
                train["pixel_values"] = None  # the batch's stacked images are shared with the loss batch
                feats["loss"] = train
            else:
                feats = self.processor.train_features(messages, image)
        except RecipeError:
            raise  # a configuration problem (e.g. the chat template), not a bad sample
        except DataError as exc:
            raise BadSample(str(exc)) from None
        qtype = meta.get("type")
        feats.update({"__key__": key, "__url__": url, "type": qtype if isinstance(qtype, str) else None})
        return feats

    def skip(self, sample: dict[str, Any], reason: str) -> int:
        """Report a skipped sample (raises under strict); the number of samples it stands for."""
        self.report(sample["__url__"], sample["__key__"], reason)
        return int(sample.get(LOST_KEY, 1))


class _TrainStream(EpochStream):
    """Infinite, reshuffled stream of right-padded training batches; each epoch is ``batches`` long.

    :meth:`features` is the same stream one parsed sample at a time (what a ``mix`` dataset interleaves).
    """

    def __init__(self, shards: list[str], parser: _Parser, args: ShardDataset.Args, seed: int, rank: int,
                 batches: int, workers: int, samples_per_worker: int, expected: dict[str, int]) -> None:
        super().__init__(batches, workers)
        self.shards = shards
        self.parser = parser
        self.args = args
        self.seed = seed
        self.rank = rank
        self.expected = expected
        self.bufsize = max(1, min(args.shuffle_buffer, samples_per_worker)) if args.shuffle_buffer > 0 else 0

    def source(self, worker: int, workers: int) -> SampleSource:
        """The raw samples of logical worker ``worker`` of ``workers``: its share of the rank's shards."""
        return SampleSource(self.shards[worker::workers], f"{self.seed}:{self.rank}:{worker}", self.bufsize,
                            self.args.strict, self.expected)

    def features(self, worker: int, workers: int, state: Any = None
                 ) -> Iterator[tuple[dict[str, Any], int, list[int]]]:
        """The endless training samples of logical worker ``worker`` of ``workers`` from position ``state``,
        parsed and tokenized: ``(features, samples skipped since the previous one, position after it)``."""
        source = self.source(worker, workers)
        skipped = since_valid = 0
        pass_size: int | None = None
        current, last_taken = None, 0
        last_reason = "filtered out by tasks"
        for sample, pos in source.samples(Position.from_state(state)):
            if current is not None and pos.pass_ != current:
                pass_size = last_taken
            current, last_taken = pos.pass_, pos.taken
            try:
                f = self.parser(sample, prompt=False)
            except BadSample as exc:
                skipped += self.parser.skip(sample, str(exc))
                last_reason = f"{sample['__url__']}: sample {sample['__key__']}: {exc}"
                f = None
            if f is None:
                since_valid += 1
                # two whole passes over the worker's shards without one usable sample: nothing is usable
                if pass_size is not None and since_valid > 2 * pass_size:
                    what = f" with task in {sorted(self.parser.tasks)}" if self.parser.tasks is not None else ""
                    raise DataError(f"no usable training sample{what} in {since_valid} consecutive samples of "
                                    f"{', '.join(source.shards)} (last problem: {last_reason})")
                continue
            since_valid = 0
            yield f, skipped, pos.to_state()
            skipped = 0

    def _batches(self, worker: int, workers: int, state: Any) -> Iterator[tuple[dict[str, Any], Any]]:
        feats: list[dict[str, Any]] = []
        skipped = 0
        for f, skips, pos in self.features(worker, workers, state):
            feats.append(f)
            skipped += skips
            if len(feats) == self.args.batch_size:
                yield collate_batch(self.parser.processor, feats, skipped, prompt=False), pos
                feats, skipped = [], 0


class _ValStream(IterableDataset):
    """One pass, in order, over this reader's part of the validation set: left-padded prompt batches.

    The readers are every loader worker of every rank. With at least as many shards as readers, each reads
    whole shards; otherwise each reads every shard and keeps every ``readers``-th sample, so that a single
    validation shard is still evaluated by all ranks and no sample twice. ``max_samples`` caps the samples
    of all readers together.
    """

    def __init__(self, shards: list[str], parser: _Parser, args: ShardDataset.Args, max_samples: int | None,
                 rank: int, world_size: int, expected: dict[str, int]) -> None:
        super().__init__()
        self.shards = shards
        self.parser = parser
        self.args = args
        self.max_samples = max_samples
        self.rank, self.world_size = rank, world_size
        self.expected = expected

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return carry_errors(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_info()
        reader, readers = self.rank * workers + worker, self.world_size * workers
        cap = None if self.max_samples is None else share(self.max_samples, readers, reader)
        shards, stride, offset = reader_split(self.shards, reader, readers)
        source = SampleSource(shards, "val", 0, self.args.strict, self.expected, stride, offset)
        taken = skipped = 0
        feats: list[dict[str, Any]] = []
        done: dict[str, Any] | None = None  # held back, so that skips after the last batch are counted in it
        for sample in source.one_pass(0):
            if cap is not None and taken >= cap:
                break
            try:
                f = self.parser(sample, prompt=True)
            except BadSample as exc:
                skipped += self.parser.skip(sample, str(exc))
                continue
            if f is None:
                continue
            taken += 1
            feats.append(f)
            if len(feats) == self.args.batch_size:
                if done is not None:
                    yield done
                done = collate_batch(self.parser.processor, feats, skipped, prompt=True)
                feats, skipped = [], 0
        if feats:
            if done is not None:
                yield done
            done = collate_batch(self.parser.processor, feats, skipped, prompt=True)
        elif done is not None:
            done["skipped"] += skipped
        if done is not None:
            yield done


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


@DATASETS.register("shards")
class ShardDataset(Dataset):
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
        """True: a corrupt sample or shard raises an error naming shard and key; False: skip it and count it."""
        max_length: int = 512
        """Longest sample in tokens (visual tokens included); longer samples follow ``overflow``."""
        train_on: Literal["assistant", "last", "all"] = "assistant"
        """Which tokens train: every assistant turn, the last assistant turn, or every text token."""
        overflow: Literal["skip", "truncate"] = "skip"
        """Samples over ``max_length``: ``skip`` (counted), or ``truncate`` the text after the last image
        block (keeping at least one trained token; an image block is never cut)."""
        samples_per_epoch: int | None = None
        """Samples per loader epoch (default: the shards' sample count, from index.json or by counting)."""
        packing: PackingArgs | None = None
        """``{max_tokens: N}``: pack each training batch's samples into rows of at most N tokens (N >=
        max_length; see :mod:`vlkit.data.packing`); null: pad every sample to the batch's longest."""

        def __post_init__(self) -> None:
            check_packing(self.packing, self.max_length)
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
        self._expected: dict[str, int] | None = None
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

    def shard_sources(self) -> list[ShardSource]:
        return [ShardSource(list(self.shards), tasks=self.args.tasks)]

    # ------------------------------------------------------------------------------------------- counts

    def num_samples(self) -> int:
        """Samples in the shards (after the ``tasks`` filter): from ``index.json`` when it has the counts,
        otherwise by reading the shards' JSON members (cached)."""
        if self._num_samples is None:
            self._num_samples = count_samples(self.shards, self.args.tasks)
        return self._num_samples

    def expected_samples(self) -> dict[str, int]:
        """Raw sample count of each shard that ``index.json`` lists (to recognise truncated shards)."""
        if self._expected is None:
            self._expected = indexed_counts(self.shards)
        return self._expected

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
        parser = _Parser(self._processor(processor), self.args, self.feature_cache, rewrite)
        return _TrainStream(shards, parser, self.args, seed, rank, self.batches_per_epoch(world_size), workers,
                            per_worker, self.expected_samples())

    def val_stream(self, processor: VLMProcessor, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None, rewrite: Rewrite | None = None) -> _ValStream:
        """The validation stream :meth:`val_loader` reads (``rewrite`` as in :meth:`train_stream`)."""
        parser = _Parser(self._processor(processor), self.args, rewrite=rewrite)
        return _ValStream(self.shards, parser, self.args, max_samples, rank, world_size, self.expected_samples())

    def val_workers(self, rank: int, world_size: int, max_samples: int | None) -> int:
        """Loader workers for validation: ``num_workers``, capped by the rank's shards and ``max_samples``."""
        workers = self.args.num_workers
        if len(self.shards) >= world_size:
            workers = min(workers, len(split_shards(self.shards, rank, world_size)))
        if max_samples is not None:
            workers = min(workers, max(1, max_samples // world_size))
        return workers

    def train_loader(self, processor: VLMProcessor, *, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> Loader:
        """Infinite training stream of right-padded batches for rank ``rank`` of ``world_size``.

        Each iteration over the loader (an epoch) yields exactly :meth:`batches_per_epoch` batches and the
        next continues the stream. A batch is the processor's collate output plus lists ``__key__``,
        ``__url__``, ``type``, the int ``skipped`` (samples the worker skipped since its last batch) and
        the stream position after it.
        """
        workers = min(self.args.num_workers, len(self.rank_shards(rank, world_size)))
        return data_loader(self.train_stream(processor, seed, rank, world_size, workers), workers)

    def val_loader(self, processor: VLMProcessor, *, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> Loader:
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
                        meta = read_meta(files)
                    except BadSample:
                        continue
                    if self.args.tasks is not None and meta.get("task") not in self.args.tasks:
                        continue
                    conv = meta.get("conversations")
                    found = answers(conv) if isinstance(conv, list) else []
                    if not found:
                        continue
                    seen += 1
                    types = meta.get("types")
                    if isinstance(types, list) and len(types) == len(found):
                        for qtype, answer in zip(types, found):
                            yield (qtype if isinstance(qtype, str) else None), answer
                    else:
                        qtype = meta.get("type")
                        yield (qtype if isinstance(qtype, str) else None), found[-1]
            except TAR_ERRORS as exc:
                if self.args.strict:
                    raise DataError(f"{url}: unreadable tar shard ({exc})") from exc


__all__ = ["HOW_TO_BUILD", "IMAGE_EXTENSIONS", "INDEX_FILE", "EpochCounts", "EpochStream", "Rewrite",
           "ShardDataset", "SplitWriter", "collate_batch", "data_loader", "expand_urls", "iter_tar_samples",
           "loader_arg_problems", "prepare_out_dir", "sample_key", "split_shards", "write_index"]
