"""Writing vlkit's webdataset shards (``vlkit data demo``, ``vlkit data from-llava``): output folder,
sample keys, one split's shards through ``wds.ShardWriter``, and the ``index.json`` written last."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from vlkit.atomic import write_text
from vlkit.data.reading import INDEX_FILE
from vlkit.errors import DataError

_MTIME = 1_704_067_200  # fixed member time (2024-01-01) so that rebuilding gives identical shards


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


def _publish(tmp_name: str) -> None:
    """``wds.ShardWriter`` post hook: a finished ``X.tar.tmp`` becomes ``X.tar``."""
    Path(tmp_name).replace(tmp_name.removesuffix(".tmp"))


class SplitWriter:
    """Writes one split as ``{split}-000000.tar``, ... with ``shard_size`` samples each.

    Shards are written by webdataset's ``ShardWriter`` under a ``.tmp`` name and renamed when complete;
    :meth:`close` returns the split's ``index.json`` entry (shards, samples, per-shard sample and task
    counts, per-type counts).
    """

    def __init__(self, out: Path, split: str, shard_size: int) -> None:
        if shard_size < 1:
            raise DataError(f"shard_size must be at least 1, got {shard_size}")
        self.out = Path(out)
        self.split = split
        self.shard_size = shard_size
        self.shard_samples: list[int] = []
        self.shard_tasks: list[dict[str, int]] = []
        self.types: Counter[str] = Counter()
        self._writer: Any = None

    @property
    def shards(self) -> list[str]:
        return [f"{self.split}-{i:06d}.tar" for i in range(len(self.shard_samples))]

    def write(self, key: str, meta: dict[str, Any], image: bytes | None = None, ext: str = "png") -> None:
        """Add one sample: its JSON ``meta`` and, optionally, encoded image bytes with extension ``ext``."""
        import webdataset as wds

        if self._writer is None:
            # an int mtime: a float one makes tarfile add a 1 KiB PAX header to every member
            self._writer = wds.ShardWriter(str(self.out / f"{self.split}-%06d.tar.tmp"), maxcount=self.shard_size,
                                           maxsize=float("inf"), post=_publish, verbose=0, encoder=False,
                                           mtime=_MTIME)
        if not self.shard_samples or self.shard_samples[-1] >= self.shard_size:
            self.shard_samples.append(0)
            self.shard_tasks.append({})
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
        if self._writer is not None:
            self._writer.post = None
            self._writer.close()
            if self._writer.fname:
                Path(self._writer.fname).unlink(missing_ok=True)
            self._writer = None
            if self.shard_samples:
                self.shard_samples.pop()
                self.shard_tasks.pop()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and return this split's index entry."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return {"shards": list(self.shards), "samples": sum(self.shard_samples),
                "shard_samples": list(self.shard_samples), "shard_tasks": [dict(t) for t in self.shard_tasks],
                "types": dict(sorted(self.types.items()))}


def write_index(out: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically (it marks the dataset complete, so write it last)."""
    write_text(Path(out) / INDEX_FILE, json.dumps(index, indent=2) + "\n")


__all__ = ["SplitWriter", "prepare_out_dir", "sample_key", "write_index"]
