"""``sphinx_mix``: SPHINX's mixed visual embedding of several encoders.

Streams are of two kinds:

* **grid streams**: ``g*g`` tokens of a square grid (row-major), optionally after one leading CLS/mean
  token (``1 + g*g``). They are resampled to a common grid when their grids differ (``resample:
  nearest | bilinear | pool``; target = the largest grid, or ``grid:``), concatenated along channels and
  projected: Linear + LayerNorm to the LLM width.
* **query streams** (e.g. a Q-Former's ``queries``): a fixed set of tokens with no spatial layout. Each
  gets its own Linear + LayerNorm; they are concatenated along tokens *in front* of the grid tokens.

Learnable begin/end-of-image embeddings wrap the result (``wrap: true``), so a view becomes
``[BOI, queries..., lead token, grid tokens..., EOI]``. SPHINX at 224 px: CLIP ViT-L/14 257 (CLS + 16x16)
+ ConvNeXt-XXL 8x8 with a mean token, upsampled x2 (nearest) to 257 + DINOv2 ViT-g/14 257 (CLS + 16x16)
-> 257 x (1024 + 3072 + 1536) -> Linear(5632, H) + LN; Q-Former 32 x 768 -> Linear(768, H) + LN in front:
32 + 257 = 289 tokens (+2 with the begin/end embeddings).

Leading tokens are handled consistently: with ``lead_token: keep`` (default) the mixed grid has one
leading token whenever any grid stream has one, and a grid stream without one contributes its grid mean
in that slot; ``drop`` removes leading tokens from every stream (``g*g`` tokens only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import RecipeError
from vlkit.fusions import resolve_streams
from vlkit.fusions.base import Fusion
from vlkit.fusions.projector import build_projector, check_projector
from vlkit.registry import FUSIONS

_KEY = "model.fusion"


def grid_layout(num_tokens: int) -> tuple[int, bool] | None:
    """``(grid side, has leading token)`` of a stream with ``num_tokens`` tokens, or None if neither
    ``g*g`` nor ``1 + g*g``. A square count is read as a plain grid (``1 + g*g`` needs a non-square count)."""
    side = math.isqrt(num_tokens)
    if side >= 1 and side * side == num_tokens:
        return side, False
    side = math.isqrt(num_tokens - 1) if num_tokens > 1 else 0
    if side >= 1 and side * side == num_tokens - 1:
        return side, True
    return None


def resample_grid(tokens: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """``(B, g*g, C)`` row-major grid tokens -> ``(B, grid*grid, C)`` by ``nearest``, ``bilinear`` or
    ``pool`` (adaptive average pooling) resampling. Unchanged when ``g == grid``."""
    batch, n, channels = tokens.shape
    side = math.isqrt(n)
    if side == grid:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    if mode == "nearest":
        fmap = F.interpolate(fmap, size=(grid, grid), mode="nearest")
    elif mode == "bilinear":
        fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    elif mode == "pool":
        fmap = F.adaptive_avg_pool2d(fmap, (grid, grid))
    else:  # pragma: no cover - validated by Args
        raise ValueError(f"unknown resample mode {mode!r}")
    return fmap.flatten(2).transpose(1, 2)


def _projector(spec: str, in_dim: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(build_projector(spec, in_dim, hidden_size, key=f"{_KEY}.projector"), nn.LayerNorm(hidden_size))


@FUSIONS.register("sphinx_mix")
class SphinxMixFusion(Fusion):
    """SPHINX mix: grid streams channel-concatenated, query streams in front, begin/end-of-image wrap.

    Grid streams are resampled to a common grid, concatenated along channels and projected (Linear +
    LayerNorm); each query stream gets its own Linear + LayerNorm and goes in front along tokens; learnable
    begin/end-of-image embeddings wrap the result. See the module docstring for SPHINX's sizes.
    """

    @dataclass
    class Args:
        streams: list[str] | None = None
        """Qualified stream names to mix (``"<encoder key>.<stream>"``); None: all, in encoder order."""
        query_streams: list[str] | None = None
        """Streams that are query tokens, not a grid (e.g. ``[qformer.queries]``); they go in front, in this
        order. None: detected as the streams whose count is neither ``g*g`` nor ``1 + g*g`` (say it
        explicitly: 16 queries would look like a 4x4 grid)."""
        resample: Literal["nearest", "bilinear", "pool"] = "nearest"
        """How grid streams on a different grid reach the target grid."""
        grid: int | None = None
        """Target grid side; None: the largest grid among the grid streams."""
        lead_token: Literal["keep", "drop"] = "keep"
        """``keep``: one leading (CLS/mean) token if any grid stream has one (streams without one supply
        their grid mean); ``drop``: grid tokens only."""
        projector: str = "linear"
        """Projector before each LayerNorm: ``linear`` (SPHINX) or ``mlp{N}x_gelu``."""
        wrap: bool = True
        """Wrap the tokens in learnable begin/end-of-image embeddings (2 extra tokens)."""

        def __post_init__(self) -> None:
            check_projector(self.projector, f"{_KEY}.projector")
            if self.grid is not None and self.grid < 1:
                raise RecipeError(f"must be a positive grid side, got {self.grid}", f"{_KEY}.grid")
            if self.query_streams is not None:
                duplicates = sorted({s for s in self.query_streams if self.query_streams.count(s) > 1})
                if duplicates:
                    raise RecipeError(f"stream(s) {duplicates} listed more than once", f"{_KEY}.query_streams")
                if self.streams is not None:
                    outside = [s for s in self.query_streams if s not in self.streams]
                    if outside:
                        raise RecipeError(f"{outside} are not among the selected `streams` {self.streams}",
                                          f"{_KEY}.query_streams")

    def __init__(self, args: Args, streams: dict[str, tuple[int, int]], hidden_size: int) -> None:
        super().__init__()
        self.args = args
        if hidden_size <= 0:
            raise RecipeError(f"fusion 'sphinx_mix': hidden_size must be positive, got {hidden_size}")
        names = resolve_streams(streams, args.streams, "sphinx_mix")
        if args.query_streams is not None:
            unknown = [s for s in args.query_streams if s not in streams]
            if unknown:
                raise RecipeError(f"fusion 'sphinx_mix': unknown stream(s) {unknown}; the encoders provide "
                                  f"{list(streams)}", f"{_KEY}.query_streams")
            queries = list(args.query_streams)
        else:
            queries = [n for n in names if grid_layout(streams[n][0]) is None]
        grids = [n for n in names if n not in queries]
        if not grids:
            raise RecipeError(f"fusion 'sphinx_mix' needs at least one grid stream (g*g or 1 + g*g tokens); all "
                              f"of {names} are query streams", f"{_KEY}.query_streams")
        layouts: dict[str, tuple[int, bool]] = {}
        for name in grids:
            layout = grid_layout(streams[name][0])
            if layout is None:
                raise RecipeError(
                    f"fusion 'sphinx_mix': stream {name!r} has {streams[name][0]} tokens, which is neither a square "
                    f"grid g*g nor 1 + g*g; list it in `query_streams` if it is a set of query tokens",
                    f"{_KEY}.query_streams" if args.query_streams is not None else f"{_KEY}.streams")
            layouts[name] = layout

        self.query_names = queries
        """Query streams, in the order their tokens go (in front of the grid)."""
        self.grid_names = grids
        """Grid streams, in the order their channels are concatenated."""
        self.layouts = layouts
        """``{grid stream: (grid side, has leading token)}`` as the encoders deliver them."""
        self.grid = args.grid or max(side for side, _ in layouts.values())
        """Side of the common grid all grid streams are resampled to."""
        self.lead = args.lead_token == "keep" and any(lead for _, lead in layouts.values())
        """Whether the mixed grid has a leading (CLS/mean) token."""
        self.grid_proj = _projector(args.projector, sum(streams[n][1] for n in grids), hidden_size)
        self.query_projs = nn.ModuleList(_projector(args.projector, streams[n][1], hidden_size) for n in queries)
        self.query_tokens = [streams[n][0] for n in queries]
        if args.wrap:
            # SPHINX initialises its begin/end-of-image embeddings uniformly in [0, 1)
            self.begin_image = nn.Parameter(torch.rand(1, 1, hidden_size))
            self.end_image = nn.Parameter(torch.rand(1, 1, hidden_size))
        else:
            self.begin_image = self.end_image = None
        self.grid_tokens = self.grid * self.grid + int(self.lead)
        """Tokens of the mixed grid (``grid**2``, + 1 with a leading token)."""
        self.num_tokens = sum(self.query_tokens) + self.grid_tokens + (2 if args.wrap else 0)

    def mix_grid(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """The grid streams aligned and channel-concatenated, before the projection: ``(B, grid_tokens, sum C)``."""
        parts = []
        for name in self.grid_names:
            tokens = streams[name]
            _, has_lead = self.layouts[name]
            lead, grid = (tokens[:, :1], tokens[:, 1:]) if has_lead else (None, tokens)
            resampled = resample_grid(grid, self.grid, self.args.resample)
            if self.lead:
                lead = lead if lead is not None else grid.mean(dim=1, keepdim=True)
                resampled = torch.cat([lead, resampled], dim=1)
            parts.append(resampled)
        return torch.cat(parts, dim=-1)

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (B, N_i, C_i)}`` -> ``(B, num_tokens, hidden_size)``:
        ``[BOI, queries of each query stream, mixed grid, EOI]``."""
        out = [proj(streams[name]) for proj, name in zip(self.query_projs, self.query_names)]
        out.append(self.grid_proj(self.mix_grid(streams)))
        if self.begin_image is not None and self.end_image is not None:
            batch = out[-1].shape[0]
            dtype = out[-1].dtype
            out = [self.begin_image.expand(batch, -1, -1).to(dtype), *out,
                   self.end_image.expand(batch, -1, -1).to(dtype)]
        return torch.cat(out, dim=1)
