"""The ``mix`` dataset: several datasets sampled by weight, each a task with its own instruction (SPHINX).

A recipe lists the member datasets, each a dataset section (``name`` defaults to ``shards``) plus three keys::

    data:
      train:
        name: mix
        batch_size: 32
        datasets:
          - {task: vqa, weight: 0.8, instruction: vqa, urls: "data/demo/train-{000000..000003}.tar"}
          - {task: box, weight: 0.2, instruction: detection, urls: "data/demo/box-000000.tar"}

- ``task``: the task name every sample of that dataset carries in the batch's ``task`` list (and that the
  mix-level ``tasks:`` selects on, e.g. in a stage's ``data`` override).
- ``weight`` (> 0, default 1): sampling weight; the weights are normalised over the selected datasets.
- ``instruction``: a built-in name from :data:`INSTRUCTIONS` (``vqa``, ``refer``, ``detection``), free text
  (anything with a space in it: a single word that is not a built-in name is refused as a likely typo), or
  null for none. It is appended to the first user turn of every sample (``"<question>\\n<instruction>"``,
  as in LLaVA-1.5 / SPHINX), so it is prompt: its tokens never train, the answers do.

``batch_size``, ``num_workers``, ``max_length``, ``train_on``, ``samples_per_epoch`` and ``packing`` belong to the mix
(a batch draws from every dataset); per-dataset values are refused. Other keys (``urls``, ``tasks``,
``shuffle_buffer``, ``strict``) are the member's own.

Training: every sample of a batch comes from a dataset drawn by weight with a RNG seeded by (seed, rank,
loader worker), so the stream is deterministic for a seed and infinite; each member dataset streams its own
shards (split across ranks, reshuffled, skipping corrupt samples) as it does alone. Loader workers are
capped by the member with the fewest shards per rank. An epoch is ``samples_per_epoch`` (default: all
members' samples) // (ranks * batch_size) batches. Validation reads each member in turn, with its
instruction, ``max_samples`` split by weight.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import IterableDataset

from vlkit.data.base import Dataset, ShardSource
from vlkit.data.conversation import Message
from vlkit.data.packing import PackingArgs, check_packing
from vlkit.data.processor import VLMProcessor
from vlkit.data.reading import EpochStream, Loader, data_loader
from vlkit.data.shards import collate_batch, loader_arg_problems
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS

INSTRUCTIONS: dict[str, str] = {
    "vqa": "Answer the question using a single word or phrase.",
    "refer": "Please provide the bounding box coordinate of the region this sentence describes.",
    "detection": "Answer with the bounding box of the object as [x0, y0, x1, y1], coordinates normalised to "
                 "[0, 1] with 2 decimals.",
}
"""Built-in task instructions (LLaVA-1.5 / SPHINX style), by the name a recipe's ``instruction:`` uses."""

MIX_KEYS: tuple[str, ...] = ("batch_size", "num_workers", "max_length", "train_on", "samples_per_epoch", "packing")
"""Options set once for the whole mix; a member dataset section may not set them."""
_ENTRY_KEYS: tuple[str, ...] = ("task", "weight", "instruction")
_INHERITED: tuple[str, ...] = ("batch_size", "num_workers", "max_length", "train_on")
_MEMBER_INTERFACE: tuple[str, ...] = ("rank_shards", "train_stream", "val_stream", "val_workers", "iter_answers",
                                      "num_samples")


def resolve_instruction(value: str | None, where: str = "instruction") -> str | None:
    """The text of ``instruction:``: a built-in name's text, free text as is, or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise RecipeError(f"{where} is empty; name a built-in instruction ({', '.join(INSTRUCTIONS)}), write "
                          "one as text, or set null for none")
    if text in INSTRUCTIONS:
        return INSTRUCTIONS[text]
    if not any(c.isspace() for c in text):
        close = difflib.get_close_matches(text, list(INSTRUCTIONS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}: unknown instruction {text!r}.{hint} Built-in instructions: "
                          f"{', '.join(INSTRUCTIONS)}; free text must be a phrase (with spaces)")
    return text


@dataclass(frozen=True)
class AppendInstruction:
    """Appends ``text`` to the first user turn of a conversation (``"<question>\\n<text>"``)."""

    text: str

    def __call__(self, messages: list[Message]) -> list[Message]:
        first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        if first is None:
            raise DataError("the conversation has no user turn to append the task instruction to")
        m = messages[first]
        out = list(messages)
        out[first] = Message(m.role, f"{m.content.rstrip()}\n{self.text}", m.trainable)
        return out


@dataclass
class _Member:
    """One parsed ``datasets`` entry."""

    task: str
    weight: float
    instruction: str | None
    """The resolved instruction text."""
    section: dict[str, Any]
    """The member's own dataset section, with the mix-level options filled in."""


def _parse_entry(entry: Any, i: int, mix: MixDataset.Args) -> tuple[dict[str, Any], _Member]:
    """Validate ``datasets[i]``: (its complete recipe form, the parsed member)."""
    where = f"datasets[{i}]"
    if not isinstance(entry, dict):
        raise RecipeError(f"{where} must be a mapping with task, weight, instruction and the dataset's keys "
                          f"(e.g. urls), got {entry!r}")
    task = entry.get("task")
    if not isinstance(task, str) or not task.strip():
        raise RecipeError(f"{where}.task is required: the task name of this dataset's samples (e.g. vqa), "
                          f"got {task!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RecipeError(f"{where}.weight must be a positive number, got {weight!r}")
    if weight <= 0:
        raise RecipeError(f"{where}.weight must be > 0, got {weight}")
    instruction = entry.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise RecipeError(f"{where}.instruction must be a built-in name ({', '.join(INSTRUCTIONS)}), text or "
                          f"null, got {instruction!r}")
    text = resolve_instruction(instruction, f"{where}.instruction")

    name = entry.get("name", "shards")
    try:
        cls = DATASETS.get(name) if isinstance(name, str) else None
    except RecipeError as exc:
        raise RecipeError(f"{where}.name: {exc.message}") from None
    if cls is None or not all(hasattr(cls, m) for m in _MEMBER_INTERFACE) or \
            getattr(cls, "objective", "lm") != "lm":
        raise RecipeError(f"{where}.name: dataset {name!r} cannot be part of a mix (a member streams single "
                          "conversation samples, like `shards`)")
    fields = [f.name for f in dataclasses.fields(cls.Args) if f.init]
    own = [f for f in fields if f not in MIX_KEYS]
    for key in entry:
        if key in MIX_KEYS:
            raise RecipeError(f"{where}.{key}: set {key} once for the whole mix (data.*.{key}), not per dataset: "
                              "a batch draws its samples from every dataset")
        if key not in (*_ENTRY_KEYS, "name", *own):
            close = difflib.get_close_matches(str(key), [*_ENTRY_KEYS, *own], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}.{key}: unknown key.{hint} Valid keys here: "
                              f"{', '.join([*_ENTRY_KEYS, 'name', *own])}")
    body = {k: v for k, v in entry.items() if k not in (*_ENTRY_KEYS, "name")}
    section = {"name": name, **body, **{k: getattr(mix, k) for k in _INHERITED if k in fields}}
    try:
        args = DATASETS.parse_args(section, where)
    except RecipeError as exc:
        raise RecipeError(str(exc)) from None  # keep the entry's path in the message
    complete = {"task": task, "weight": float(weight), "instruction": instruction, "name": name,
                **{k: v for k, v in dataclasses.asdict(args).items() if k not in MIX_KEYS}}
    return complete, _Member(task, float(weight), text, section)


def _split(total: int | None, weights: Sequence[float]) -> list[int | None]:
    """``total`` split by ``weights`` (largest remainder; the parts sum to ``total``); None stays None."""
    if total is None:
        return [None] * len(weights)
    exact = [total * w for w in weights]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda j: parts[j] - exact[j])[:total - sum(parts)]:
        parts[i] += 1
    return parts


class _MixStream(EpochStream):
    """Training batches whose samples are drawn one by one from the members' streams, by weight.

    A logical worker's position is the number of batches it made (its member draws are replayed from the
    seed) and the position of each member stream."""

    def __init__(self, streams: list[Any], tasks: list[str], weights: list[float], processor: VLMProcessor,
                 batch_size: int, seed: int, rank: int, batches: int, workers: int) -> None:
        super().__init__(batches, workers)
        self.streams = streams
        self.tasks = tasks
        self.weights = weights
        self.processor = processor
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank

    def _batches(self, worker: int, workers: int, state: Any) -> Iterator[tuple[dict[str, Any], Any]]:
        made, positions = (int(state[0]), list(state[1])) if state else (0, [None] * len(self.streams))
        rng = random.Random(f"vlkit-mix:{self.seed}:{self.rank}:{worker}")
        members = range(len(self.streams))
        for _ in range(made):  # replay the draws of the batches made before the saved position
            rng.choices(members, weights=self.weights, k=self.batch_size)
        sources = [s.features(worker, workers, pos) for s, pos in zip(self.streams, positions)]
        while True:
            feats, skipped = [], 0
            for i in rng.choices(members, weights=self.weights, k=self.batch_size):
                f, skips, positions[i] = next(sources[i])
                f["task"] = self.tasks[i]
                feats.append(f)
                skipped += skips
            made += 1
            yield collate_batch(self.processor, feats, skipped, prompt=False), [made, list(positions)]


class _MixValStream(IterableDataset):
    """The members' validation streams one after the other, each batch tagged with its task."""

    def __init__(self, streams: list[IterableDataset], tasks: list[str]) -> None:
        super().__init__()
        self.streams = streams
        self.tasks = tasks

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for stream, task in zip(self.streams, self.tasks):
            for batch in stream:
                if "input_ids" not in batch:  # a member's error, carried out of a loader worker
                    yield batch
                    return
                batch["task"] = [task] * int(batch["input_ids"].shape[0])
                yield batch


@DATASETS.register("mix")
class MixDataset(Dataset):
    """Several datasets sampled by weight, each a named task with its own instruction (see the module)."""

    @dataclass
    class Args:
        datasets: list[dict[str, Any]]
        """The member datasets: each a dataset section (``name`` defaults to ``shards``) plus ``task``,
        ``weight`` (> 0, default 1) and ``instruction`` (built-in name, free text or null)."""
        batch_size: int = 32
        num_workers: int = 1
        """Data-loader worker processes per rank (capped by the member with the fewest shards per rank)."""
        max_length: int = 512
        """Longest sample in tokens (visual tokens and instruction included); longer samples are skipped."""
        train_on: Literal["assistant", "last", "all"] = "assistant"
        samples_per_epoch: int | None = None
        """Samples per loader epoch (default: the members' samples together)."""
        tasks: list[str] | None = None
        """Keep only the member datasets with these ``task`` names (e.g. in a stage's ``data`` override)."""
        packing: PackingArgs | None = None
        """``{max_tokens: N}``: pack each batch's samples into rows of at most N tokens (:mod:`vlkit.data.packing`)."""

        def __post_init__(self) -> None:
            check_packing(self.packing, self.max_length)
            problems = loader_arg_problems(self)
            if problems:
                raise RecipeError("; ".join(problems))
            if not self.datasets:
                raise RecipeError("datasets must list at least one dataset, e.g. "
                                  "[{task: vqa, weight: 1, instruction: vqa, urls: 'DIR/train-*.tar'}]")
            parsed = [_parse_entry(entry, i, self) for i, entry in enumerate(self.datasets)]
            self.datasets = [complete for complete, _ in parsed]
            known = [m.task for _, m in parsed]
            if self.tasks is not None:
                if not self.tasks:
                    raise RecipeError("tasks must name at least one task (or be null for all)")
                unknown = [t for t in self.tasks if t not in known]
                if unknown:
                    raise RecipeError(f"tasks: no dataset of this mix has task {unknown[0]!r} (its tasks: "
                                      f"{', '.join(dict.fromkeys(known))})")
            self._members = [m for _, m in parsed if self.tasks is None or m.task in self.tasks]

        @property
        def members(self) -> list[_Member]:
            """The selected member datasets (after ``tasks``), parsed."""
            return self._members

    def __init__(self, args: MixDataset.Args) -> None:
        self.args = args
        members = args.members
        self.tasks = [m.task for m in members]
        total = sum(m.weight for m in members)
        self.weights = [m.weight / total for m in members]
        """Normalised sampling weights, one per member."""
        self.instructions = [m.instruction for m in members]
        self.datasets = [DATASETS.build(m.section, f"datasets[{i}]") for i, m in enumerate(members)]
        self.shards = list(dict.fromkeys(url for d in self.datasets for url in d.shards))
        """Every member's shards (e.g. for the feature cache)."""

    def __repr__(self) -> str:
        parts = ", ".join(f"{t}: {w:.2f}" for t, w in zip(self.tasks, self.weights))
        return f"MixDataset({parts}; {len(self.shards)} shards)"

    def _rewrites(self) -> list[AppendInstruction | None]:
        return [AppendInstruction(t) if t is not None else None for t in self.instructions]

    def with_feature_cache(self, cache: Any) -> MixDataset:
        """A copy whose members' training loaders read cached encoder streams (see ``ShardDataset``)."""
        other = copy.copy(self)
        try:
            other.datasets = [d.with_feature_cache(cache) for d in self.datasets]
        except AttributeError:
            raise RecipeError("a dataset of this mix cannot read a feature cache; remove data.feature_cache",
                              "data.feature_cache") from None
        return other

    def shard_sources(self) -> list[ShardSource]:
        """Each member's shards, with its task instruction."""
        return [dataclasses.replace(source, rewrite=rewrite) for d, rewrite in zip(self.datasets, self._rewrites())
                for source in d.shard_sources()]

    # ------------------------------------------------------------------------------------------- counts

    def num_samples(self) -> int:
        """Samples of all members together."""
        return sum(d.num_samples() for d in self.datasets)

    # ------------------------------------------------------------------------------------------ loaders

    def train_loader(self, processor: VLMProcessor, *, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> Loader:
        """Infinite training stream for rank ``rank`` of ``world_size``: batches of ``batch_size`` samples,
        each from a member drawn by weight; the keys of a ``shards`` batch plus a ``task`` list."""
        per_rank = []
        for task, d in zip(self.tasks, self.datasets):
            try:
                per_rank.append(d.rank_shards(rank, world_size))
            except DataError as exc:
                raise DataError(f"mix dataset {task!r}: {exc}") from None
        workers = min(self.args.num_workers, *(len(s) for s in per_rank))
        streams = [d.train_stream(processor, zlib.crc32(f"vlkit-mix:{seed}:{i}".encode()), rank, world_size,
                                  workers, rewrite)
                   for i, (d, rewrite) in enumerate(zip(self.datasets, self._rewrites()))]
        stream = _MixStream(streams, self.tasks, self.weights, self._processor(processor), self.args.batch_size,
                            seed, rank, self.batches_per_epoch(world_size), workers)
        return data_loader(stream, workers)

    def val_loader(self, processor: VLMProcessor, *, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> Loader:
        """One pass over each member's validation samples in turn (with its instruction); ``max_samples``
        is split across the members by weight. Batches as ``shards`` gives, plus a ``task`` list."""
        caps = _split(max_samples, self.weights)
        chosen = [(i, cap) for i, cap in enumerate(caps) if cap != 0]
        rewrites = self._rewrites()
        streams = [self.datasets[i].val_stream(processor, rank, world_size, cap, rewrites[i]) for i, cap in chosen]
        workers = min((self.datasets[i].val_workers(rank, world_size, cap) for i, cap in chosen), default=0)
        return data_loader(_MixValStream(streams, [self.tasks[i] for i, _ in chosen]), workers)

    # ------------------------------------------------------------------------------------------ answers

    def iter_answers(self, limit: int | None = None) -> Iterator[tuple[str | None, str]]:
        """``(question type, answer)`` pairs of each member in turn; ``limit`` is split by weight."""
        for d, cap in zip(self.datasets, _split(limit, self.weights)):
            if cap != 0:
                yield from d.iter_answers(cap)


__all__ = ["INSTRUCTIONS", "MIX_KEYS", "AppendInstruction", "MixDataset", "resolve_instruction"]
