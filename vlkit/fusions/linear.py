"""``linear``: channel-concatenate streams with equal token counts, then one Linear to the LLM width.

Also the base of ``mlp``, which only swaps the projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlkit.errors import RecipeError
from vlkit.fusions import resolve_streams
from vlkit.fusions.base import Fusion
from vlkit.fusions.projector import build_projector
from vlkit.registry import FUSIONS


@FUSIONS.register("linear")
class LinearFusion(Fusion):
    """Concatenate the selected streams along channels (``T = N``, ``C = sum of widths``) and project.

    All selected streams must have the same token count; to combine streams with different counts, use
    ``token_concat`` (or select streams that match).
    """

    @dataclass
    class Args:
        streams: list[str] | None = None
        """Qualified stream names (``"<encoder key>.<stream>"``, e.g. ``clip.tokens``); None: all, in order."""

    def projector_spec(self) -> str:
        """The projector applied after concatenation (``linear`` here; subclasses read it from Args)."""
        return "linear"

    def __init__(self, args: Args, streams: dict[str, tuple[int, int]], hidden_size: int) -> None:
        super().__init__()
        self.args = args
        fusion = getattr(type(self), "registered_name", type(self).__name__)
        if hidden_size <= 0:
            raise RecipeError(f"fusion {fusion!r}: hidden_size must be positive, got {hidden_size}")
        names = resolve_streams(streams, args.streams, fusion)
        counts = {name: streams[name][0] for name in names}
        if len(set(counts.values())) > 1:
            raise RecipeError(
                f"fusion {fusion!r} concatenates streams along channels, so they need the same token count; "
                f"got {counts}. Use `name: token_concat` to concatenate along tokens, or choose streams "
                f"with equal counts in `streams:` (e.g. match encoder image_size/patch size and keep_cls)",
                "model.fusion.streams",
            )
        self.stream_names = names
        self.in_dim = sum(streams[name][1] for name in names)
        self.num_tokens = counts[names[0]]
        self.projector = build_projector(self.projector_spec(), self.in_dim, hidden_size)

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (B, N, C_i)}`` -> ``(B, N, hidden_size)``."""
        x = torch.cat([streams[name] for name in self.stream_names], dim=-1)
        return self.projector(x)
