"""Views (SPHINX-1k sub-images): padding, view order against pixel content, recipe integration in the VLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message
from vlkit.data.views import (
    PAD_COLORS,
    image_to_square_tensor,
    image_views,
    num_views,
    pad_to_square,
    split_views,
)
from vlkit.errors import RecipeError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(size: int = 64, colors=(RED, GREEN, BLUE, WHITE)) -> Image.Image:
    """An image whose top-left, top-right, bottom-left, bottom-right quadrants have distinct colours."""
    image = Image.new("RGB", (size, size))
    half = size // 2
    for (x, y), color in zip([(0, 0), (half, 0), (0, half), (half, half)], colors):
        image.paste(color, (x, y, x + half, y + half))
    return image


def rgb(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32) / 255


def assert_uniform(view: torch.Tensor, color: tuple[int, int, int]) -> None:
    expected = rgb(color).view(3, 1, 1).expand_as(view)
    torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- padding


def test_pad_to_square_centres_the_image_with_the_fill_colour():
    wide = Image.new("RGB", (40, 20), RED)
    square = pad_to_square(wide, "white")
    assert square.size == (40, 40)
    assert square.getpixel((20, 20)) == RED and square.getpixel((20, 5)) == WHITE and square.getpixel((20, 35)) == WHITE
    mean = pad_to_square(Image.new("RGB", (10, 30), BLUE))  # default: the CLIP mean colour
    assert mean.size == (30, 30)
    assert mean.getpixel((2, 15)) == PAD_COLORS["mean"] and mean.getpixel((15, 15)) == BLUE
    assert PAD_COLORS["mean"] == (122, 116, 104)  # what LLaVA / SPHINX pad with
    same = Image.new("RGB", (8, 8), GREEN)
    assert pad_to_square(same).size == (8, 8)
    with pytest.raises(ValueError, match="unknown pad colour 'grey'"):
        pad_to_square(wide, "grey")


def test_image_to_square_tensor_pads_or_stretches():
    tall = Image.new("RGB", (16, 32), RED)
    padded = image_to_square_tensor(tall, 32, "pad", "black")
    assert padded.shape == (3, 32, 32)
    assert_uniform(padded[:, :, :8], (0, 0, 0))  # left band is padding
    assert_uniform(padded[:, :, 8:24], RED)
    stretched = image_to_square_tensor(tall, 32, "resize")
    assert_uniform(stretched, RED)


# ------------------------------------------------------------------------------------------- view order


def test_views_are_global_then_tl_tr_bl_br():
    views = image_views(quadrants(64), grid=2, size=32)
    assert views.shape == (5, 3, 32, 32) and num_views(2) == 5
    for view, color in zip(views[1:], (RED, GREEN, BLUE, WHITE)):
        assert_uniform(view, color)
    glob = views[0]  # the whole image downsampled: the same quadrant layout at half size
    for (y, x), color in zip([(8, 8), (8, 24), (24, 8), (24, 24)], (RED, GREEN, BLUE, WHITE)):
        torch.testing.assert_close(glob[:, y, x], rgb(color), atol=1e-3, rtol=0)


def test_grid_3_is_row_major_and_batches_keep_images_apart():
    colors = [(i * 25, 255 - i * 25, (i * 97) % 256) for i in range(9)]
    image = Image.new("RGB", (48, 48))
    for i, color in enumerate(colors):
        r, c = divmod(i, 3)
        image.paste(color, (c * 16, r * 16, c * 16 + 16, r * 16 + 16))
    first = image_to_square_tensor(image, 48)
    second = torch.zeros_like(first)
    views = split_views(torch.stack([first, second]), grid=3, size=16)
    assert views.shape == (2 * 10, 3, 16, 16)
    for i, color in enumerate(colors):
        assert_uniform(views[1 + i], color)  # image 0: views 1..9 in row-major order
    assert torch.count_nonzero(views[10:]) == 0  # image 1's views follow image 0's


def test_split_views_resizes_other_sizes_and_rejects_bad_input():
    assert split_views(torch.rand(2, 3, 50, 50), grid=2, size=16).shape == (10, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        split_views(torch.rand(3, 32, 32), grid=2, size=16)


# --------------------------------------------------------------------------------- recipe + VLM (views)


@pytest.fixture()
def views_model(tiny_recipe: Path) -> vlkit.VLM:
    torch.manual_seed(0)
    recipe = vlkit.load_recipe(tiny_recipe, ["model.views={grid: 2, size: 32}"])
    return vlkit.build_model(recipe)


def test_views_token_count_processor_and_order(views_model: vlkit.VLM):
    per_view = views_model.fusion.num_tokens
    assert views_model.num_views == 5 and views_model.num_image_tokens == 5 * per_view
    proc = views_model.processor()
    assert proc.image_size == 64 and proc.resize_policy == "pad" and proc.pad_color == PAD_COLORS["mean"]
    feats = proc.train_features([Message("user", "<image>\nWhat color?"), Message("assistant", "red")],
                                Image.new("RGB", (64, 32), RED))  # wide: padded to square first
    ids = torch.tensor(feats["input_ids"])
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 5 * per_view
    pixels = feats["pixel_values"]
    assert pixels.shape == (3, 64, 64)
    torch.testing.assert_close(pixels[:, 2, 32], rgb(PAD_COLORS["mean"]))  # top band is the pad colour

    image = image_to_square_tensor(quadrants(64), 64).unsqueeze(0)
    with torch.no_grad():
        tokens = views_model.encode_images(image)
        assert tokens.shape == (1, 5 * per_view, views_model.llm.hidden_size)
        single = vlkit.VLM(dict(views_model.encoders), views_model.fusion, views_model.llm)  # no views
        for k, view in enumerate(split_views(image, 2, 32)):
            torch.testing.assert_close(tokens[0, k * per_view:(k + 1) * per_view],
                                       single.encode_images(view.unsqueeze(0))[0])


def test_views_train_end_to_end(views_model: vlkit.VLM):
    proc = views_model.processor()
    batch = proc.collate([proc.train_features([Message("user", "<image>\nWhere is the circle?"),
                                               Message("assistant", "left")], quadrants(64)),
                          proc.train_features([Message("user", "How many?"), Message("assistant", "two")], None)])
    out = views_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in views_model.fusion.parameters())


def test_default_is_no_views(tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe)
    assert recipe.model.views is None
    model = vlkit.build_model(recipe)
    assert model.num_views == 1 and model.processor().resize_policy == "resize" and model.image_size == 32


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.views={grid: 0, size: 32}", r"model.views.grid: must be between 1 and 8"),
        ("model.views={grid: 2, size: -4}", r"model.views.size: must be a positive number"),
        ("model.views={grid: 2, size: 32, pad: grey}", r"model.views.pad: 'grey' is not one of"),
        ("model.views={gird: 2}", r"model.views.gird: unknown key. Did you mean 'grid'"),
        ("model.views={grid: two}", r"model.views.grid: expected int"),
    ],
)
def test_views_recipe_errors(tiny_recipe: Path, override: str, match: str):
    with pytest.raises(RecipeError, match=match):
        vlkit.load_recipe(tiny_recipe, [override])
