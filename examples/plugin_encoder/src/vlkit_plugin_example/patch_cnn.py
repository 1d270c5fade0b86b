"""``patch_cnn``: a small convolutional vision encoder that returns a grid of patch tokens.

A stack of ``log2(patch_size)`` stride-2 convolution stages (each followed by ``blocks`` pre-norm residual
3x3 blocks) reduces an ``image_size`` x ``image_size`` image to a ``(image_size / patch_size)**2`` grid;
each grid cell is one token of width ``width``, with an optional learned position embedding and a final
LayerNorm. Randomly initialised, or loaded from a safetensors file of this module's ``state_dict``::

    model:
      encoders:
        - {name: patch_cnn, image_size: 64, patch_size: 8, width: 128, blocks: 1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError


class ResidualBlock(nn.Module):
    """Pre-norm residual block: ``x + conv(gelu(norm(conv(gelu(norm(x))))))`` with 3x3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class PatchCNNEncoder(VisionEncoder):
    """A small conv net over patches. Stream ``tokens``: ``(B, (image_size/patch_size)**2, width)``."""

    @dataclass
    class Args:
        image_size: int = 64
        """Input size: images are resized to ``image_size`` x ``image_size``."""
        patch_size: int = 8
        """Total stride (a power of two >= 2): one token per ``patch_size`` x ``patch_size`` patch."""
        width: int = 128
        """Channels of the last stage (the stream's width); earlier stages halve it, down to 8."""
        blocks: int = 1
        """Residual blocks after each downsampling stage."""
        pos_embed: bool = True
        """Add a learned position embedding to the tokens."""
        mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
        """Per-channel mean of [0, 1] pixels used for normalisation."""
        std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
        """Per-channel standard deviation used for normalisation."""
        weights: str | None = None
        """A ``.safetensors`` file with this encoder's ``state_dict`` (None: random init)."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the name in the recipe)."""

        def __post_init__(self) -> None:
            problems = []
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                problems.append(f"patch_size must be a power of two >= 2, got {self.patch_size}")
            elif self.image_size <= 0 or self.image_size % self.patch_size:
                problems.append(f"image_size ({self.image_size}) must be a positive multiple of "
                                f"patch_size ({self.patch_size})")
            if self.width < 1:
                problems.append(f"width must be positive, got {self.width}")
            if self.blocks < 0:
                problems.append(f"blocks must be 0 or more, got {self.blocks}")
            if len(self.mean) != 3 or len(self.std) != 3:
                problems.append(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
            elif any(s <= 0 for s in self.std):
                problems.append(f"std values must be positive, got {self.std}")
            if problems:
                raise RecipeError("patch_cnn encoder: " + "; ".join(problems))

    def __init__(self, args: Args) -> None:
        super().__init__()
        self.args = args
        stages = int(math.log2(args.patch_size))
        channels = [max(min(8, args.width), args.width >> (stages - 1 - i)) for i in range(stages)]
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
            layers += [ResidualBlock(c_out) for _ in range(args.blocks)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.grid = args.image_size // args.patch_size
        self.num_tokens = self.grid * self.grid
        self.stream_dims = {"tokens": args.width}
        self.preprocess = Preprocess(size=args.image_size, mean=tuple(args.mean), std=tuple(args.std))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, args.width)) if args.pos_embed else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm = nn.LayerNorm(args.width)
        if args.weights is not None:
            self._load(Path(args.weights).expanduser())

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"patch_cnn encoder: weights file not found: {path} (from `weights`)")
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"patch_cnn encoder: cannot read {path}: {exc}") from exc
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
            raise CheckpointError(f"patch_cnn encoder: {path} does not match the architecture in the recipe "
                                  f"(image_size, patch_size, width, blocks, pos_embed): {exc}") from None

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"tokens": (B, (S/P)**2, width)}``."""
        x = self.body(pixel_values)                 # (B, width, S/P, S/P)
        tokens = x.flatten(2).transpose(1, 2)       # (B, N, width), row-major over the grid
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        return {"tokens": self.norm(tokens)}
