"""Where a part's weights come from: one resolver for local folders, hub ids, the ``local-dir:`` / ``hf-hub:``
prefixes and offline errors, shared by every part (so that every part reads a ``checkpoint:`` value alike)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlkit.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""``org/name`` (or a bare canonical name such as ``gpt2``), as the Hugging Face Hub names repositories."""
_PREFIXES = ("local-dir:", "hf-hub:")


@dataclass(frozen=True)
class Source:
    """A resolved ``checkpoint:`` value: a local path (expanded, checked to exist) or a hub repository id."""

    kind: Literal["local", "hub"]
    target: str
    """The folder/file path (``local``) or the repository id (``hub``), as ``from_pretrained`` takes it."""
    given: str
    """The recipe's value, for messages."""

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def path(self) -> Path:
        return Path(self.target)

    @property
    def open_clip_name(self) -> str:
        """The name open_clip / timm take: ``local-dir:PATH`` or ``hf-hub:ID``."""
        return f"{'local-dir' if self.is_local else 'hf-hub'}:{self.target}"


def looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and "--" not in value and ".." not in value


def resolve_source(value: str, key: str, *, what: str = "checkpoint", expect: Literal["dir", "file", "any"] = "dir",
                   hub: bool = True) -> Source:
    """Resolve the recipe value ``value`` of ``key``.

    ``hf-hub:ID`` is a hub id; ``local-dir:PATH`` a local path (must exist); any other value is a local path
    if it exists, else a hub id if it is shaped like one (``org/name``, not starting with ``.``, ``/`` or
    ``~``) and ``hub`` allows hub ids, else a CheckpointError naming the key and the path looked for.
    ``expect`` checks what a local path is (a folder written by ``save_pretrained``, a file, or either).
    """
    if not isinstance(value, str) or not value.strip():
        raise CheckpointError(f"{key}: expected a local folder or a Hugging Face hub id (org/name), got {value!r}")
    scheme, sep, rest = value.partition(":")
    if sep and f"{scheme}:" in _PREFIXES:
        if not rest:
            raise CheckpointError(f"{key}: {value!r} names nothing after '{scheme}:'")
        if scheme == "hf-hub":
            if not hub:
                raise CheckpointError(f"{key}: {value!r}: this setting takes a local path, not a hub id")
            return Source("hub", rest, value)
        return Source("local", str(_existing(rest, value, key, what, expect)), value)
    path = Path(value).expanduser()
    if path.exists():
        return Source("local", str(_existing(value, value, key, what, expect)), value)
    if hub and looks_like_hub_id(value):
        return Source("hub", value, value)
    hint = " nor a hub id (org/name)" if hub else ""
    raise CheckpointError(f"{key}: {what} not found: {value} (looked for {path.absolute()}; it is neither an "
                          f"existing path{hint})")


def _existing(target: str, value: str, key: str, what: str, expect: str) -> Path:
    path = Path(target).expanduser()
    if not path.exists():
        raise CheckpointError(f"{key}: {what} not found: {path} (from `{value}`)")
    if expect == "dir" and not path.is_dir():
        hint = (f"; for a GGUF file set `checkpoint: {path.parent}` and `gguf_file: {path.name}`"
                if path.suffix == ".gguf" else "")
        raise CheckpointError(f"{key}: {path} is a file; expected the folder holding config.json and the "
                              f"weights (e.g. written by save_pretrained){hint}")
    if expect == "file" and not path.is_file():
        raise CheckpointError(f"{key}: {path} is a folder; expected a file")
    return path


def is_offline() -> bool:
    """Whether the Hugging Face Hub may not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_error(source: Source, key: str, what: str, exc: BaseException) -> CheckpointError:
    """The CheckpointError for a failed load of ``what`` from ``source``: a broken local folder, a hub id that
    cannot be found offline (with the fix), or the library's own reason."""
    if source.is_local:
        return CheckpointError(f"{key}: cannot load the {what} from folder {source.target}: {exc}")
    if is_offline() and _missing_file(exc):
        return CheckpointError(
            f"{key}: the {what} of {source.target!r} could not be found offline: it is not a local folder and "
            f"not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. Download it once where "
            f"the Hub is reachable (`hf download {source.target}`, or run once without HF_HUB_OFFLINE), or set "
            f"`{key}` to a local folder holding it (e.g. one written by save_pretrained).")
    return CheckpointError(f"{key}: cannot load the {what} of {source.target!r}: {exc}")


def _missing_file(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it was raised from is a missing file (libraries wrap the Hub's own error,
    e.g. open_clip's RuntimeError around huggingface_hub's LocalEntryNotFoundError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
