"""Fusions: named encoder streams ``(B, N, C)`` in, visual tokens ``(B, T, H_llm)`` out.

Built-in fusions (registered in :data:`vlkit.registry.FUSIONS`):

* ``linear`` (:mod:`vlkit.fusions.linear`): channel-concatenate streams with equal token counts, then Linear.
* ``mlp`` (:mod:`vlkit.fusions.mlp`): the same, then a LLaVA-style projector (``mlp2x_gelu``, ...).
* ``token_concat`` (:mod:`vlkit.fusions.token_concat`): project each stream, concatenate along tokens.
"""

from __future__ import annotations

from vlkit.errors import RecipeError
from vlkit.fusions.base import Fusion
from vlkit.fusions.projector import build_projector, check_projector

__all__ = ["Fusion", "build_projector", "check_projector", "resolve_streams"]


def resolve_streams(streams: dict[str, tuple[int, int]], wanted: list[str] | None, fusion: str) -> list[str]:
    """Validate a fusion's ``streams:`` selection against what the encoders provide; return the names in order.

    Raises RecipeError (key ``model.fusion.streams``) for unknown, duplicate or no streams.
    """
    if not streams:
        raise RecipeError(f"fusion {fusion!r}: the encoders provide no streams", "model.encoders")
    if wanted is not None:
        if not wanted:
            raise RecipeError(f"fusion {fusion!r}: name at least one stream (or leave `streams` unset for all "
                              f"of {list(streams)})", "model.fusion.streams")
        duplicates = sorted({s for s in wanted if wanted.count(s) > 1})
        if duplicates:
            raise RecipeError(f"fusion {fusion!r}: stream(s) {duplicates} listed more than once",
                              "model.fusion.streams")
    if wanted is None:
        return list(streams)
    missing = [s for s in wanted if s not in streams]
    if missing:
        raise RecipeError(f"fusion {fusion!r}: unknown stream(s) {missing}; the encoders provide {list(streams)}",
                          "model.fusion.streams")
    return list(wanted)
