"""Feature cache: the streams of frozen encoders, computed once per training image and read instead of pixels.

When every encoder is frozen for a stage, their output depends only on the image, so it can be computed
once and stored. ``data.feature_cache: DIR`` in a recipe (or ``vlkit cache-features RECIPE``) keeps, per
training shard, every sample's streams; the training loader then hands the model the cached streams
instead of pixels, and the model runs only the fusion and the LLM on them (the same forward as from
pixels; the image is not even decoded).

Layout::

    DIR/<fingerprint>/              one folder per encoder state (see :func:`fingerprint`)
        fingerprint.json            what the fingerprint covers (format, encoder sections, views, image
                                    size, precision, library versions)
        <shard name>-<path hash>/   one folder per training shard
            index.json              shard size + mtime, the device and precision it was encoded with, per
                                    sample: chunk file, sha1 of the image bytes, or why the image could
                                    not be used
            00000.safetensors ...   ``"<sample key>/<encoder key>.<stream>"`` -> ``(views, N, C)``

Staleness is impossible by construction: the fingerprint covers the cache format (:data:`FORMAT`), the
encoder sections of the recipe, their weights (so encoders trained by an earlier stage get a fresh cache),
the image size and the views, the precision the stage trains in, and the installed versions of torch, vlkit
and the libraries each encoder declares it computes with (``VisionEncoder.libraries``: transformers,
open_clip_torch, timm), so an upgrade gets a fresh cache instead of features the new code would not compute.
A different fingerprint is a different folder, built anew (the reason is printed: what differs from the
folders already there). Every read checks the sha1 of the sample's image bytes against the one the features
were computed from. A changed image or a sample missing from the cache raises :class:`~vlkit.errors.DataError`;
a shard that changed on disk (size or mtime) is re-encoded when the cache is (re)built.

Features are computed where the model trains (``device``: ``vlkit fit`` uses the recipe's accelerator, e.g.
``cuda:<local rank>``; ``vlkit cache-features --device``), with the encoders in eval mode, without autograd,
in the stage's precision: ``32-true`` in the encoders' dtype; ``bf16-mixed`` (``16-mixed``) under
``torch.autocast`` with bfloat16 (float16), as Lightning runs the training step. The streams are stored in
the dtype the encoders return them in (under bf16 autocast usually bfloat16: half the disk), so the fusion
sees exactly the tensors it would get from pixels. Several processes may build one cache at once (DDP ranks,
parallel sweep cells): a lock file per shard makes one of them encode it while the others wait and then
read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file

from vlkit.data.reading import BadSample, decode_image, image_bytes, iter_tar_samples
from vlkit.errors import DataError, RecipeError, VlkitError

if TYPE_CHECKING:
    from vlkit.config import Recipe
    from vlkit.model import VLM

FORMAT = 2
"""Bumped when the layout or what is stored changes; part of the fingerprint (2: precision, device, library
versions)."""
CHUNK = 512
"""Samples per safetensors file (bounds memory while building)."""
INDEX = "index.json"


def image_sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
              "16-mixed": torch.float16, "16": torch.float16}
"""Lightning precisions the cache encodes in: the autocast dtype of each (None: no autocast)."""
_CANONICAL = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def cache_precision(precision: str) -> str:
    """Lightning's name for ``precision`` (``bf16`` -> ``bf16-mixed``); refused when the cache cannot
    encode in it."""
    if precision not in PRECISIONS:
        raise RecipeError(f"the feature cache encodes in {', '.join(p for p in PRECISIONS if '-' in p)}, not "
                          f"{precision!r}; remove data.feature_cache for this recipe", "data.feature_cache")
    return _CANONICAL.get(precision, precision)


def cache_device(device: str | None, accelerator: str) -> torch.device:
    """The device to encode on: ``device`` (``cpu``, ``cuda``, ``cuda:1``), else the one a recipe's
    ``trainer.accelerator`` trains on (``gpu``/``cuda``: ``cuda:<LOCAL_RANK>``; ``auto``: CUDA if there is one)."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise VlkitError(f"--device {device}: not a device (e.g. cpu, cuda, cuda:1): {exc}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise VlkitError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() "
                                 "is False); build the cache on the CPU with --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise VlkitError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if accelerator == "auto":
            return torch.device("cpu")
        raise RecipeError(f"the recipe trains on {accelerator} but no CUDA GPU is available here; build the cache "
                          "on the CPU with `vlkit cache-features --device cpu` (features then differ from "
                          "GPU-computed ones by rounding only)", "trainer.accelerator")
    raise RecipeError(f"the feature cache is built on cpu or cuda, not for accelerator {accelerator!r}; pass "
                      "--device to `vlkit cache-features`", "trainer.accelerator")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions(model: VLM) -> dict[str, str]:
    """Installed versions of torch, vlkit and every library an encoder declares (``libraries``)."""
    names = ["torch", "vlkit"]
    for encoder in model.encoders.values():
        names += [n for n in getattr(encoder, "libraries", ()) if n not in names]
    return {n: _version(n) for n in names}


def fingerprint(recipe: Recipe, model: VLM, precision: str | None = None) -> str:
    """A hash of everything the cached streams depend on: the cache format, the recipe's encoder sections,
    every encoder weight (names, dtypes, shapes, values), the pixel size the data pipeline delivers, the
    views, the precision (default: ``trainer.precision``) and the library versions."""
    h = hashlib.sha256()
    desc = describe(recipe, model, precision)
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    for key, encoder in model.encoders.items():
        for name, tensor in sorted(encoder.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{key}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def describe(recipe: Recipe, model: VLM, precision: str | None = None) -> dict[str, Any]:
    """The non-weight part of the fingerprint (written to ``fingerprint.json`` for people to read)."""
    return {"format": FORMAT, "encoders": [dict(s) for s in recipe.model.encoders],
            "image_size": model.image_size, "views": None if model.views is None else asdict(model.views),
            "pixels": model.processor().image_spec,
            "precision": cache_precision(precision or recipe.trainer.precision),
            "libraries": library_versions(model)}


def _differences(root: Path, desc: dict[str, Any]) -> str:
    """What sets ``desc`` apart from the other fingerprint folders in ``root`` (the newest one), for the
    message saying why a new cache is built."""
    others = sorted((p for p in root.glob("*/fingerprint.json")), key=lambda p: p.stat().st_mtime_ns)
    for path in reversed(others):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        changed = []
        for key in sorted(set(old) | set(desc)):
            a, b = old.get(key), json.loads(json.dumps(desc.get(key), default=str))
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                changed += [f"{key}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
                            if a.get(k) != b.get(k)]
            else:
                changed.append(f"{key}: {a} -> {b}")
        return (f"differs from {path.parent.name}: " + "; ".join(changed) if changed
                else f"differs from {path.parent.name} in the encoder weights")
    return ""


@dataclass
class CachedImage:
    """An image whose encoder streams come from the feature cache: ``{"<key>.<stream>": (views, N, C)}``."""

    streams: dict[str, torch.Tensor]


@dataclass
class CacheReader:
    """Looks samples up in one fingerprint folder (picklable; opens files lazily in each loader worker)."""

    folder: Path
    _indexes: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _files: dict[Path, Any] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_indexes": {}, "_files": {}}

    def _index(self, url: str) -> dict[str, Any]:
        index = self._indexes.get(url)
        if index is None:
            path = shard_folder(self.folder, url) / INDEX
            if not path.is_file():
                raise DataError(f"{url} is not in the feature cache {self.folder}: build it with `vlkit "
                                "cache-features RECIPE` (or let `vlkit fit` build it: data.feature_cache)")
            index = json.loads(path.read_text())
            self._indexes[url] = index
        return index

    def lookup(self, url: str, key: str, image: bytes | None) -> CachedImage | str | None:
        """The cached streams of sample ``key`` of shard ``url`` whose image file holds ``image``; None for a
        sample without an image; a string (the reason) for an image that could not be decoded when the
        cache was built. Raises :class:`DataError` when the image is not the one the cache was built from."""
        if image is None:
            return None
        entry = self._index(url)["samples"].get(key)
        if entry is None:
            raise DataError(f"{url}: sample {key} is not in the feature cache {self.folder}; the shard changed "
                            "after the cache was built. Rebuild it (`vlkit cache-features`) or remove the folder")
        if entry["sha1"] != image_sha1(image):
            raise DataError(f"{url}: sample {key}: the image differs from the one its cached features were "
                            f"computed from ({self.folder}); rebuild the cache (`vlkit cache-features`) or "
                            "remove the folder")
        if "bad" in entry:
            return entry["bad"]
        path = shard_folder(self.folder, url) / entry["chunk"]
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = safe_open(str(path), framework="pt")
        prefix = f"{key}/"
        return CachedImage({name: handle.get_tensor(prefix + name) for name in entry["streams"]})


def shard_folder(root: Path, url: str) -> Path:
    """Cache folder of shard ``url``: its name plus a hash of its absolute path (names repeat across datasets)."""
    path = os.path.abspath(url)
    return root / f"{Path(url).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _shard_stamp(url: str) -> dict[str, int]:
    st = os.stat(url)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_cached(folder: Path, url: str) -> bool:
    """Whether shard ``url`` has a complete cache in ``folder`` made from its current file."""
    try:
        index = json.loads((shard_folder(folder, url) / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return index.get("format") == FORMAT and index.get("shard") == _shard_stamp(url)


def _atomic_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _batches(url: str, pixels: Any, batch_size: int, bad: dict[str, tuple[str, str]]
             ) -> Iterator[tuple[list[str], list[str], torch.Tensor]]:
    """(keys, sha1s, stacked pixels) of the imaged samples of one shard; undecodable images go to ``bad``."""
    keys: list[str] = []
    shas: list[str] = []
    images: list[torch.Tensor] = []
    for key, files in iter_tar_samples(url):
        data = image_bytes(files)
        if data is None:
            continue
        try:
            image = decode_image(files)
        except BadSample as exc:
            bad[key] = (image_sha1(data), str(exc))
            continue
        keys.append(key)
        shas.append(image_sha1(data))
        images.append(pixels(image))
        if len(keys) == batch_size:
            yield keys, shas, torch.stack(images)
            keys, shas, images = [], [], []
    if keys:
        yield keys, shas, torch.stack(images)


def _encode_shard(model: VLM, url: str, out: Path, batch_size: int, progress: Progress | None,
                  task: Any, precision: str = "32-true") -> int:
    """Encode every image of one shard into ``out`` (written under a temporary name, then renamed), on the
    device of the model's encoders, in ``precision``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    stamp = _shard_stamp(url)
    processor = model.processor()
    samples: dict[str, dict[str, Any]] = {}
    bad: dict[str, tuple[str, str]] = {}
    chunk: dict[str, torch.Tensor] = {}
    n_chunk = 0
    n = 0

    def flush() -> None:
        nonlocal chunk, n_chunk
        if chunk:
            save_file(chunk, str(tmp / f"{n_chunk:05d}.safetensors"))
            chunk, n_chunk = {}, n_chunk + 1

    device = next(model.encoders.parameters()).device
    dtype = PRECISIONS[precision]
    for keys, shas, pixels in _batches(url, processor.pixels, batch_size, bad):
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            streams = model.image_streams(pixels.to(device))
        views = model.num_views
        for i, (key, sha) in enumerate(zip(keys, shas)):
            names = []
            for name, tensor in streams.items():
                chunk[f"{key}/{name}"] = tensor[i * views:(i + 1) * views].cpu().clone()
                names.append(name)
            samples[key] = {"sha1": sha, "chunk": f"{n_chunk:05d}.safetensors", "streams": names}
        n += len(keys)
        if len(chunk) >= CHUNK * max(1, len(streams)):
            flush()
        if progress is not None:
            progress.advance(task, len(keys))
    flush()
    for key, (sha, reason) in bad.items():
        samples[key] = {"sha1": sha, "bad": reason}
    _atomic_json(tmp / INDEX, {"format": FORMAT, "shard": stamp, "url": os.path.abspath(url), "device": str(device),
                               "precision": precision, "samples": samples})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return n


def build_cache(recipe: Recipe, model: VLM, shards: Sequence[str], root: str | Path, batch_size: int = 64,
                show_progress: bool = True, precision: str | None = None,
                device: str | torch.device | None = None) -> CacheReader:
    """Make sure ``root`` holds the streams of ``model``'s encoders (as they are now) for every image of
    ``shards``, encoding the shards that are missing or changed, and return a reader for them.

    ``precision``: the Lightning precision of the stage that reads the cache (default ``trainer.precision``);
    ``device``: where to encode (default: where the encoders are); the encoders move there for the encoding
    and back afterwards."""
    if model.strategy.cache_refusal is not None:  # e.g. a holistic encoder, which embeds the text too
        raise DataError(model.strategy.cache_refusal)
    precision = cache_precision(precision or recipe.trainer.precision)
    desc = describe(recipe, model, precision)
    root = Path(root)
    folder = root / fingerprint(recipe, model, precision)
    if not (folder / "fingerprint.json").is_file():
        why = _differences(root, desc) if root.is_dir() else ""
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_json(folder / "fingerprint.json", desc)
        if why and show_progress:
            Console(stderr=True).print(f"feature cache: building {folder} ({why})", highlight=False)
    todo = [url for url in shards if not is_cached(folder, url)]
    if todo:
        was_training = model.training
        home = next(model.encoders.parameters()).device
        model.eval()
        try:
            model.encoders.to(device if device is not None else home)
            with torch.no_grad(), Progress(disable=not show_progress, transient=False) as progress:
                task = progress.add_task(f"caching features of {len(todo)} shard(s)", total=None)
                for url in todo:
                    out = shard_folder(folder, url)
                    with FileLock(out.parent / f".{out.name}.lock"):
                        if not is_cached(folder, url):  # another process may have built it while we waited
                            _encode_shard(model, url, out, batch_size, progress, task, precision)
        finally:
            model.encoders.to(home)
            model.train(was_training)
    return CacheReader(folder)


__all__ = ["CacheReader", "CachedImage", "build_cache", "cache_device", "cache_precision", "fingerprint",
           "is_cached", "library_versions", "shard_folder"]
