"""Convert LLaVA-format JSON (a list of ``{id, image, conversations}``) into vlkit's webdataset shards.

Each entry becomes ``KEY.json`` (``{"id", "conversations"}`` plus the entry's ``type`` / ``task`` when
present) and, when the entry has an image, ``KEY.jpg`` or ``KEY.png``: JPEG and PNG files are stored
byte for byte after checking that they decode; other formats are re-encoded as PNG. Entries that cannot
be used (malformed, image missing or unreadable, placeholders not matching the image) are skipped and
reported, or raise :class:`~vlkit.errors.DataError` with ``strict=True``.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from vlkit.data.conversation import IMAGE_PLACEHOLDER, messages_from_llava
from vlkit.data.writing import SplitWriter, prepare_out_dir, sample_key, write_index
from vlkit.errors import DataError

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}
_SHOWN_PROBLEMS = 5


class _Bad(Exception):
    """An unusable entry; ``str(exc)`` is the reason."""


def _load_entries(json_path: Path) -> list[Any]:
    try:
        text = json_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read LLaVA JSON {json_path}: {exc}") from exc
    try:
        if json_path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{json_path} must hold a JSON list of {{id, image, conversations}} entries, "
                        f"got {type(data).__name__}")
    return data


def _image_bytes(image_dir: Path, rel: Any) -> tuple[bytes, str]:
    """The stored bytes and extension of an entry's image (original bytes for JPEG/PNG)."""
    if isinstance(rel, list):
        if len(rel) != 1:
            raise _Bad(f"{len(rel)} images in one entry; only one image per sample is supported")
        rel = rel[0]
    if not isinstance(rel, str) or not rel:
        raise _Bad(f"'image' must be a relative path string, got {rel!r}")
    path = image_dir / rel
    if not path.is_file():
        raise _Bad(f"image file not found: {path}")
    try:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
        raise _Bad(f"unreadable image {path} ({type(exc).__name__}: {exc})") from None
    if fmt in _KEEP_FORMATS:
        return data, _KEEP_FORMATS[fmt]
    buf = io.BytesIO()
    image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def _check_entry(entry: Any, image_dir: Path) -> None:
    """Cheap checks of one entry (structure, image file present); raises :class:`_Bad`."""
    if not isinstance(entry, dict):
        raise _Bad(f"entry must be an object, got {type(entry).__name__}")
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _Bad("missing or empty 'conversations' list")
    try:
        messages = messages_from_llava(conv)
    except DataError as exc:
        raise _Bad(str(exc)) from None
    if not any(m.role == "assistant" for m in messages):
        raise _Bad("no assistant ('gpt') turn to learn from")
    placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    has_image = entry.get("image") not in (None, "", [])
    if has_image and placeholders > 1:
        raise _Bad(f"{placeholders} {IMAGE_PLACEHOLDER!r} placeholders for one image")
    if not has_image and placeholders:
        raise _Bad(f"the conversation has an {IMAGE_PLACEHOLDER!r} placeholder but the entry has no image")
    rel = entry.get("image")
    if has_image and isinstance(rel, str) and not (image_dir / rel).is_file():
        raise _Bad(f"image file not found: {image_dir / rel}")


def _convert_entry(entry: Any, image_dir: Path) -> tuple[str, dict[str, Any], bytes | None, str]:
    """(id, JSON to store, image bytes or None, extension) of one entry; raises :class:`_Bad`."""
    _check_entry(entry, image_dir)
    has_image = entry.get("image") not in (None, "", [])
    image, ext = (_image_bytes(image_dir, entry["image"]) if has_image else (None, ""))
    conv = entry["conversations"]
    meta: dict[str, Any] = {"id": entry.get("id"), "conversations": conv}
    for field in ("type", "task", "types"):
        if field in entry:
            meta[field] = entry[field]
    entry_id = entry.get("id")
    return ("" if entry_id is None else str(entry_id)), meta, image, ext


def convert_llava(json_path: str | Path, image_dir: str | Path, out: str | Path, split: str = "train",
                  shard_size: int = 1000, val_fraction: float = 0.0, seed: int = 0, overwrite: bool = False,
                  strict: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a LLaVA-format JSON list (or ``.jsonl``) into shards ``{split}-000000.tar``, ... in ``out``.

    ``image`` paths are relative to ``image_dir``. With ``val_fraction`` > 0 a seeded random share of the
    entries goes to ``val-000000.tar``, .... Unusable entries are skipped, counted and the first few
    reported (printed, and in the returned index under ``skipped``); with ``strict`` the first one raises
    :class:`DataError` naming its index, id and problem. Returns the index (also written to
    ``out/index.json``, last). A non-empty ``out`` is refused unless ``overwrite``.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction > 0:
        raise DataError("split 'val' cannot also hold out a val_fraction; use another split name")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    entries = _load_entries(json_path)
    if not entries:
        raise DataError(f"{json_path} holds no entries")
    # the held-out share is drawn from the entries that pass the cheap checks, so it is not lost to them
    usable = []
    for i, entry in enumerate(entries):
        try:
            _check_entry(entry, image_dir)
            usable.append(i)
        except _Bad:
            pass
    random.Random(f"vlkit-llava:{seed}").shuffle(usable)
    n_val = round(len(usable) * val_fraction)
    if val_fraction > 0 and len(usable) >= 2:
        n_val = min(max(n_val, 1), len(usable) - 1)
    in_val = set(usable[:n_val])

    out = prepare_out_dir(out, overwrite)
    writers = {split: SplitWriter(out, split, shard_size)}
    if n_val:
        writers["val"] = SplitWriter(out, "val", shard_size)
    used: set[str] = set()
    problems: list[dict[str, Any]] = []
    skipped = 0
    try:
        with _progress(progress) as bar:
            task = bar.add_task(f"converting {json_path.name}", total=len(entries)) if bar is not None else None
            for i, entry in enumerate(entries):
                if bar is not None:
                    bar.advance(task)
                try:
                    entry_id, meta, image, ext = _convert_entry(entry, image_dir)
                except _Bad as exc:
                    entry_id = entry.get("id") if isinstance(entry, dict) else None
                    where = f"entry {i}" + (f" (id {entry_id!r})" if entry_id is not None else "")
                    if strict:
                        raise DataError(f"{json_path}: {where}: {exc}. Fix the entry, or convert without "
                                        "--strict to skip bad entries") from None
                    skipped += 1
                    if len(problems) < _SHOWN_PROBLEMS:
                        problems.append({"index": i, "id": entry_id, "reason": str(exc)})
                    continue
                key = sample_key(entry_id or f"sample{i:08d}", used)
                writers["val" if i in in_val else split].write(key, meta, image, ext)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {name: w.close() for name, w in writers.items()}
    splits = {name: s for name, s in splits.items() if s["samples"]}
    if not splits:
        raise DataError(f"{json_path}: none of its {len(entries)} entries could be converted (first problems: "
                        + "; ".join(f"entry {p['index']}: {p['reason']}" for p in problems) + ")")
    index: dict[str, Any] = {"splits": splits, "source": {"json": str(json_path), "image_dir": str(image_dir)},
                             "skipped": {"count": skipped, "examples": problems}}
    write_index(out, index)
    if skipped:
        from rich.console import Console

        console = Console(stderr=True)
        console.print(f"[yellow]skipped {skipped} of {len(entries)} entries (rerun with --strict to stop at the "
                      "first):[/]", highlight=False)
        for p in problems:
            console.print(f"  entry {p['index']} (id {p['id']!r}): {p['reason']}", highlight=False, markup=False,
                          soft_wrap=True)
        if skipped > len(problems):
            console.print(f"  ... and {skipped - len(problems)} more", highlight=False, markup=False,
                          soft_wrap=True)
    return index


def _progress(enabled: bool) -> Any:
    from contextlib import nullcontext

    if not enabled:
        return nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


__all__ = ["convert_llava"]
