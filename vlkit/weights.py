"""Weight files: a state dict as safetensors (tied tensors stored once, their aliases in the metadata).

Imports no other vlkit layer but :mod:`vlkit.errors`, so the model reads weights without the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vlkit.errors import CheckpointError

WEIGHTS = "model.safetensors"


def write_weights(state: dict[str, torch.Tensor], file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors; tensors sharing storage (tied weights) are stored once."""
    seen: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    meta = dict(metadata or {})
    meta["vlkit_aliases"] = json.dumps(aliases)
    save_file(tensors, str(file), metadata=meta)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights saved by :func:`write_weights` (a ``.safetensors`` file or a folder with model.safetensors)."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no weights at {file}: expected a {WEIGHTS} written by vlkit")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may be truncated") from exc
    for key, target in json.loads(meta.get("vlkit_aliases", "{}")).items():
        state[key] = state[target]
    return state


def load_complete_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model``, failing unless every tensor is filled (a key missing from ``state`` is
    fine when it shares storage with one that is loaded: tied weights). ``what`` starts the error message."""
    expected = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {expected[k].data_ptr() for k in state if k in expected}
    missing = [k for k in missing if expected[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
                              f"unexpected (e.g. {unexpected[:3]})")


__all__ = ["WEIGHTS", "load_complete_state", "read_weights", "write_weights"]
