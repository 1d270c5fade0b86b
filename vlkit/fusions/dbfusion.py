"""``dbfusion``: Florence-VL's depth-breadth fusion: channel-concatenate streams, then an MLP projector.

With the florence2 encoder's streams ``[depth, detailed_caption, ocr, dense_region_caption]`` (each
``(B, N, 1024)`` for Florence-2-large) this is ``(B, N, 4096) -> mlp3x_gelu -> (B, N, H)``. The paper's
ablations are recipe choices:

* ``streams: [florence2.depth]`` (depth only), ``streams: [florence2.ocr, ...]`` (breadth only, fewer
  prompts), any subset in any order;
* ``mode: mean``: average the selected streams (equal widths) instead of concatenating them;
* token integration (``4N`` tokens) is the ``token_concat`` fusion: ``model.fusion.name=token_concat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlkit.errors import RecipeError
from vlkit.fusions import resolve_streams
from vlkit.fusions.base import Fusion
from vlkit.fusions.projector import build_projector, check_projector
from vlkit.registry import FUSIONS


@FUSIONS.register("dbfusion")
class DBFusion(Fusion):
    """Channel concat (``mode: concat``, width = sum of the widths) or average (``mode: mean``, width = the
    common width) of the selected streams, which must share their token count N, then ``projector``."""

    @dataclass
    class Args:
        projector: str = "mlp3x_gelu"
        """``linear`` or ``mlp{N}x_gelu`` (Florence-VL: ``mlp3x_gelu``)."""
        streams: list[str] | None = None
        """Qualified stream names (``"<encoder key>.<stream>"``, e.g. ``florence2.depth``); None: all, in
        encoder order."""
        mode: Literal["concat", "mean"] = "concat"
        """``concat``: along channels (DBFusion); ``mean``: average the streams (the paper's pooling ablation)."""

        def __post_init__(self) -> None:
            check_projector(self.projector)

    def __init__(self, args: Args, streams: dict[str, tuple[int, int]], hidden_size: int) -> None:
        super().__init__()
        self.args = args
        if hidden_size <= 0:
            raise RecipeError(f"fusion 'dbfusion': hidden_size must be positive, got {hidden_size}")
        names = resolve_streams(streams, args.streams, "dbfusion")
        counts = {name: streams[name][0] for name in names}
        if len(set(counts.values())) > 1:
            raise RecipeError(
                f"fusion 'dbfusion' combines streams token by token, so they need the same token count; got "
                f"{counts}. Use `name: token_concat` to concatenate along tokens, or select matching streams",
                "model.fusion.streams",
            )
        widths = {name: streams[name][1] for name in names}
        if args.mode == "mean":
            if len(set(widths.values())) > 1:
                raise RecipeError(
                    f"fusion 'dbfusion': `mode: mean` averages streams, so they need the same width; got {widths}. "
                    f"Use `mode: concat`, or select streams of equal width in `streams:`",
                    "model.fusion.mode",
                )
            self.in_dim = widths[names[0]]
        else:
            self.in_dim = sum(widths.values())
        self.stream_names = names
        self.num_tokens = counts[names[0]]
        self.projector = build_projector(args.projector, self.in_dim, hidden_size)

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (B, N, C_i)}`` -> ``(B, N, hidden_size)``."""
        selected = [streams[name] for name in self.stream_names]
        if self.args.mode == "mean":
            x = torch.stack(selected, dim=0).mean(dim=0)
        else:
            x = torch.cat(selected, dim=-1)
        return self.projector(x)
