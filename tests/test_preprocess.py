"""Image preprocessing policies (issue 16, item 4): ``model.resize_policy: pad | resize | crop``.

Checked on non-square images through the recipe -> model -> processor -> shards loader path, against the
pixels themselves and against LLaVA-1.5's ``expand2square`` re-written here from its description.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlkit.config import load_recipe
from vlkit.encoders.base import CLIP_MEAN
from vlkit.errors import RecipeError
from vlkit.model import build_model
from vlkit.registry import DATASETS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def expand2square(pil_img: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 (llava/mm_utils.py): paste the image centred on a square of the background colour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def striped(width: int, height: int) -> Image.Image:
    """A non-square image with a distinct colour in each vertical third and a gradient row pattern."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    thirds = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for x in range(width):
        arr[:, x] = thirds[min(2, 3 * x // width)]
    arr[:, :, 1] = np.maximum(arr[:, :, 1], (np.arange(height) * 200 // max(1, height - 1))[:, None])
    return Image.fromarray(arr)


def model_for(tiny_recipe: Path, *overrides: str):
    return build_model(load_recipe(tiny_recipe, list(overrides)))


def test_pad_matches_expand2square_and_places_the_image_in_the_middle(tiny_recipe):
    model = model_for(tiny_recipe, "model.resize_policy=pad")
    proc = model.processor()
    mean = tuple(int(255 * m) for m in CLIP_MEAN)  # the CLIP encoder's mean colour, as LLaVA computes it
    assert proc.image_size == 32

    wide = striped(32, 12)  # 32 wide: no resize, so every pixel can be checked in place
    pixels = proc.pixels(wide)
    assert pixels.shape == (3, 32, 32)
    top, band = (32 - 12) // 2, slice(10, 22)
    fill = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / 255
    assert torch.equal(pixels[:, :top], fill.expand(3, top, 32))
    assert torch.equal(pixels[:, band], to_tensor(wide))
    assert torch.equal(pixels[:, 22:], fill.expand(3, 10, 32))

    for size in [(90, 40), (25, 70)]:  # wide and tall, resized afterwards
        image = striped(*size)
        reference = expand2square(image, mean).resize((32, 32), Image.Resampling.BICUBIC)
        assert torch.equal(proc.pixels(image), to_tensor(reference))


def test_crop_and_resize_policies(tiny_recipe):
    wide = striped(48, 32)
    crop = model_for(tiny_recipe, "model.resize_policy=crop").processor().pixels(wide)
    assert torch.equal(crop, to_tensor(wide)[:, :, 8:40])  # the centre 32 x 32, no resize needed
    tall = striped(20, 50)
    centre = tall.crop((0, 15, 20, 35)).resize((32, 32), Image.Resampling.BICUBIC)
    assert torch.equal(model_for(tiny_recipe, "model.resize_policy=crop").processor().pixels(tall), to_tensor(centre))
    stretched = model_for(tiny_recipe, "model.resize_policy=resize").processor().pixels(wide)
    assert torch.equal(stretched, to_tensor(wide.resize((32, 32), Image.Resampling.BICUBIC)))
    default = model_for(tiny_recipe).processor().pixels(wide)  # demos keep stretching by default
    assert torch.equal(default, stretched)


def test_training_batches_carry_padded_pixels(tiny_recipe, tmp_path):
    image = striped(64, 24)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    conv = {"conversations": [{"from": "human", "value": "<image>\nWhat color is left?"},
                              {"from": "gpt", "value": "red"}]}
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tar:
        for name, data in (("a.json", json.dumps(conv).encode()), ("a.png", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    model = model_for(tiny_recipe, "model.resize_policy=pad")
    ds = DATASETS.build({"name": "shards", "urls": str(tmp_path / "s-000000.tar"), "batch_size": 1,
                         "num_workers": 0}, "data.train")
    batch = next(iter(ds.train_loader(model.processor(), seed=0)))
    mean = tuple(int(255 * m) for m in CLIP_MEAN)
    reference = expand2square(image, mean).resize((32, 32), Image.Resampling.BICUBIC)
    assert torch.equal(batch["pixel_values"][0], to_tensor(reference))


def test_shipped_real_scale_recipes_pad_and_bad_policies_are_refused(tiny_recipe):
    for path in sorted(RECIPES.glob("*.yaml")):
        model = yaml.safe_load(path.read_text())["model"]
        if "init" in model:  # starts from a hub model (not cached offline): the recipe's own key
            assert model["resize_policy"] == "pad", path.name
            continue
        assert load_recipe(path).model.resize_policy == "pad", path.name
    for path in sorted((RECIPES / "demo").glob("*.yaml")):
        assert "resize_policy" not in (yaml.safe_load(path.read_text()).get("model") or {}), path.name
    with pytest.raises(RecipeError, match=r"model.resize_policy: 'padd' is not one of .*Did you mean 'pad'"):
        load_recipe(tiny_recipe, ["model.resize_policy=padd"])
