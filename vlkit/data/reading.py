"""Reading webdataset shards: shard lists, per-shard samples, shuffled resumable passes, loader plumbing.

Shards are read with webdataset's pipeline (``wds.DataPipeline``, ``tarfile_to_samples`` with a handler
that records tar errors, ``wds.shuffle``, ``wds.slice``); what vlkit adds on top:

- a tar error ends only that shard in lenient mode: the samples before the break are kept (the last one,
  possibly cut, is dropped), the lost samples are counted (from ``index.json`` when it lists the shard's
  count) and reported as one skipped marker sample; ``strict`` raises :class:`DataError` naming the shard;
- :class:`SampleSource`: endless passes over a reader's shards, each pass with its own deterministic shard
  order and shuffle seed, whose position is ``(pass, samples taken)``: the smallest own piece, because
  webdataset's shuffle buffer carries no position to resume from mid-epoch;
- :class:`EpochStream` + :class:`Loader`: loader epochs of a fixed number of batches split across loader
  workers, the stream's position saved through Lightning's stateful-loader interface, and errors raised
  inside a loader worker re-raised as vlkit's one-line :class:`DataError`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import random
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlkit.data.base import POSITION_KEY, TrainStream
from vlkit.errors import DataError, VlkitError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
"""Member extensions read as the sample's image (the first present, in this order)."""
INDEX_FILE = "index.json"
HOW_TO_BUILD = ("build the offline demo with `vlkit data demo --out DIR` or convert LLaVA-format JSON with "
                "`vlkit data from-llava JSON IMAGE_DIR --out DIR`, then set urls to e.g. 'DIR/train-*.tar'")
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)
"""What reading a damaged tar raises (webdataset's key grouping raises ValueError on duplicate members)."""
MAX_SKIP_WARNINGS = 3
ERROR_KEY = "__error__"
"""Marker key: in a raw sample, why the sample (or the rest of its shard) is unusable; in a batch, a vlkit
error raised inside a loader worker, re-raised by :class:`Loader` in the training process."""
LOST_KEY = "__lost__"
"""In a tar-error marker sample: how many samples of the shard were lost (at least 1)."""


# ------------------------------------------------------------------------------------------ shard paths


def expand_urls(urls: str) -> list[str]:
    """Shard paths named by ``urls``: brace patterns (``a-{000000..000003}.tar``) and/or globs
    (``a-*.tar``); several patterns may be joined with ``::``. Relative paths resolve against the CWD.

    Raises :class:`DataError` when a named shard is missing or a glob matches nothing.
    """
    if not isinstance(urls, str) or not urls.strip():
        raise DataError(f"data urls must name shard files, got {urls!r}; {HOW_TO_BUILD}")
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
                        f"To get data, {HOW_TO_BUILD}")
    return list(dict.fromkeys(found))  # the first occurrence of each shard, in order


def split_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` of ``world_size`` reads: shard ``i`` goes to rank ``i % world_size``.

    Own code rather than ``wds.split_by_node``: vlkit passes the rank explicitly (Lightning's, or a test's),
    while webdataset reads it from the environment or the default process group."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return list(shards[rank::world_size])


# ------------------------------------------------------------------------------------------ index.json


def load_index(folder: Path) -> dict[str, Any] | None:
    """A dataset folder's ``index.json``, or None when missing or malformed."""
    try:
        index = json.loads((Path(folder) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("splits"), dict) else None


def indexed_counts(shards: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, int]:
    """Sample counts of the shards that an ``index.json`` beside them lists (with ``task`` in ``tasks``)."""
    counts: dict[str, int] = {}
    by_folder: dict[Path, list[str]] = {}
    for url in shards:
        by_folder.setdefault(Path(url).resolve().parent, []).append(url)
    for folder, urls in by_folder.items():
        index = load_index(folder)
        if index is None:
            continue
        names = {Path(u).name: u for u in urls}
        for split in index["splits"].values():
            if not isinstance(split, dict):
                continue
            listed = [str(s) for s in split.get("shards", [])]
            per_shard, per_task = split.get("shard_samples"), split.get("shard_tasks")
            for i, name in enumerate(listed):
                if name not in names:
                    continue
                if tasks is not None:
                    if isinstance(per_task, list) and i < len(per_task) and isinstance(per_task[i], dict):
                        counts[names[name]] = sum(int(per_task[i].get(t, 0)) for t in tasks)
                elif isinstance(per_shard, list) and i < len(per_shard):
                    counts[names[name]] = int(per_shard[i])
            if (tasks is None and not isinstance(per_shard, list) and "samples" in split
                    and sorted(listed) == sorted(names)):
                # only the split's total is known: it fits when the urls name exactly the split's shards
                counts.update({u: 0 for u in urls})
                counts[urls[0]] = int(split["samples"])
    return counts


def count_samples(shards: Sequence[str], tasks: Sequence[str] | None = None) -> int:
    """Samples in the shards (with ``task`` in ``tasks``): from ``index.json`` where it has the counts,
    otherwise by reading the shards' JSON members."""
    known = indexed_counts(shards, tasks)
    return sum(known[u] if u in known else count_shard(u, tasks) for u in shards)


def count_shard(url: str, tasks: Sequence[str] | None = None) -> int:
    """Samples with a JSON member in one shard (with ``task`` in ``tasks`` when given)."""
    n = 0
    try:
        for _, files in iter_tar_samples(url, json_only=True):
            if "json" not in files:
                continue
            if tasks is not None:
                try:
                    if read_meta(files).get("task") not in tasks:
                        continue
                except BadSample:
                    continue
            n += 1
    except TAR_ERRORS as exc:
        raise DataError(f"{url}: unreadable tar shard ({exc}); fix or remove it") from exc
    return n


# ----------------------------------------------------------------------------------------- tar reading


def _split_name(name: str) -> tuple[str | None, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), the webdataset convention."""
    key, ext = wds.tariterators.base_plus_ext(name)
    return key, (ext or "").lower()


def iter_tar_samples(url: str, json_only: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a tar shard, in file order; tar errors propagate.

    Read with webdataset's ``tarfile_to_samples``; ``json_only`` instead seeks past the other members
    (listed with empty bytes) with ``tarfile``, since webdataset streams every member's bytes.
    """
    if not json_only:
        for sample in _tar_samples(url, wds.reraise_exception):
            yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}
        return
    with tarfile.open(url, mode="r:*") as tar:
        key: str | None = None
        files: dict[str, bytes] = {}
        for member in tar:
            if not member.isreg():
                continue
            k, ext = _split_name(member.name)
            if k is None or os.path.basename(k).startswith("__"):
                continue
            data = b""
            if ext == "json":
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            files[ext] = data
        if key is not None:
            yield key, files


class _Recorder:
    """A webdataset handler that remembers the first exception and stops reading the shard."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __call__(self, exn: BaseException) -> bool:
        if self.error is None:
            self.error = exn
        return False


def _describe(exn: BaseException) -> str:
    first = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {first.split(' @ ')[0]}"


def _tar_samples(url: str, handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's tar expansion and key grouping over one shard, in a file this function closes."""
    try:
        stream = open(url, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as exc:
        handler(exc)
        return
    with stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)


def read_shard(url: str, strict: bool = False, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset dicts (``__key__``, ``__url__``, one bytes entry per member).

    A tar error (or fewer samples than ``expected``, the shard's count in ``index.json``) ends the shard:
    with ``strict`` it raises :class:`DataError` naming the shard; otherwise the last sample read (possibly
    cut) is dropped and one marker ``{ERROR_KEY: reason, LOST_KEY: n}`` follows the samples before it.
    """
    recorder = _Recorder()
    held: dict[str, Any] | None = None
    kept = 0
    for sample in _tar_samples(url, recorder):
        if held is not None:
            yield held
            kept += 1
        held = sample
    error = recorder.error
    if error is None and held is not None:
        yield held
        kept += 1
        held = None
    if error is None and (expected is None or kept >= expected):
        return
    reason = (f"unreadable tar shard ({_describe(error)})" if error is not None
              else f"shard ends after {kept} of the {expected} samples its index.json lists (truncated)")
    if strict:
        raise DataError(f"{url}: {reason}. Fix or remove the shard, or set strict: false to skip corrupt "
                        "samples") from error
    lost = max(1, (expected - kept) if expected is not None else 1)
    yield {"__key__": "<tar>", "__url__": url, ERROR_KEY: reason, LOST_KEY: lost}


# ------------------------------------------------------------------------------------------ samples


class BadSample(Exception):
    """A sample that cannot be used; ``str(exc)`` is the reason."""


def read_meta(files: dict[str, Any]) -> dict[str, Any]:
    """A sample's parsed JSON object; raises :class:`BadSample`."""
    raw = files.get("json")
    if raw is None:
        raise BadSample("no .json member")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSample(f"malformed JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"JSON must be an object, got {type(meta).__name__}")
    return meta


def check_conversations(meta: dict[str, Any]) -> list[dict]:
    conv = meta.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("missing or empty 'conversations' list in the JSON")
    return conv


def image_bytes(files: dict[str, Any]) -> bytes | None:
    """The sample's image file (the first of :data:`IMAGE_EXTENSIONS` present), undecoded."""
    return next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)


def decode_image(files: dict[str, Any]) -> Image.Image | None:
    """The sample's image as RGB, None without one; raises :class:`BadSample` when it does not decode."""
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            try:
                image = Image.open(io.BytesIO(files[ext]))
                image.load()
                return image.convert("RGB")
            except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
                raise BadSample(f"cannot decode image {ext!r} ({type(exc).__name__}: {exc})") from None
    return None


def answers(conversations: list[Any]) -> list[str]:
    """The assistant turns' texts of a LLaVA-style conversation."""
    return [t["value"] for t in conversations if isinstance(t, dict) and isinstance(t.get("value"), str)
            and str(t.get("from", t.get("role"))).lower() in ("gpt", "assistant")]


class SkipReporter:
    """Raises under ``strict``, else warns about the first few skipped samples (later ones are counted)."""

    def __init__(self, strict: bool, prefix: str = "") -> None:
        self.strict = strict
        self.prefix = prefix
        self.warned = 0

    def __call__(self, url: str, key: str, reason: str) -> None:
        message = f"{url}: sample {key}: {reason}" if key != "<tar>" else f"{url}: {reason}"
        if self.strict:
            raise DataError(f"{message}. Fix or remove the sample, or set strict: false to skip corrupt samples")
        if self.warned < MAX_SKIP_WARNINGS:
            self.warned += 1
            more = " (further skips are only counted)" if self.warned == MAX_SKIP_WARNINGS else ""
            warnings.warn(f"{self.prefix}skipping {message}{more}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Position:
    """Where a :class:`SampleSource` stands: ``taken`` samples of pass ``pass_`` were read."""

    pass_: int = 0
    taken: int = 0

    def to_state(self) -> list[int]:
        return [self.pass_, self.taken]

    @classmethod
    def from_state(cls, state: Sequence[int] | None) -> Position:
        return cls(*map(int, state)) if state else cls()


@dataclass
class SampleSource:
    """Endless passes over ``shards`` (raw webdataset samples, undecoded) for one reader.

    Pass ``p`` reads the shards in an order shuffled with ``(seed, p)`` and its samples through webdataset's
    shuffle buffer seeded with ``(seed, p)``, drained at the end of the pass, so a pass is a pure function
    of ``(seed, p)`` and a position ``(p, taken)`` resumes exactly. ``stride``/``offset`` keep every
    ``stride``-th sample (readers sharing shards). ``bufsize`` 0: no shuffling of shards or samples.
    """

    shards: list[str]
    seed: str
    bufsize: int = 1000
    strict: bool = False
    expected: dict[str, int] = field(default_factory=dict)
    stride: int = 1
    offset: int = 0

    def one_pass(self, index: int) -> Iterable[dict[str, Any]]:
        order = list(self.shards)
        if self.bufsize > 0:
            random.Random(f"vlkit-shards:{self.seed}:{index}").shuffle(order)
        stages: list[Any] = [wds.SimpleShardList(order), _expand_shards(self.strict, self.expected)]
        if self.stride > 1:
            stages.append(wds.slice(self.offset, None, self.stride))
        if self.bufsize > 0:
            rng = random.Random(f"vlkit-buffer:{self.seed}:{index}")
            stages.append(wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng))
        return wds.DataPipeline(*stages)

    def samples(self, start: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        """``(raw sample, position after it)`` forever from ``start``; raises when a pass yields nothing."""
        start = start or Position()
        for index in itertools.count(start.pass_):
            skip = start.taken if index == start.pass_ else 0
            n = 0
            for n, sample in enumerate(self.one_pass(index), 1):
                if n > skip:
                    yield sample, Position(index, n)
            if n == 0:
                raise DataError(f"the shards {', '.join(self.shards)} hold no samples; {HOW_TO_BUILD}")


class _expand_shards:
    """Pipeline stage: shards (``{"url": ...}``) -> their samples (:func:`read_shard`); picklable."""

    def __init__(self, strict: bool, expected: dict[str, int]) -> None:
        self.strict = strict
        self.expected = expected

    def __call__(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            yield from read_shard(shard["url"], self.strict, self.expected.get(shard["url"]))


def reader_split(shards: Sequence[str], reader: int, readers: int) -> tuple[list[str], int, int]:
    """(shards, stride, offset) of reader ``reader`` of ``readers``: whole shards when there are at least as
    many shards as readers, else every shard and every ``readers``-th sample."""
    if len(shards) >= readers:
        return list(shards[reader::readers]), 1, 0
    return list(shards), readers, reader


# ----------------------------------------------------------------------------------- loaders and epochs


def worker_info() -> tuple[int, int]:
    """(id, count) of the data-loader worker running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` near-equal parts (the first ones get the extra)."""
    return total // parts + (1 if index < total % parts else 0)


def error_batch(exc: VlkitError) -> dict[str, Any]:
    """A batch that carries a vlkit error out of a loader worker (see :class:`Loader`)."""
    return {ERROR_KEY: str(exc)}


def carry_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches``, ending with an :func:`error_batch` when a vlkit error is raised inside a loader worker
    (the loader re-raises it as one line, without the worker's traceback); in the main process it propagates."""
    try:
        yield from batches
    except GeneratorExit:  # closed (also at interpreter exit, when VlkitError may already be None)
        raise
    except VlkitError as exc:
        if get_worker_info() is None:
            raise
        yield error_batch(exc)


class EpochStream(TrainStream):
    """An endless stream of batches served in loader epochs of ``batches`` batches, split across
    ``workers`` loader workers ("logical workers": worker ``w`` streams its own share of the data).

    The position is, per logical worker, the subclass's state after its last trained batch, plus the
    number of batches trained in the current epoch. A loader epoch takes batch ``j`` from logical worker
    ``j % workers`` (the loader's round robin); after resuming in the middle of an epoch, loader worker
    ``i`` serves logical worker ``(i + done) % workers`` for the rest of that epoch, and :class:`Loader`
    then restarts its workers so that each continues its own logical stream.

    Subclasses implement :meth:`_batches`, yielding ``(batch, state)`` with ``state`` a small picklable
    value (the logical worker's position after that batch) passed back to ``_batches`` on resume.
    """

    def __init__(self, batches: int, workers: int) -> None:
        super().__init__()
        self.batches = batches
        self.workers = max(1, workers)
        self.positions: dict[int, Any] = {}
        self.done = 0
        self._gen: Iterator[dict[str, Any]] | None = None
        self._serving: int | None = None

    def __len__(self) -> int:
        return self.batches

    # ----------------------------------------------------------------------------------- position

    def consumed(self, position: Any) -> None:
        worker, state = position
        self.positions[int(worker)] = state
        self.done = (self.done + 1) % self.batches

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "batches": self.batches, "done": self.done,
                "positions": {str(k): v for k, v in self.positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["workers"]) != self.workers or int(state["batches"]) != self.batches:
            raise DataError(f"cannot resume the data stream: it was saved with {state['workers']} loader "
                            f"worker(s) and {state['batches']} batches per epoch, now {self.workers} and "
                            f"{self.batches}; keep num_workers, batch_size and samples_per_epoch to resume")
        self.done = int(state["done"])
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self._gen = None

    # ------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_info()
        if workers != 1 and workers != self.workers:
            raise RuntimeError(f"stream built for {self.workers} loader workers runs in {workers}")
        remaining = self.batches - self.done if self._gen is None else self.batches
        logical = (worker + (self.done if self._gen is None else 0)) % self.workers
        if self._gen is None or self._serving != logical:
            self._serving = logical
            self._gen = self._tagged(logical)
        gen = self._gen
        count = share(remaining, self.workers, worker) if workers > 1 else remaining
        yield from carry_errors(next(gen) for _ in range(count))

    def _tagged(self, logical: int) -> Iterator[dict[str, Any]]:
        for batch, state in self._batches(logical, self.workers, self.positions.get(logical)):
            batch[POSITION_KEY] = (logical, state)
            yield batch

    def _batches(self, worker: int, workers: int, state: Any) -> Iterator[tuple[dict[str, Any], Any]]:
        """The endless ``(batch, state after it)`` of logical worker ``worker`` of ``workers``, from
        ``state`` (None: from the start)."""
        raise NotImplementedError


class Loader(DataLoader):
    """A DataLoader over a stream of whole batches that (1) re-raises a vlkit error from a worker as one
    line, (2) gives its stream's position to Lightning's stateful-loader checkpointing and (3) restarts
    its persistent workers after an epoch that resumed mid-way (see :class:`EpochStream`)."""

    def __init__(self, stream: IterableDataset, workers: int) -> None:
        if workers > 0:
            # tokenizers' thread pool does not survive fork; avoid its warning (and any deadlock)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # an own generator: creating an iterator then draws no number from the global RNG (exact resume)
        super().__init__(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                         prefetch_factor=2 if workers > 0 else None, generator=torch.Generator().manual_seed(0))
        self._restart = False

    def __iter__(self) -> Iterator[Any]:
        stream = self.dataset
        if isinstance(stream, EpochStream) and self.num_workers > 0:
            if self._restart and self._iterator is not None:
                self._iterator._shutdown_workers()
                self._iterator = None
            self._restart = stream.done != 0
        it = super().__iter__()
        return _raising(it)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict() if isinstance(self.dataset, TrainStream) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.dataset, TrainStream) and state:
            self.dataset.load_state_dict(state)


_WORKER_ERROR = re.compile(r"^(?:\w+\.)*(?:DataError|RecipeError|CheckpointError|VlkitError): (.*)$", re.MULTILINE)


def _raising(it: Iterator[Any]) -> Iterator[Any]:
    try:
        for batch in it:
            if isinstance(batch, dict) and ERROR_KEY in batch and len(batch) == 1:
                raise DataError(batch[ERROR_KEY])
            yield batch
    except GeneratorExit:  # see carry_errors
        raise
    except VlkitError as exc:
        text = str(exc)
        if "Original Traceback" in text:  # raised by torch from a worker: keep the message, not the traceback
            found = _WORKER_ERROR.findall(text)
            raise type(exc)(found[-1] if found else text.splitlines()[0]) from None
        raise


def data_loader(stream: IterableDataset, workers: int) -> Loader:
    """A :class:`Loader` over ``stream`` with ``workers`` persistent worker processes."""
    return Loader(stream, workers)


__all__ = ["ERROR_KEY", "HOW_TO_BUILD", "IMAGE_EXTENSIONS", "INDEX_FILE", "BadSample", "EpochStream", "Loader",
           "Position", "SampleSource", "SkipReporter", "answers", "check_conversations", "count_samples",
           "count_shard", "data_loader", "decode_image", "expand_urls", "image_bytes", "indexed_counts",
           "iter_tar_samples", "load_index", "read_meta", "read_shard", "reader_split", "share", "split_shards",
           "worker_info"]
