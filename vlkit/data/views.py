"""Images to model pixels: the resize policy (pad / resize / crop to square) and SPHINX-1k multi-scale views.

Every image the data pipeline delivers is a square ``(3, S, S)`` tensor in [0, 1]. How a non-square image
becomes square is the model's ``resize_policy`` (:func:`square_image`): ``pad`` to a centred square with a
fill colour (the encoders' mean colour: LLaVA-1.5's ``expand2square``), ``resize`` (stretch the whole
image) or ``crop`` (the centre square, as CLIP's own processor does); then a bicubic resize to ``S``.

A high-resolution image of side ``grid * size`` becomes ``1 + grid**2`` views of side ``size``, in a fixed
order: the whole image downsampled (the *global* view), then the sub-images row by row (for ``grid: 2``:
global, top-left, top-right, bottom-left, bottom-right)::

    image (any shape) --square_image--> square --resize--> (3, grid*size, grid*size) in [0, 1]
                      --split_views--> (1 + grid**2, 3, size, size)

In a recipe, ``model.views: {grid: 2, size: 224}`` turns this on for any encoders and fusion: the data
pipeline delivers ``grid * size`` images (:func:`image_to_square_tensor`), and
:meth:`vlkit.model.VLM.encode_images` splits them (:func:`split_views`), encodes every view as one batch
and concatenates the views' visual tokens per image, global view first.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.constants import CLIP_MEAN

PAD_COLORS: dict[str, tuple[int, int, int]] = {
    "mean": tuple(int(255 * m) for m in CLIP_MEAN),  # type: ignore[dict-item]
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Fill colours for :func:`pad_to_square`. ``mean`` is the CLIP mean colour (what LLaVA and SPHINX pad
with; it normalises to about zero)."""

ResizePolicy = Literal["pad", "resize", "crop"]
"""How a non-square image becomes square: pad (centred, with a fill colour), resize (stretch), crop (centre)."""
RESIZE_POLICIES: tuple[str, ...] = get_args(ResizePolicy)


def pad_color(pad: str) -> tuple[int, int, int]:
    """The RGB fill of a ``pad`` name (``mean``, ``white``, ``black``); ValueError for others."""
    if pad not in PAD_COLORS:
        raise ValueError(f"unknown pad colour {pad!r}; use one of {', '.join(PAD_COLORS)}")
    return PAD_COLORS[pad]


def pad_to_square(image: Image.Image, pad: str | tuple[int, int, int] = "mean") -> Image.Image:
    """Pad ``image`` (converted to RGB) to a square, centred, with a fill colour (a name or an RGB triple).

    A square image is returned unchanged (as RGB).
    """
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    fill = pad_color(pad) if isinstance(pad, str) else tuple(int(c) for c in pad)
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)  # type: ignore[arg-type]
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_color(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """The RGB fill of an encoder's per-channel ``mean`` of [0, 1] pixels, as LLaVA's ``expand2square``
    computes it (``int(255 * m)``); the padding then normalises to about zero."""
    return tuple(int(255 * m) for m in mean)  # type: ignore[return-value]


def resize_settings(policy: ResizePolicy | None, views_pad: str | None,
                    encoder_mean: tuple[float, float, float] | None) -> tuple[ResizePolicy, tuple[int, int, int]]:
    """The policy and pad fill a model's data pipeline uses. ``policy`` None is the default: ``pad`` with
    views (unless ``views_pad`` is ``none``), else ``resize``. The fill is the views' ``pad`` colour when
    it names one, else the first encoder's mean colour (:func:`mean_color`), else the CLIP mean colour."""
    if policy is None:
        policy = "pad" if views_pad is not None and views_pad != "none" else "resize"
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; use one of {', '.join(RESIZE_POLICIES)}")
    if views_pad is not None and views_pad in PAD_COLORS:
        fill = PAD_COLORS[views_pad]
    else:
        fill = mean_color(encoder_mean) if encoder_mean is not None else PAD_COLORS["mean"]
    return policy, fill


def center_crop_square(image: Image.Image) -> Image.Image:
    """The centred square of side ``min(width, height)`` of ``image`` (converted to RGB)."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image if width == height else image.crop((left, top, left + side, top + side))


def square_image(image: Image.Image, policy: ResizePolicy = "pad",
                 fill: str | tuple[int, int, int] = "mean") -> Image.Image:
    """``image`` made square by ``policy``: ``pad`` (:func:`pad_to_square` with ``fill``), ``crop``
    (:func:`center_crop_square`) or ``resize`` (unchanged here: the final resize stretches it)."""
    if policy == "pad":
        return pad_to_square(image, fill)
    if policy == "crop":
        return center_crop_square(image)
    if policy == "resize":
        return image.convert("RGB")
    raise ValueError(f"unknown resize policy {policy!r}; use one of {', '.join(RESIZE_POLICIES)}")


def image_to_square_tensor(image: Image.Image, size: int, policy: ResizePolicy = "pad",
                           fill: str | tuple[int, int, int] = "mean") -> torch.Tensor:
    """RGB ``(3, size, size)`` float tensor in [0, 1]: made square by ``policy`` (:func:`square_image`),
    then resized with bicubic resampling."""
    image = square_image(image, policy, fill)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def num_views(grid: int) -> int:
    """Views per image for an ``grid x grid`` split: the global view plus ``grid**2`` sub-images."""
    return 1 + grid * grid


def split_views(pixels: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """``(B, 3, S, S)`` pixels in [0, 1] -> ``(B * (1 + grid**2), 3, size, size)`` views.

    Per image, in order: the global view (the whole image resized to ``size``), then the ``grid x grid``
    sub-images in row-major order (top-left, top-right, ..., bottom-right). Images of a side other than
    ``grid * size`` are resized to it first. The views of image ``b`` are rows ``b * V .. (b + 1) * V - 1``
    of the result (``V = 1 + grid**2``).
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    if grid < 1 or size < 1:
        raise ValueError(f"grid and size must be positive, got grid={grid}, size={size}")
    full = grid * size
    batch = pixels.shape[0]
    if pixels.shape[-2:] != (full, full):
        pixels = _resize(pixels, full)
    global_view = _resize(pixels, size) if full != size else pixels
    # (B, 3, g*s, g*s) -> (B, 3, g, s, g, s) -> (B, g, g, 3, s, s): row-major tiles
    tiles = pixels.reshape(batch, 3, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(batch, grid * grid, 3, size, size)
    views = torch.cat([global_view.unsqueeze(1), tiles], dim=1)
    return views.reshape(batch * num_views(grid), 3, size, size).contiguous()


def image_views(image: Image.Image, grid: int, size: int, policy: ResizePolicy = "pad",
                fill: str | tuple[int, int, int] = "mean") -> torch.Tensor:
    """All views of one image: ``(1 + grid**2, 3, size, size)`` in [0, 1] (square, resize, split)."""
    return split_views(image_to_square_tensor(image, grid * size, policy, fill).unsqueeze(0), grid, size)


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of ``(B, 3, H, W)`` pixels in [0, 1] to ``size x size``."""
    return F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(0, 1)
