"""``mlp``: channel-concatenate streams with equal token counts, then a LLaVA-style MLP projector."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.fusions.linear import LinearFusion
from vlkit.fusions.projector import check_projector
from vlkit.registry import FUSIONS


@FUSIONS.register("mlp")
class MLPFusion(LinearFusion):
    """:class:`~vlkit.fusions.linear.LinearFusion` with ``projector`` (default ``mlp2x_gelu``, as LLaVA-1.5)."""

    @dataclass
    class Args(LinearFusion.Args):
        projector: str = "mlp2x_gelu"
        """``linear`` or ``mlp{N}x_gelu`` (N Linear layers with GELU between them)."""

        def __post_init__(self) -> None:
            check_projector(self.projector)

    def projector_spec(self) -> str:
        return self.args.projector
