"""The fusion interface: named feature streams in, visual tokens ``(B, T, H_llm)`` out."""

from __future__ import annotations

import torch
from torch import nn


class Fusion(nn.Module):
    """Base class of registered fusions, built as ``cls(args, streams=..., hidden_size=...)``.

    ``streams`` maps each stream's qualified name (``"<encoder key>.<stream>"``, e.g. ``"clip.tokens"``)
    to ``(num_tokens, channels)``; ``hidden_size`` is the LLM's embedding width.
    """

    num_tokens: int
    """Visual tokens T this fusion hands to the LLM per image."""

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
