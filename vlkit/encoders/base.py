"""The vision-encoder interface: pixels in, a dict of named feature streams ``(B, N, C)`` out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # re-exported

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "VisionEncoder", "run_block"]


@dataclass(frozen=True)
class Preprocess:
    """What pixels an encoder expects: square ``size`` and per-channel ``mean``/``std`` of [0, 1] pixels."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class VisionEncoder(nn.Module):
    """Base class of registered vision encoders.

    Subclasses define a dataclass ``Args`` (their recipe arguments), are built as ``cls(args)``, and
    implement :meth:`forward` on pixels already resized and normalised per :attr:`preprocess`.
    Freezing is decided by the training stage (``requires_grad``), never inside ``forward``.
    """

    stream_dims: dict[str, int]
    """Channel width of each stream this encoder returns, e.g. ``{"tokens": 768}``."""
    num_tokens: int
    """Tokens per stream (N)."""
    preprocess: Preprocess
    fsdp_wrap_block: type[nn.Module] | None = None
    """The class of the encoder's repeated block: FSDP's wrap unit and the unit its ``gradient_checkpointing``
    argument recomputes in the backward pass (None: the encoder has no repeated block)."""
    libraries: tuple[str, ...] = ()
    """Distributions whose code computes this encoder's output (e.g. ``("open_clip_torch",)``): their
    installed versions, with torch's and vlkit's, are part of the feature cache's fingerprint, so an upgrade
    never serves features the new code would not compute."""

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resize ``(B, 3, H, W)`` pixels in [0, 1] to this encoder's size and normalise them."""
        size = self.preprocess.size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True).clamp_(0, 1)
        mean = pixels.new_tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = pixels.new_tensor(self.preprocess.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocess [0, 1] pixels and return the named streams."""
        return self(self.prepare(pixels))


def run_block(block: nn.Module, *args: object, checkpoint: bool) -> torch.Tensor:
    """``block(*args)``; with ``checkpoint`` (in training, autograd on) its activations are not kept but
    recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant), for the blocks of the loops
    vlkit runs itself (a library's own loop is switched through its own setting)."""
    if checkpoint and block.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as recompute

        return recompute(block, *args, use_reentrant=False)
    return block(*args)
