"""Weight mixing (SPHINX): ``theta = beta * A + (1 - beta) * B`` for two checkpoints of one architecture.

Inputs, detected per path (A and B may differ in kind as long as their tensors match):

* a **vlkit run folder** (``recipe.yaml`` + ``stage*/last/``): its latest stage checkpoint; the output is a
  run folder (the recipe and the mixed weights at the same stage path), so ``vlkit validate`` and
  ``vlkit predict`` work on it;
* a **vlkit stage checkpoint** (``stage*/last/``: ``model.safetensors`` with keys ``model.*``, + ``state.pt``):
  the output folder holds the mixed ``model.safetensors`` (no optimizer state);
* a **Hugging Face model folder** (``model.safetensors``, or shards ``model-0000x-of-0000y.safetensors`` with
  ``model.safetensors.index.json``): the output is a model folder with the same files (config, tokenizer,
  ...) and the same sharding, loadable with ``from_pretrained``;
* a **.safetensors file**: the output is a file when ``out`` ends in ``.safetensors``, otherwise a folder
  holding the mixed file under A's name.

Tensors are mixed in float32 (float64 stays float64) and cast back to A's dtype; integer and bool tensors
(counters, index buffers) must be equal in A and B and are copied. ``only`` restricts mixing to some parts
(key prefixes such as ``llm``; a vlkit checkpoint's ``model.`` prefix is implied): every other tensor is
copied from A. Mismatched keys, shapes or tied-weight layouts are refused before anything is written, and
the output is written atomically (a temporary sibling renamed into place), never over an existing path
unless ``overwrite``. Every output folder also gets ``mix.json`` recording the inputs and ``beta``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlkit.atomic import atomic_dir, atomic_file
from vlkit.errors import CheckpointError
from vlkit.training.checkpoint import STATE, WEIGHTS, latest_checkpoint

HF_INDEX = "model.safetensors.index.json"
MIX_INFO = "mix.json"
VLKIT_PREFIX = "model."
_ALIASES = "vlkit_aliases"
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

Kind = Literal["run", "stage", "hf", "file"]


@dataclass
class WeightSource:
    """Where the tensors of one side of a mix live.

    ``files`` are the safetensors files (one, or the shards of a Hugging Face model, in index order),
    ``root`` the folder (or file) the user named, ``checkpoint`` the folder that holds ``files``.
    """

    path: Path
    kind: Kind
    files: list[Path]
    checkpoint: Path
    keys: dict[str, tuple[tuple[int, ...], str, Path]] = field(default_factory=dict)
    """``{key: (shape, safetensors dtype, file)}`` of every stored tensor."""
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)

    @property
    def vlkit(self) -> bool:
        """A vlkit checkpoint (keys prefixed ``model.``)."""
        return self.kind in ("run", "stage")


def _has_safetensors_metadata_key(file: Path, key: str) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return key in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def resolve_source(path: str | Path) -> WeightSource:
    """Detect what ``path`` is (run folder, stage checkpoint, Hugging Face folder, safetensors file) and
    index its tensors (names, shapes, dtypes; no data is read). Raises CheckpointError if it is none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights to mix not found: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file; mix-weights reads safetensors weights only")
        source = WeightSource(path, "file", [path], path.parent)
    elif (path / "recipe.yaml").is_file():
        ckpt = latest_checkpoint(path)
        source = WeightSource(path, "run", [ckpt / WEIGHTS], ckpt)
    elif (path / HF_INDEX).is_file():
        try:
            index = json.loads((path / HF_INDEX).read_text())
            shards = list(dict.fromkeys(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path / HF_INDEX} is not a valid safetensors index ({exc})") from exc
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) {missing[:3]} named in {HF_INDEX} are missing")
        source = WeightSource(path, "hf", [path / s for s in shards], path)
    elif (path / WEIGHTS).is_file():
        vlkit = (path / STATE).is_file() or _has_safetensors_metadata_key(path / WEIGHTS, _ALIASES)
        source = WeightSource(path, "stage" if vlkit else "hf", [path / WEIGHTS], path)
    else:
        present = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(
            f"{path} holds no weights to mix: expected a vlkit run folder (recipe.yaml), a stage checkpoint or "
            f"Hugging Face folder with {WEIGHTS} (or sharded weights with {HF_INDEX}), or a .safetensors file; "
            f"found {present or 'nothing'}"
        )
    for file in source.files:
        try:
            with safe_open(str(file), framework="pt") as f:
                source.metadata[file] = dict(f.metadata() or {})
                names = list(f.keys())  # a safetensors handle is not iterable
                for key in names:
                    sl = f.get_slice(key)
                    if key in source.keys:
                        raise CheckpointError(f"{path}: tensor {key!r} is stored twice ({source.keys[key][2].name} "
                                              f"and {file.name})")
                    source.keys[key] = (tuple(sl.get_shape()), sl.get_dtype(), file)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may be truncated") from exc
    return source


def _part_of(key: str, prefixes: Sequence[str], vlkit: bool) -> bool:
    names = [key, key.removeprefix(VLKIT_PREFIX)] if vlkit and key.startswith(VLKIT_PREFIX) else [key]
    return any(n == p or n.startswith(p + ".") for n in names for p in prefixes)


def _parts(keys: Sequence[str], vlkit: bool) -> list[str]:
    """Top-level parts of a key set (``encoders.clip``, ``fusion``, ``llm`` for vlkit checkpoints)."""
    out: dict[str, None] = {}
    for key in keys:
        name = key.removeprefix(VLKIT_PREFIX) if vlkit else key
        head = name.split(".")
        out[".".join(head[:2]) if head[0] == "encoders" and len(head) > 2 else head[0]] = None
    return list(out)


def _show(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def check_compatible(a: WeightSource, b: WeightSource, only: Sequence[str] | None = None) -> list[str]:
    """The keys to mix; CheckpointError naming the keys if A and B differ in keys, shapes or tied weights.

    With ``only``, just the keys of those parts must match (other keys are copied from A).
    """
    keys_a = list(a.keys)
    if only:
        selected = [k for k in keys_a if _part_of(k, only, a.vlkit)]
        if not selected:
            raise CheckpointError(f"--only {', '.join(only)} matches no tensor of {a.path}; its parts are "
                                  f"{_show(_parts(keys_a, a.vlkit), 12)}")
        in_b = {k for k in b.keys if _part_of(k, only, b.vlkit)}
    else:
        selected = keys_a
        in_b = set(b.keys)
    only_a = [k for k in selected if k not in b.keys]
    only_b = sorted(in_b - set(selected))
    if only_a or only_b:
        raise CheckpointError(
            f"{a.path} and {b.path} do not hold the same tensors"
            + (f"; only in A: {_show(only_a)}" if only_a else "")
            + (f"; only in B: {_show(only_b)}" if only_b else "")
            + ". Mix checkpoints of the same architecture (or restrict the mix with --only)."
        )
    shapes = [f"{k} {list(a.keys[k][0])} vs {list(b.keys[k][0])}" for k in selected if a.keys[k][0] != b.keys[k][0]]
    if shapes:
        raise CheckpointError(f"{a.path} and {b.path} differ in tensor shapes: {_show(shapes)}")
    kinds = [f"{k} {a.keys[k][1]} vs {b.keys[k][1]}" for k in selected
             if (a.keys[k][1] in _FLOAT_DTYPES) != (b.keys[k][1] in _FLOAT_DTYPES)]
    if kinds:
        raise CheckpointError(f"{a.path} and {b.path} differ in tensor kinds (float vs integer): {_show(kinds)}")
    aliases_a = _aliases(a)
    aliases_b = _aliases(b)
    tied = sorted(k for k in set(aliases_a) | set(aliases_b)
                  if aliases_a.get(k) != aliases_b.get(k) and (not only or _part_of(k, only, a.vlkit)))
    if tied:
        raise CheckpointError(f"{a.path} and {b.path} tie different weights: {_show(tied)}")
    return selected


def _aliases(source: WeightSource) -> dict[str, str]:
    out: dict[str, str] = {}
    for meta in source.metadata.values():
        with suppress(ValueError):
            out.update(json.loads(meta.get(_ALIASES, "{}")))
    return out


def mix_tensor(a: torch.Tensor, b: torch.Tensor, beta: float, key: str = "") -> torch.Tensor:
    """``beta * a + (1 - beta) * b`` computed in float32 (float64 if ``a`` is float64), cast to ``a.dtype``.

    Integer and bool tensors are not interpolated: they must be equal (CheckpointError otherwise) and
    ``a`` is returned. ``beta`` 1 returns ``a`` and 0 returns ``b`` exactly (up to the cast to A's dtype).
    """
    if a.shape != b.shape:
        raise CheckpointError(f"tensor {key!r}: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    if not (a.is_floating_point() or a.is_complex()):
        if b.is_floating_point() or not torch.equal(a, b.to(a.dtype)):
            raise CheckpointError(f"integer/bool tensor {key!r} differs between the checkpoints; such tensors "
                                  f"(counters, index buffers) cannot be interpolated")
        return a
    compute = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    mixed = beta * a.to(compute) + (1.0 - beta) * b.to(compute)
    return mixed.to(a.dtype)


@contextmanager
def _open_all(source: WeightSource) -> Iterator[dict[Path, Any]]:
    with ExitStack() as stack:
        yield {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in source.files}


def _check_out(out: Path, sources: Sequence[WeightSource], overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside an input, or exists (unless ``overwrite``)."""
    resolved = out.resolve()
    for s in sources:
        p = s.path.resolve()
        if resolved == p or p.is_relative_to(resolved) or (p.is_dir() and resolved.is_relative_to(p)):
            raise CheckpointError(f"output {out} overlaps the input {s.path}; write the mix somewhere else")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")


def mix_weights(a: str | Path, b: str | Path, beta: float, out: str | Path,
                only: str | Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write ``theta = beta * A + (1 - beta) * B`` to ``out``; return the path written.

    ``a`` / ``b``: vlkit run folders, stage checkpoints (``.../last``), Hugging Face model folders or
    ``.safetensors`` files of one architecture. ``only``: part(s) to mix (e.g. ``"llm"``, ``["llm",
    "fusion"]``, or any key prefix); other tensors are copied from A. The output mirrors A's layout (see
    the module docstring). Raises CheckpointError for missing inputs, mismatched keys/shapes/tied weights,
    unequal integer tensors, or an existing ``out`` without ``overwrite``; ValueError for ``beta`` outside
    [0, 1].
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (theta = beta * A + (1 - beta) * B), got {beta}")
    prefixes = [only] if isinstance(only, str) else list(only or [])
    src_a, src_b = resolve_source(a), resolve_source(b)
    selected = set(check_compatible(src_a, src_b, prefixes or None))
    out = Path(out).expanduser()
    _check_out(out, [src_a, src_b], overwrite)

    info = {"a": str(src_a.path), "b": str(src_b.path), "beta": beta, "only": prefixes or None,
            "kind_a": src_a.kind, "kind_b": src_b.kind, "mixed_tensors": len(selected),
            "copied_tensors": len(src_a.keys) - len(selected),
            "formula": "theta = beta * A + (1 - beta) * B"}

    def write_files(destination: Callable[[Path], Path]) -> None:
        """Mix file by file (one shard of A in memory at a time) and save each to ``destination(file)``."""
        with _open_all(src_a) as files_a, _open_all(src_b) as files_b:
            for file in src_a.files:
                fa = files_a[file]
                mixed: dict[str, torch.Tensor] = {}
                names = list(fa.keys())
                for key in names:
                    ta = fa.get_tensor(key)
                    if key in selected:
                        tb = files_b[src_b.keys[key][2]].get_tensor(key)
                        ta = mix_tensor(ta, tb, beta, key)
                    mixed[key] = ta.contiguous()
                # A's metadata is kept as is: the format tag transformers checks, and vlkit's tied-weight aliases
                save_file(mixed, str(destination(file)), metadata=src_a.metadata[file] or {"format": "pt"})
                del mixed

    if src_a.kind == "file" and out.suffix == ".safetensors":
        with atomic_file(out) as tmp_file:
            write_files(lambda _: tmp_file)
        return out

    with atomic_dir(out) as tmp:
        if src_a.kind == "run":
            stage_rel = src_a.checkpoint.relative_to(src_a.path)
            target = tmp / stage_rel
            target.mkdir(parents=True)
            shutil.copy2(src_a.path / "recipe.yaml", tmp / "recipe.yaml")
            info["checkpoint"] = str(stage_rel)
        else:
            target = tmp
        if src_a.kind == "hf":  # config, tokenizer, generation config, index: everything but the weights
            weight_names = {f.name for f in src_a.files}
            for item in src_a.path.iterdir():
                if item.name in weight_names or item.name == MIX_INFO or item.name.startswith("."):
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
        write_files(lambda file: target / file.name)
        (tmp / MIX_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out
