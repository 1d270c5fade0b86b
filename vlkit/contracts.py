"""Part contracts, checked when a part is built and on its first forward.

A part that breaks its interface (docs/parts.md) would otherwise fail deep inside another part, e.g. an
encoder returning ``(B, C, N)`` surfaces as ``mat1 and mat2 shapes cannot be multiplied`` in the fusion.
:func:`check_part` (called by :meth:`vlkit.registry.Registry.build`) checks the required attributes at
once and registers a forward hook that checks the first output (names, shapes, dtype, device) and then
removes itself, so it costs nothing afterwards. Each violation is one :class:`ContractError` naming the
part, its recipe path and the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlkit.errors import VlkitError


class ContractError(VlkitError):
    """A part does not do what its interface promises (see docs/parts.md)."""

    def __init__(self, kind: str, name: str, where: str, rule: str) -> None:
        at = f" ({where})" if where else ""
        super().__init__(f"{kind} {name!r}{at} breaks the {kind} contract: {rule} (see docs/parts.md)")
        self.kind, self.name, self.where, self.rule = kind, name, where, rule


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _attr(part: Any, attr: str) -> tuple[bool, Any]:
    try:
        return True, getattr(part, attr)
    except AttributeError:
        return False, None
    except Exception as exc:  # a property that fails is as good as missing, with its reason
        return False, exc


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(str(d) for d in t.shape)})"


# ---------------------------------------------------------------------------------------------- encoders


def encoder_problems(part: Any) -> list[str]:
    """Attribute rules of a vision encoder (empty: none broken)."""
    problems = []
    ok, dims = _attr(part, "stream_dims")
    if not ok:
        problems.append("it has no `stream_dims` (set `self.stream_dims = {stream: channels}` in __init__)")
    elif not (isinstance(dims, Mapping) and dims and all(isinstance(k, str) and _positive_int(v)
                                                           for k, v in dims.items())):
        problems.append(f"`stream_dims` must map stream names to positive channel counts, got {dims!r}")
    ok, n = _attr(part, "num_tokens")
    if not ok:
        problems.append("it has no `num_tokens` (set `self.num_tokens = N`, the tokens of every stream, in "
                        "__init__)")
    elif not _positive_int(n):
        problems.append(f"`num_tokens` must be a positive int, got {n!r}")
    ok, pre = _attr(part, "preprocess")
    if not ok:
        problems.append("it has no `preprocess` (set `self.preprocess = Preprocess(size, mean, std)` in "
                        "__init__)")
    else:
        size, mean, std = (getattr(pre, a, None) for a in ("size", "mean", "std"))
        if not _positive_int(size) or len(mean or ()) != 3 or len(std or ()) != 3:
            problems.append(f"`preprocess` must give a positive `size` and 3-value `mean` and `std`, got {pre!r}")
        else:
            ok, image_size = _attr(part, "image_size")
            if not ok or not _positive_int(image_size):
                problems.append(f"`image_size` must be a positive int, got {image_size!r}")
    return problems


def encoder_output_problems(part: Any, pixel_values: Any, out: Any) -> list[str]:
    """Rules of an encoder's forward output: ``{stream: (B, num_tokens, stream_dims[stream])}``, floating
    point, on the input's device."""
    if not isinstance(out, Mapping):
        return [f"forward must return a dict {{stream: (B, N, C) tensor}}, got {type(out).__name__}"]
    dims, n = dict(part.stream_dims), part.num_tokens
    problems = []
    if set(out) != set(dims):
        problems.append(f"forward returned streams {sorted(out)} but `stream_dims` declares {sorted(dims)}")
    batch = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else None
    # `num_tokens` is the count at the encoder's own input size; at another size (position-embedding
    # interpolation) only the batch and channel dimensions are checked
    native = not isinstance(pixel_values, torch.Tensor) or pixel_values.shape[-1] == getattr(part, "image_size", None)
    for name, t in out.items():
        if name not in dims:
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"stream {name!r} must be a tensor, got {type(t).__name__}")
            continue
        want = (batch, n if native or t.dim() != 3 else t.shape[1], dims[name])
        if tuple(t.shape) != want:
            hint = ""
            if t.dim() == 3 and tuple(t.shape) == (batch, dims[name], n):
                hint = "; it looks transposed: return (B, N, C), e.g. `x.flatten(2).transpose(1, 2)`"
            problems.append(f"stream {name!r} has shape {_shape(t)}, expected (B, num_tokens, channels) = "
                            f"({batch}, {n}, {dims[name]}){hint}")
        if not t.is_floating_point():
            problems.append(f"stream {name!r} must be floating point, got {t.dtype}")
        if isinstance(pixel_values, torch.Tensor) and t.device != pixel_values.device:
            problems.append(f"stream {name!r} is on {t.device} but the pixels were on {pixel_values.device}")
    return problems


# ----------------------------------------------------------------------------------------------- fusions


def fusion_problems(part: Any) -> list[str]:
    ok, n = _attr(part, "num_tokens")
    if not ok:
        return ["it has no `num_tokens` (set `self.num_tokens = T`, the visual tokens per image, in __init__)"]
    if not _positive_int(n):
        return [f"`num_tokens` must be a positive int, got {n!r}"]
    return []


def fusion_output_problems(part: Any, streams: Any, out: Any, hidden_size: int | None) -> list[str]:
    """Rules of a fusion's forward output: ``(B, num_tokens, hidden_size)``, floating point, on the device
    of its input streams."""
    if not isinstance(out, torch.Tensor):
        return [f"forward must return a (B, num_tokens, hidden_size) tensor, got {type(out).__name__}"]
    first = next((t for t in streams.values() if isinstance(t, torch.Tensor)), None) \
        if isinstance(streams, Mapping) else None
    batch = first.shape[0] if first is not None else out.shape[0]
    want = (batch, part.num_tokens, hidden_size if hidden_size is not None else out.shape[-1])
    problems = []
    if tuple(out.shape) != want:
        problems.append(f"forward returned {_shape(out)}, expected (B, num_tokens, hidden_size) = "
                        f"({want[0]}, {want[1]}, {want[2]})")
    if not out.is_floating_point():
        problems.append(f"output must be floating point, got {out.dtype}")
    if first is not None and out.device != first.device:
        problems.append(f"output is on {out.device} but the streams were on {first.device}")
    return problems


# -------------------------------------------------------------------------------------------- llms, data


def llm_problems(part: Any) -> list[str]:
    problems = [f"it has no `{a}`" for a in ("model", "tokenizer", "template") if not _attr(part, a)[0]]
    if not problems:
        ok, hidden = _attr(part, "hidden_size")
        if not ok or not _positive_int(hidden):
            problems.append(f"`hidden_size` must be a positive int, got {hidden!r}")
    for method in ("embed", "generate"):
        if not callable(getattr(part, method, None)):
            problems.append(f"it has no method `{method}`")
    return problems


def dataset_problems(part: Any) -> list[str]:
    return [f"it has no method `{m}`" for m in ("train_loader", "val_loader", "num_samples")
            if not callable(getattr(part, m, None))]


# ----------------------------------------------------------------------------------------------- checks


class _FirstForwardCheck:
    """Forward hook that checks a part's first output, then does nothing (a picklable object, not a closure,
    so models with it can still be pickled or deep-copied)."""

    def __init__(self, kind: str, name: str, where: str, hidden_size: int | None = None) -> None:
        self.kind, self.name, self.where, self.hidden_size = kind, name, where, hidden_size
        self.done = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.done:
            return
        self.done = True
        first = args[0] if args else next(iter(kwargs.values()), None)
        if self.kind == "encoder":
            problems = encoder_output_problems(module, first, out)
        else:
            problems = fusion_output_problems(module, first, out, self.hidden_size)
        if problems:
            raise ContractError(self.kind, self.name, self.where, "; ".join(problems))


def check_part(kind: str, part: Any, name: str, where: str = "", **context: Any) -> None:
    """Check a freshly built part's attributes now and (for encoders and fusions) its first forward output.

    ``kind`` is the registry's kind (``encoder``, ``fusion``, ``llm``, ``dataset``; others are not checked);
    ``context`` what the part was built with (a fusion's ``hidden_size``)."""

    def fail(rule: str) -> None:
        raise ContractError(kind, name, where, rule)

    if kind == "encoder":
        problems = encoder_problems(part)
        if problems:
            fail("; ".join(problems))
        if isinstance(part, nn.Module):
            part.register_forward_hook(_FirstForwardCheck(kind, name, where), with_kwargs=True)
    elif kind == "fusion":
        problems = fusion_problems(part)
        if problems:
            fail("; ".join(problems))
        if isinstance(part, nn.Module):
            hook = _FirstForwardCheck(kind, name, where, context.get("hidden_size"))
            part.register_forward_hook(hook, with_kwargs=True)
    elif kind == "llm":
        problems = llm_problems(part)
        if problems:
            fail("; ".join(problems))
    elif kind == "dataset":
        problems = dataset_problems(part)
        if problems:
            fail("; ".join(problems))
