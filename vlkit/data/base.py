"""The dataset protocol: what every registered dataset (``shards``, ``mix``, ``distill_images``, plugins) gives.

A dataset is built from its recipe section (``DATASETS.build``) and then only used through this interface::

    ds.processor_args                  -> ProcessorArgs(max_length, train_on): how to tokenize for it
    ds.train_loader(processor, seed=, rank=, world_size=)     endless training batches, in loader epochs
    ds.val_loader(processor, rank=, world_size=, max_samples=)  one pass over held-out batches
    ds.has_validation()                whether val_loader yields anything
    ds.num_samples() / samples_per_epoch() / batches_per_epoch(world_size)

The training loader's ``dataset`` is a :class:`TrainStream`: its position (the next sample of every loader
worker, not a seed) is a small ``state_dict`` that :mod:`vlkit.training.resume_state` saves in checkpoints,
so that a resumed run reads exactly the samples the interrupted one would have read next.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch.utils.data import DataLoader, IterableDataset

if TYPE_CHECKING:
    from vlkit.data.processor import VLMProcessor

TrainOnArg = Literal["assistant", "last", "all"]


@dataclass(frozen=True)
class ProcessorArgs:
    """The processor settings a dataset's samples are tokenized with."""

    max_length: int = 512
    """Longest sample in tokens (visual tokens included)."""
    train_on: TrainOnArg = "assistant"
    """Which tokens train: every assistant turn, the last one, or every text token."""
    overflow: Literal["skip", "truncate"] = "skip"
    """Samples over ``max_length``: skip them, or truncate the text after the last image block."""
    pack_tokens: int | None = None
    """Training batches packed into rows of at most this many tokens (``packing.max_tokens``); None: padded."""


@dataclass(frozen=True)
class ShardSource:
    """Shards a dataset reads and how (for ``vlkit data check``)."""

    shards: list[str]
    rewrite: Any = None
    """Applied to each sample's messages before tokenizing (e.g. a task instruction), or None."""
    tasks: list[str] | None = None
    """Only samples with these ``task`` values are used (None: all)."""
    conversations: bool = True
    """Whether samples are tokenized conversations (False: only their images are used)."""


POSITION_KEY = "__position__"
"""Batch key holding the stream position after that batch (read by the resume callback, ignored by models)."""


class TrainStream(IterableDataset):
    """A training loader's dataset whose read position can be saved and restored.

    Each batch it yields carries ``batch[POSITION_KEY]``: the position of the stream just after that batch.
    :meth:`consumed` records the position of a batch that was trained on (in the training process, so
    prefetched batches do not count); :meth:`state_dict` / :meth:`load_state_dict` save and restore it.
    """

    @abstractmethod
    def consumed(self, position: Any) -> None:
        """Record that the batch with this ``batch[POSITION_KEY]`` was trained on."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch (plain Python values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` position; call before the loader is iterated."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # pragma: no cover - implemented by each stream
        raise NotImplementedError


class Dataset(ABC):
    """A registered dataset. Subclasses set ``args`` (their recipe dataclass) and implement the loaders."""

    args: Any
    objective: ClassVar[str] = "lm"
    """The kind of batches it gives: ``lm`` (conversations with labels) or e.g. ``distill``."""

    # ------------------------------------------------------------------------------------- processor

    @property
    def processor_args(self) -> ProcessorArgs:
        """How samples are tokenized: from ``args.max_length`` / ``args.train_on`` where the recipe has them."""
        defaults = ProcessorArgs()
        return ProcessorArgs(max_length=getattr(self.args, "max_length", defaults.max_length),
                             train_on=getattr(self.args, "train_on", defaults.train_on),
                             overflow=getattr(self.args, "overflow", defaults.overflow),
                             pack_tokens=getattr(getattr(self.args, "packing", None), "max_tokens", None))

    def _processor(self, processor: VLMProcessor) -> VLMProcessor:
        """``processor`` with this dataset's :attr:`processor_args`."""
        import dataclasses

        args = self.processor_args
        return dataclasses.replace(processor, max_length=args.max_length, train_on=args.train_on,
                                   overflow=args.overflow, pack_tokens=args.pack_tokens)

    # --------------------------------------------------------------------------------------- loaders

    @abstractmethod
    def train_loader(self, processor: VLMProcessor, *, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> DataLoader:
        """Endless training batches for rank ``rank`` of ``world_size`` in loader epochs of
        :meth:`batches_per_epoch` batches; the loader's ``dataset`` is a :class:`TrainStream`."""

    @abstractmethod
    def val_loader(self, processor: VLMProcessor, *, rank: int = 0, world_size: int = 1,
                   max_samples: int | None = None) -> DataLoader:
        """One pass over rank ``rank``'s part of the held-out batches (each sample on one rank only; ranks may
        get different numbers of batches: :class:`vlkit.module.VLMModule` pads the shorter ones with
        uncounted batches); ``max_samples`` caps the samples of all ranks together."""

    def has_validation(self) -> bool:
        """Whether :meth:`val_loader` yields held-out batches."""
        return True

    def shard_sources(self) -> list[ShardSource]:
        """The shards this dataset reads and how (what ``vlkit data check`` verifies)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its shards for `vlkit data check`")

    # ---------------------------------------------------------------------------------------- counts

    @abstractmethod
    def num_samples(self) -> int:
        """Training samples in the dataset."""

    def samples_per_epoch(self) -> int:
        """``args.samples_per_epoch`` if set, else :meth:`num_samples`."""
        return getattr(self.args, "samples_per_epoch", None) or self.num_samples()

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Batches each rank yields per loader epoch: ``samples_per_epoch // (world_size * batch_size)``."""
        return max(1, self.samples_per_epoch() // (world_size * self.args.batch_size))


def stage_data_seed(seed: int, stage: str) -> int:
    """The data seed of stage ``stage`` of a run seeded ``seed``: each stage streams its own order."""
    import zlib

    return zlib.crc32(f"vlkit-stage:{seed}:{stage}".encode())


EpochCounts = Dataset
"""Former name of :class:`Dataset` (its epoch arithmetic)."""

__all__ = ["POSITION_KEY", "Dataset", "EpochCounts", "ProcessorArgs", "ShardSource", "TrainStream",
           "stage_data_seed"]
