"""Projectors from encoder width to LLM width, named as in LLaVA: ``linear`` or ``mlp{N}x_gelu``."""

from __future__ import annotations

import re

from torch import nn

from vlkit.errors import RecipeError

_MLP = re.compile(r"mlp([1-9]\d*)x_gelu")
VALID_FORMS = "'linear' or 'mlp{N}x_gelu' with N >= 1 (e.g. 'mlp2x_gelu': Linear, GELU, Linear)"


def check_projector(spec: str, key: str = "model.fusion.projector") -> int:
    """Validate a projector spec; return its number of Linear layers (``linear`` counts as 1)."""
    if spec == "linear":
        return 1
    match = _MLP.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise RecipeError(f"unknown projector {spec!r}; valid forms: {VALID_FORMS}", key)
    return int(match.group(1))


def build_projector(spec: str, in_dim: int, out_dim: int, *, key: str = "model.fusion.projector") -> nn.Module:
    """Build ``spec`` mapping ``in_dim`` -> ``out_dim`` channels.

    ``linear`` is ``nn.Linear(in_dim, out_dim)``; ``mlp{N}x_gelu`` is ``nn.Sequential(Linear(in_dim, out_dim),
    then (GELU, Linear(out_dim, out_dim)) repeated N - 1 times)``, the LLaVA convention.
    """
    depth = check_projector(spec, key)
    if spec == "linear":
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
