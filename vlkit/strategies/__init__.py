"""Embedding strategies: how a VLM turns token ids + images into the LLM's ``inputs_embeds``.

Each module of this package defines one :class:`~vlkit.strategies.base.EmbeddingStrategy` subclass; the model
picks the first (highest ``priority``) whose :meth:`matches` accepts its parts' declared interfaces:

* ``holistic`` (:mod:`.holistic`): an encoder that declares ``embeds_sequence = True`` (HoVLE) embeds the whole
  sequence, text included; no fusion, the LLM's input table is bypassed;
* ``splice`` (:mod:`.splice`, the fallback): encoders -> fusion -> visual tokens written at the image positions.

A new strategy (e.g. cross-attention, Llama-3.2-Vision style) is one new file here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlkit.strategies.base import EmbeddingStrategy


@cache
def strategies() -> tuple[type[EmbeddingStrategy], ...]:
    """Every strategy class of this package, highest ``priority`` first."""
    from vlkit.strategies.base import EmbeddingStrategy

    found: list[type[EmbeddingStrategy]] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__
                  and issubclass(obj, EmbeddingStrategy)]
    return tuple(sorted(found, key=lambda cls: -cls.priority))


def strategy_for(encoder_classes: Sequence[type]) -> type[EmbeddingStrategy]:
    """The strategy for a model with encoders of these classes (from their declared interfaces)."""
    for cls in strategies():
        if cls.matches(encoder_classes):
            return cls
    raise LookupError("no embedding strategy accepts these encoders")  # splice accepts any: unreachable


__all__ = ["strategies", "strategy_for"]
