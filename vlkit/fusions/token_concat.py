"""``token_concat``: project each stream to the LLM width, then concatenate along tokens (``T = sum N``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlkit.errors import RecipeError
from vlkit.fusions import resolve_streams
from vlkit.fusions.base import Fusion
from vlkit.fusions.projector import build_projector, check_projector
from vlkit.registry import FUSIONS


@FUSIONS.register("token_concat")
class TokenConcatFusion(Fusion):
    """Each selected stream gets its own projector (or one shared one); outputs are concatenated along
    tokens in stream order, so streams may differ in token count and width."""

    @dataclass
    class Args:
        projector: str = "mlp2x_gelu"
        """``linear`` or ``mlp{N}x_gelu``, applied per stream."""
        streams: list[str] | None = None
        """Qualified stream names (``"<encoder key>.<stream>"``); None: all, in encoder order."""
        shared_projector: bool = False
        """One projector for all streams (their widths must be equal) instead of one per stream."""

        def __post_init__(self) -> None:
            check_projector(self.projector)

    def __init__(self, args: Args, streams: dict[str, tuple[int, int]], hidden_size: int) -> None:
        super().__init__()
        self.args = args
        fusion = getattr(type(self), "registered_name", type(self).__name__)
        if hidden_size <= 0:
            raise RecipeError(f"fusion {fusion!r}: hidden_size must be positive, got {hidden_size}")
        names = resolve_streams(streams, args.streams, fusion)
        widths = {name: streams[name][1] for name in names}
        if args.shared_projector:
            if len(set(widths.values())) > 1:
                raise RecipeError(
                    f"fusion {fusion!r}: a shared projector needs streams of equal width, got {widths}; set "
                    f"`shared_projector: false` for one projector per stream",
                    "model.fusion.shared_projector",
                )
            projectors = [build_projector(args.projector, widths[names[0]], hidden_size)]
        else:
            projectors = [build_projector(args.projector, widths[name], hidden_size) for name in names]
        self.stream_names = names
        self.projectors = nn.ModuleList(projectors)
        """One projector per stream in ``stream_names`` order, or a single one when shared."""
        self.stream_tokens = [streams[name][0] for name in names]
        self.num_tokens = sum(self.stream_tokens)

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (B, N_i, C_i)}`` -> ``(B, sum N_i, hidden_size)``."""
        shared = len(self.projectors) == 1
        outs = [self.projectors[0 if shared else i](streams[name]) for i, name in enumerate(self.stream_names)]
        return torch.cat(outs, dim=1)
