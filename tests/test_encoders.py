"""Vision encoders (clip via open_clip, dinov2 via timm): shapes, layers, CLS, preprocess, loading paths, grads.

All models are tiny and randomly initialised; checkpoints are written to tmp folders in the layout each
loader expects and loaded back. Nothing touches the network.
"""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip / timm / huggingface_hub are imported anywhere

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.registry import ENCODERS

CLIP_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
DINO_CFG = {"model": "vit_small_patch14_dinov2", "img_size": 32, "patch_size": 8, "embed_dim": 32,
            "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def clip(**kwargs) -> VisionEncoder:
    return ENCODERS.build({"name": "clip", **kwargs}, "model.encoders[0]")


def dino(**kwargs) -> VisionEncoder:
    return ENCODERS.build({"name": "dinov2", **kwargs}, "model.encoders[0]")


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def save_clip_folder(path, preprocess_cfg=None, fmt="safetensors") -> open_clip.CLIP:
    """A tiny CLIP in open_clip's local-dir / hf-hub layout: open_clip_config.json + weights."""
    model = open_clip.CLIP(**CLIP_MODEL_CFG).eval()
    path.mkdir(parents=True, exist_ok=True)
    body = {"model_cfg": CLIP_MODEL_CFG, "preprocess_cfg": preprocess_cfg or {}}
    (path / "open_clip_config.json").write_text(json.dumps(body))
    if fmt == "safetensors":
        save_file(model.state_dict(), str(path / "open_clip_model.safetensors"))
    else:
        torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model


def clip_reference(model: open_clip.CLIP, x: torch.Tensor, layer: int) -> torch.Tensor:
    out = model.visual.forward_intermediates(x, indices=[layer], intermediates_only=True, output_fmt="NLC")
    return out["image_intermediates"][0]


def tiny_timm(**extra):
    """The timm model DINO_CFG describes (random init), in eval mode."""
    kwargs = {k: v for k, v in DINO_CFG.items() if k != "model"}
    return timm.create_model(DINO_CFG["model"], pretrained=False, **kwargs, **extra).eval()


def dino_reference(model, x: torch.Tensor, layer: int, keep_cls: bool) -> torch.Tensor:
    out = model.forward_intermediates(x, indices=[layer], return_prefix_tokens=True, output_fmt="NLC",
                                      intermediates_only=True, output_dict=True)
    tokens = out["image_intermediates"][0]
    if keep_cls:
        tokens = torch.cat([out["image_intermediates_prefix"][0][:, :1], tokens], dim=1)
    return tokens


def assert_weights_equal(encoder_state: dict, reference_state: dict, prefix: str = "") -> None:
    assert encoder_state, "encoder has no weights"
    for name, value in encoder_state.items():
        torch.testing.assert_close(value, reference_state[prefix + name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------- clip


def test_clip_inline_config_shapes_and_preprocess():
    enc = clip(config=CLIP_MODEL_CFG)
    assert enc.stream_dims == {"tokens": 32}
    assert enc.num_tokens == 16  # (32 / 8) ** 2, CLS dropped by default
    assert enc.preprocess.size == 32 and enc.image_size == 32
    assert enc.preprocess.mean == pytest.approx(CLIP_MEAN) and enc.preprocess.std == pytest.approx(CLIP_STD)
    out = enc(pixels())
    assert set(out) == {"tokens"} and out["tokens"].shape == (2, 16, 32)
    # encode() resizes and normalises raw [0, 1] pixels of any size
    assert enc.encode(torch.rand(2, 3, 50, 50))["tokens"].shape == (2, 16, 32)


def test_clip_keep_cls_and_image_size_override():
    enc = clip(config=CLIP_MODEL_CFG, keep_cls=True)
    assert enc.num_tokens == 17 and enc(pixels())["tokens"].shape == (2, 17, 32)
    big = clip(config=CLIP_MODEL_CFG, image_size=48)
    assert big.num_tokens == 36 and big.preprocess.size == 48
    assert big(pixels(size=48))["tokens"].shape == (2, 36, 32)


def test_clip_heads_alias_and_only_vision_cfg():
    """`heads` is accepted as an alias for open_clip's head_width; text_cfg/embed_dim are optional."""
    torch.manual_seed(0)
    a = clip(config={"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}})
    assert a.visual.transformer.resblocks[0].attn.num_heads == 2
    with pytest.raises(RecipeError, match=r"heads"):
        clip(config={"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 3}})
    with pytest.raises(RecipeError, match=r"unknown config.vision_cfg key\(s\) \['depth'\]"):
        clip(config={"vision_cfg": {"width": 32, "depth": 2}})
    with pytest.raises(RecipeError, match=r"vision_cfg"):
        clip(config={"embed_dim": 16})


def test_clip_layer_selects_block_and_prunes():
    model = open_clip.CLIP(**CLIP_MODEL_CFG).eval()
    x = pixels()
    outs = {}
    for layer in (-1, -2, 0):
        enc = clip(config=CLIP_MODEL_CFG, layer=layer)
        enc.visual.load_state_dict(model.visual.state_dict(), strict=False)
        outs[layer] = enc(x)["tokens"]
        torch.testing.assert_close(outs[layer], clip_reference(model, x, layer))
    assert not torch.allclose(outs[-1], outs[-2])
    torch.testing.assert_close(outs[-2], outs[0])  # 2 blocks: penultimate == first
    assert len(clip(config=CLIP_MODEL_CFG, layer=-2).visual.transformer.resblocks) == 1
    with pytest.raises(RecipeError, match=r"`layer` -3 is out of range for a tower with 2 blocks"):
        clip(config=CLIP_MODEL_CFG, layer=-3)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("scheme", ["local-dir:", ""])
def test_clip_local_dir_round_trip(tmp_path, fmt, scheme):
    folder = tmp_path / "my-clip"
    model = save_clip_folder(folder, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, fmt=fmt)
    enc = clip(checkpoint=f"{scheme}{folder}", keep_cls=True, layer=-2)
    assert_weights_equal(enc.visual.state_dict(), model.visual.state_dict())
    assert not any("text" in n or "token_embedding" in n for n, _ in enc.named_parameters())
    assert enc.preprocess.mean == (0.5, 0.5, 0.5) and enc.preprocess.std == (0.25, 0.25, 0.25)
    x = pixels()
    ref = model.visual.forward_intermediates(x, indices=[-2], intermediates_only=True, output_fmt="NLC",
                                             output_extra_tokens=True)
    expected = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
    torch.testing.assert_close(enc(x)["tokens"], expected)


def test_clip_checkpoint_resizes_position_embedding(tmp_path):
    save_clip_folder(tmp_path / "c")
    enc = clip(checkpoint=f"local-dir:{tmp_path / 'c'}", image_size=48)
    assert enc.num_tokens == 36 and enc(pixels(size=48))["tokens"].shape == (2, 36, 32)


def test_clip_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=re.escape(f"not found: {missing}")):
        clip(checkpoint=f"local-dir:{missing}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no open_clip_config.json"):
        clip(checkpoint=str(tmp_path / "empty"))
    (tmp_path / "empty" / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_MODEL_CFG}))
    with pytest.raises(CheckpointError, match=r"has no weights file"):
        clip(checkpoint=str(tmp_path / "empty"))


def test_clip_named_model_with_pretrained_file(tmp_path):
    """`model` + `pretrained: <file>`: a user-registered open_clip config name and a bare weights file."""
    cfg_file = tmp_path / "vlkit-test-tiny-clip.json"
    cfg_file.write_text(json.dumps(CLIP_MODEL_CFG))
    open_clip.add_model_config(cfg_file)
    model = open_clip.CLIP(**CLIP_MODEL_CFG)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    enc = clip(model="vlkit-test-tiny-clip", pretrained=str(tmp_path / "w.safetensors"))
    assert_weights_equal(enc.visual.state_dict(), model.visual.state_dict())
    with pytest.raises(CheckpointError, match=r"weights file not found"):
        clip(model="vlkit-test-tiny-clip", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(RecipeError, match=r"neither a pretrained tag"):
        clip(model="vlkit-test-tiny-clip", pretrained="laion9000")
    with pytest.raises(RecipeError, match=r"unknown open_clip model 'ViT-L-14-3366'.*Did you mean"):
        clip(model="ViT-L-14-3366")


@pytest.mark.parametrize(
    ("section", "got"),
    [
        ({}, "got none of them"),
        ({"model": "ViT-B-32", "config": CLIP_MODEL_CFG}, "got `model`, `config`"),
        ({"checkpoint": "local-dir:/x", "config": CLIP_MODEL_CFG}, "got `checkpoint`, `config`"),
    ],
)
def test_clip_exactly_one_source(section, got):
    with pytest.raises(RecipeError, match=rf"exactly one of `model`.*`checkpoint`.*`config`.*{got}"):
        ENCODERS.parse_args({"name": "clip", **section}, "model.encoders[0]")


def test_clip_pretrained_needs_model():
    with pytest.raises(RecipeError, match=r"`pretrained` applies only with `model`"):
        ENCODERS.parse_args({"name": "clip", "checkpoint": "/x", "pretrained": "openai"})


# ----------------------------------------------------------------------------------------------- dinov2


def test_dinov2_inline_config_shapes_and_preprocess():
    enc = dino(config=DINO_CFG)
    assert enc.stream_dims == {"tokens": 32}
    assert enc.num_tokens == 17  # 16 patches + CLS (kept by default)
    assert enc.preprocess.size == 32
    assert enc.preprocess.mean == pytest.approx(IMAGENET_MEAN) and enc.preprocess.std == pytest.approx(IMAGENET_STD)
    assert enc(pixels())["tokens"].shape == (2, 17, 32)
    no_cls = dino(config=DINO_CFG, keep_cls=False, image_size=48)
    assert no_cls.num_tokens == 36 and no_cls(pixels(size=48))["tokens"].shape == (2, 36, 32)


def test_dinov2_register_tokens_are_dropped():
    reference = tiny_timm(reg_tokens=4)
    enc = dino(config={**DINO_CFG, "reg_tokens": 4})
    enc.model.load_state_dict(reference.state_dict(), strict=False)
    x = pixels()
    assert enc.num_tokens == 17
    torch.testing.assert_close(enc(x)["tokens"], dino_reference(reference, x, -1, keep_cls=True))


def test_dinov2_layer_selects_block():
    reference = tiny_timm()
    x = pixels()
    outs = {}
    for layer in (-1, -2):
        enc = dino(config=DINO_CFG, layer=layer, keep_cls=False)
        enc.model.load_state_dict(reference.state_dict(), strict=False)
        outs[layer] = enc(x)["tokens"]
        torch.testing.assert_close(outs[layer], dino_reference(reference, x, layer, keep_cls=False))
    assert not torch.allclose(outs[-1], outs[-2])
    assert len(dino(config=DINO_CFG, layer=0).model.blocks) == 1
    with pytest.raises(RecipeError, match=r"out of range"):
        dino(config=DINO_CFG, layer=2)


def test_dinov2_local_dir_round_trip(tmp_path):
    """A folder written by timm's own save_for_hf (config.json + model.safetensors) loads back equal."""
    model = tiny_timm()
    timm.models.save_for_hf(model, str(tmp_path / "dino"), safe_serialization=True)
    for checkpoint in (f"local-dir:{tmp_path / 'dino'}", str(tmp_path / "dino")):
        enc = dino(checkpoint=checkpoint, layer=-2)
        assert_weights_equal(enc.model.state_dict(), model.state_dict())
        x = pixels()
        torch.testing.assert_close(enc(x)["tokens"], dino_reference(model, x, -2, keep_cls=True))
    assert enc.preprocess.mean == pytest.approx(IMAGENET_MEAN)


def test_dinov2_weights_file_with_config_architecture(tmp_path):
    model = tiny_timm()
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    enc = dino(config=DINO_CFG, checkpoint=str(tmp_path / "dino.pth"))
    assert_weights_equal(enc.model.state_dict(), model.state_dict())
    with pytest.raises(RecipeError, match=r"weights-file `checkpoint` needs exactly one of `model`"):
        dino(checkpoint=str(tmp_path / "dino.pth"))


def test_dinov2_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=re.escape(f"not found: {missing}")):
        dino(checkpoint=f"local-dir:{missing}")
    with pytest.raises(CheckpointError, match=r"not found"):
        dino(config=DINO_CFG, checkpoint=str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        dino(checkpoint=str(tmp_path / "empty"))
    model = tiny_timm()
    timm.models.save_for_hf(model, str(tmp_path / "noweights"), safe_serialization=True)
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"noweights"):
        dino(checkpoint=str(tmp_path / "noweights"))


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({}, "exactly one of .*got none of them"),
        ({"model": "vit_small_patch14_dinov2", "config": DINO_CFG}, "exactly one of .*got `model`, `config`"),
        ({"checkpoint": "/some/folder", "model": "vit_small_patch14_dinov2"}, "exactly one of"),
        ({"config": {"img_size": 32}}, "`config` needs `model: <timm architecture>`"),
    ],
)
def test_dinov2_recipe_validation(section, match):
    with pytest.raises(RecipeError, match=match):
        ENCODERS.parse_args({"name": "dinov2", **section}, "model.encoders[0]")


def test_dinov2_bad_names_and_kwargs():
    with pytest.raises(RecipeError, match=r"unknown timm model 'vit_smal_patch14_dinov2'.*Did you mean"):
        dino(model="vit_smal_patch14_dinov2", pretrained=False)
    with pytest.raises(RecipeError, match=r"bad timm arguments"):
        dino(config={**DINO_CFG, "not_a_kwarg": 1})


# ------------------------------------------------------------------------------------------------ both


@pytest.mark.parametrize("build", [lambda: clip(config=CLIP_MODEL_CFG, layer=-2),
                                   lambda: dino(config=DINO_CFG, layer=-1)], ids=["clip", "dinov2"])
def test_gradients_reach_every_param_and_none_when_frozen(build):
    enc = build()
    enc(pixels())["tokens"].square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (should have been pruned): {missing}"
    enc.zero_grad(set_to_none=True)
    enc.requires_grad_(False)
    out = enc(pixels())["tokens"]
    assert not out.requires_grad
    assert all(p.grad is None for p in enc.parameters())


def test_key_field_is_kept_in_args():
    assert ENCODERS.parse_args({"name": "clip", "config": CLIP_MODEL_CFG, "key": "vit"}).key == "vit"
    assert ENCODERS.parse_args({"name": "dinov2", "config": DINO_CFG}).key is None
