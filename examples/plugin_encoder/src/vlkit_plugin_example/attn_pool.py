"""``attn_pool``: a Perceiver-resampler-style fusion with a fixed number of visual tokens.

Every selected stream is projected to a common width and tagged with a learned per-stream embedding; the
streams are concatenated along tokens (so they may differ in token count and width). ``num_queries``
learned query vectors then go through ``depth`` blocks of cross-attention (keys/values: the stream tokens
plus the queries themselves, as in Flamingo's resampler) and a feed-forward layer, and a final projection
maps them to the LLM width. The LLM sees ``num_queries`` tokens per image however many the encoders make::

    model:
      fusion: {name: attn_pool, num_queries: 16, heads: 4, depth: 2}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlkit.errors import RecipeError
from vlkit.fusions import resolve_streams
from vlkit.fusions.base import Fusion


class ResamplerBlock(nn.Module):
    """Queries cross-attend to ``[tokens; queries]``, then a GELU feed-forward; both pre-norm residual."""

    def __init__(self, width: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, width * ffn_mult), nn.GELU(), nn.Linear(width * ffn_mult, width))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = torch.cat([self.norm_kv(tokens), q], dim=1)
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class AttentionPoolFusion(Fusion):
    """``num_queries`` learned queries attend to all selected streams (any token counts and widths)."""

    @dataclass
    class Args:
        num_queries: int = 16
        """Visual tokens per image handed to the LLM (T)."""
        width: int | None = None
        """Internal width of the queries and attention (default: the LLM's hidden size)."""
        heads: int = 4
        """Attention heads; must divide ``width``."""
        depth: int = 1
        """Number of cross-attention + feed-forward blocks."""
        ffn_mult: int = 2
        """Feed-forward hidden width as a multiple of ``width``."""
        streams: list[str] | None = None
        """Qualified stream names (``"<encoder key>.<stream>"``); None: all, in encoder order."""

        def __post_init__(self) -> None:
            bad = [f"{name} must be positive, got {value}"
                   for name, value in (("num_queries", self.num_queries), ("heads", self.heads),
                                       ("depth", self.depth), ("ffn_mult", self.ffn_mult), ("width", self.width))
                   if value is not None and value < 1]
            if bad:
                raise RecipeError("attn_pool fusion: " + "; ".join(bad))

    def __init__(self, args: Args, streams: dict[str, tuple[int, int]], hidden_size: int) -> None:
        super().__init__()
        self.args = args
        fusion = getattr(type(self), "registered_name", type(self).__name__)
        names = resolve_streams(streams, args.streams, fusion)
        width = args.width or hidden_size
        if width % args.heads:
            raise RecipeError(f"fusion {fusion!r}: heads ({args.heads}) must divide the attention width "
                              f"({width}{'' if args.width else ', the LLM hidden size'}); set `heads` or `width`",
                              "model.fusion.heads")
        self.stream_names = names
        self.inputs = nn.ModuleList(nn.Linear(streams[name][1], width) for name in names)
        self.stream_embed = nn.Parameter(torch.zeros(len(names), width))
        self.queries = nn.Parameter(torch.randn(args.num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(width, args.heads, args.ffn_mult) for _ in range(args.depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, hidden_size)
        self.num_tokens = args.num_queries

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (B, N_i, C_i)}`` -> ``(B, num_queries, hidden_size)``."""
        tokens = torch.cat([proj(streams[name]) + self.stream_embed[i]
                            for i, (name, proj) in enumerate(zip(self.stream_names, self.inputs))], dim=1)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens)
        return self.out(self.norm(queries))
