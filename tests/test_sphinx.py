"""SPHINX parts: the convnext_clip and qformer encoders, the sphinx_mix fusion, per-encoder normalisation,
the tiny SPHINX mix with sub-images end to end (token counts, frozen encoders), and the SPHINX recipes.

Every model is tiny and randomly initialised or saved to a tmp folder and loaded back; nothing touches the
network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Model

import vlkit
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message
from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from vlkit.errors import CheckpointError, RecipeError
from vlkit.fusions.sphinx_mix import SphinxMixFusion, grid_layout, resample_grid
from vlkit.registry import ENCODERS, FUSIONS
from vlkit.training.stages import apply_trainable

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 24

# ------------------------------------------------------------------------------------------ convnext_clip

TINY_CONVNEXT = {"vision_cfg": {"timm_model_name": "convnext_atto", "image_size": 64,
                                "timm_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}}}
# an open_clip CLIP whose image tower is a timm ConvNeXt (as convnext_xxlarge, at atto size)
ATTO_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def convnext(**kwargs):
    return ENCODERS.build({"name": "convnext_clip", **kwargs}, "model.encoders[0]")


def convnext_reference(trunk, x: torch.Tensor) -> torch.Tensor:
    """What SPHINX computes: the trunk's last feature map after the head's LayerNorm, as row-major tokens."""
    fmap = trunk.head.norm(trunk.forward_features(x))
    return fmap.flatten(2).transpose(1, 2)


def test_convnext_clip_inline_shapes_mean_token_and_preprocess():
    torch.manual_seed(0)
    enc = convnext(config=TINY_CONVNEXT, mean_token=True)
    assert enc.grid == 2 and enc.num_tokens == 5 and enc.stream_dims == {"tokens": 32}
    assert enc.preprocess.size == 64 and enc.preprocess.mean == pytest.approx(CLIP_MEAN)
    assert enc.preprocess.std == pytest.approx(CLIP_STD)
    tokens = enc(torch.randn(2, 3, 64, 64))["tokens"]
    assert tokens.shape == (2, 5, 32)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))  # the mean token comes first
    plain = convnext(config=TINY_CONVNEXT, image_size=128)
    assert plain.num_tokens == 16 and plain(torch.randn(1, 3, 128, 128))["tokens"].shape == (1, 16, 32)
    early = convnext(config=TINY_CONVNEXT, stage=-2)
    assert early.grid == 4 and early.stream_dims == {"tokens": 24} and len(early.trunk.stages) == 3


def test_convnext_clip_gradients_reach_every_param_and_none_when_frozen():
    enc = convnext(config=TINY_CONVNEXT, mean_token=True)
    enc(torch.randn(2, 3, 64, 64))["tokens"].square().mean().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    enc.zero_grad(set_to_none=True)
    enc.requires_grad_(False)
    assert not enc(torch.randn(1, 3, 64, 64))["tokens"].requires_grad


def save_convnext_clip_folder(path: Path) -> open_clip.CLIP:
    model = open_clip.CLIP(**ATTO_CLIP_CFG).eval()
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": ATTO_CLIP_CFG, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    save_file(model.state_dict(), str(path / "open_clip_model.safetensors"))
    return model


def test_convnext_clip_local_dir_round_trip(tmp_path: Path):
    model = save_convnext_clip_folder(tmp_path / "cnx")
    for checkpoint in (f"local-dir:{tmp_path / 'cnx'}", str(tmp_path / "cnx")):
        enc = convnext(checkpoint=checkpoint).eval()
        assert enc.preprocess.mean == (0.5, 0.5, 0.5) and enc.preprocess.size == 64
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(enc(x)["tokens"], convnext_reference(model.visual.trunk, x))
    assert not any("text" in n or "proj" in n for n, _ in enc.named_parameters())


def test_convnext_clip_named_model_with_weights_file(tmp_path: Path):
    cfg_file = tmp_path / "vlkit-test-convnext-atto.json"
    cfg_file.write_text(json.dumps(ATTO_CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    model = open_clip.CLIP(**ATTO_CLIP_CFG).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    enc = convnext(model="vlkit-test-convnext-atto", pretrained=str(tmp_path / "w.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)["tokens"], convnext_reference(model.visual.trunk, x))
    with pytest.raises(RecipeError, match=r"neither a pretrained tag"):
        convnext(model="vlkit-test-convnext-atto", pretrained="laion9000")
    with pytest.raises(RecipeError, match=r"not a timm ConvNeXt"):
        convnext(model="ViT-B-32")


def test_convnext_clip_errors(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"exactly one of `model`.*got none of them"):
        ENCODERS.parse_args({"name": "convnext_clip"})
    with pytest.raises(RecipeError, match=r"needs `vision_cfg: \{timm_model_name"):
        ENCODERS.parse_args({"name": "convnext_clip", "config": {"vision_cfg": {"width": 32}}})
    with pytest.raises(RecipeError, match=r"unknown config.vision_cfg key\(s\) \['depth'\]"):
        ENCODERS.parse_args({"name": "convnext_clip", "config": {"vision_cfg": {
            "timm_model_name": "convnext_atto", "depth": 2}}})
    with pytest.raises(RecipeError, match=r"not a timm ConvNeXt"):
        convnext(config={"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 64}})
    with pytest.raises(RecipeError, match=r"bad timm arguments"):
        convnext(config={"vision_cfg": {**TINY_CONVNEXT["vision_cfg"], "timm_kwargs": {"depths": [1, 1]}}})
    with pytest.raises(RecipeError, match=r"smaller than stage 3's stride 32"):
        convnext(config=TINY_CONVNEXT, image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no open_clip_config.json"):
        convnext(checkpoint=str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"not found"):
        convnext(checkpoint=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ qformer

TINY_QFORMER = {
    "num_query_tokens": 4,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "qformer_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "cross_attention_frequency": 1},
}
TINY_OPT = {"model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "word_embed_proj_dim": 16, "max_position_embeddings": 64}


def qformer(**kwargs):
    return ENCODERS.build({"name": "qformer", **kwargs}, "model.encoders[0]")


def blip2_config() -> Blip2Config:
    return Blip2Config(vision_config=TINY_QFORMER["vision_config"],
                       qformer_config={**TINY_QFORMER["qformer_config"], "encoder_hidden_size": 32},
                       text_config=TINY_OPT, num_query_tokens=4)


def test_qformer_inline_config_shapes_and_distinct_queries():
    torch.manual_seed(0)
    enc = qformer(config=TINY_QFORMER)
    assert enc.num_tokens == 4 and enc.stream_dims == {"queries": 24}
    assert enc.preprocess.size == 32 and enc.preprocess.mean == pytest.approx(CLIP_MEAN)
    out = enc(torch.randn(2, 3, 32, 32))["queries"]
    assert out.shape == (2, 4, 24)
    assert not torch.allclose(out[:, 0], out[:, 1])  # random queries are not all equal
    out.square().mean().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    big = qformer(config=TINY_QFORMER, image_size=48)
    assert big(torch.randn(1, 3, 48, 48))["queries"].shape == (1, 4, 24)


@pytest.mark.parametrize("cls", [Blip2Model, Blip2ForConditionalGeneration])
def test_qformer_save_pretrained_round_trip(tmp_path: Path, cls):
    torch.manual_seed(0)
    model = cls(blip2_config()).eval()
    with torch.no_grad():
        model.query_tokens.normal_()
    model.save_pretrained(tmp_path / "blip2")
    enc = qformer(checkpoint=str(tmp_path / "blip2"))
    assert not any(n.startswith("tower.language") for n, _ in enc.named_parameters())
    for name, value in enc.tower.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)
    x = torch.randn(2, 3, 32, 32)
    if cls is Blip2Model:
        with torch.no_grad():
            torch.testing.assert_close(enc(x)["queries"], model.get_qformer_features(pixel_values=x))


def test_qformer_errors(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"exactly one of `checkpoint`.*got neither"):
        ENCODERS.parse_args({"name": "qformer"})
    with pytest.raises(RecipeError, match=r"got both"):
        ENCODERS.parse_args({"name": "qformer", "checkpoint": "x", "config": TINY_QFORMER})
    with pytest.raises(RecipeError, match=r"unknown config key\(s\) \['num_queries'\]"):
        ENCODERS.parse_args({"name": "qformer", "config": {"num_queries": 4}})
    with pytest.raises(RecipeError, match=r"config.vision_config must be a mapping"):
        ENCODERS.parse_args({"name": "qformer", "config": {"vision_config": 32}})
    with pytest.raises(CheckpointError, match=r"checkpoint folder not found"):
        qformer(checkpoint=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        qformer(checkpoint=str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"could not be found offline"):
        qformer(checkpoint="vlkit-test/no-such-blip2")


# ------------------------------------------------------------------------------------ per-encoder pixels


def test_each_encoder_normalises_its_own_pixels(tiny_recipe: Path):
    """CLIP and DINOv2 in one model get the same [0, 1] image, each normalised with its own statistics."""
    recipe = vlkit.load_recipe(tiny_recipe, [
        "model.encoders=[{name: clip, config: {vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1, "
        "heads: 2}}}, {name: dinov2, keep_cls: false, config: {model: vit_small_patch14_dinov2, img_size: 32, "
        "patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}]",
        "model.fusion={name: linear}"])
    model = vlkit.build_model(recipe)
    seen: dict[str, torch.Tensor] = {}
    for key, enc in model.encoders.items():
        enc.register_forward_pre_hook(lambda mod, args, key=key: seen.__setitem__(key, args[0]))
    model.encode_images(torch.full((1, 3, 32, 32), 0.5))
    expected = {"clip": (CLIP_MEAN, CLIP_STD), "dinov2": (IMAGENET_MEAN, IMAGENET_STD)}
    for key, (mean, std) in expected.items():
        want = (0.5 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(seen[key][0, :, 5, 5], want)
    assert not torch.allclose(seen["clip"], seen["dinov2"])


# -------------------------------------------------------------------------------------------- sphinx_mix

# tiny analogue of SPHINX: CLIP CLS + 4x4, ConvNeXt mean + 2x2, DINOv2 CLS + 4x4, Q-Former 4 queries
STREAMS = {"clip.tokens": (17, 32), "convnext_clip.tokens": (5, 64), "dinov2.tokens": (17, 48),
           "qformer.queries": (4, 24)}
# the real sizes (SPHINX at 224 px)
SPHINX_STREAMS = {"clip.tokens": (257, 1024), "convnext_clip.tokens": (65, 3072), "dinov2.tokens": (257, 1536),
                  "qformer.queries": (32, 768)}


def mix(section: dict | None = None, streams: dict = STREAMS) -> SphinxMixFusion:
    return FUSIONS.build({"name": "sphinx_mix", "query_streams": ["qformer.queries"], **(section or {})},
                         "model.fusion", streams=streams, hidden_size=HIDDEN)


def tensors(streams: dict = STREAMS, batch: int = 2) -> dict[str, torch.Tensor]:
    return {name: torch.randn(batch, n, c) for name, (n, c) in streams.items()}


def test_sphinx_token_counts_full_size():
    f = mix(streams=SPHINX_STREAMS)
    assert f.grid == 16 and f.lead and f.grid_tokens == 257
    assert f.grid_proj[0].in_features == 1024 + 3072 + 1536 == 5632
    assert f.num_tokens == 32 + 257 + 2 == 291
    assert mix({"wrap": False}, streams=SPHINX_STREAMS).num_tokens == 289


def test_sphinx_mix_layout_queries_in_front_wrapped():
    f = mix()
    assert f.num_tokens == 4 + 17 + 2 and f.grid == 4
    assert f.query_names == ["qformer.queries"]
    assert f.grid_names == ["clip.tokens", "convnext_clip.tokens", "dinov2.tokens"]
    assert [type(m).__name__ for m in f.grid_proj] == ["Linear", "LayerNorm"]
    assert [type(m).__name__ for m in f.query_projs[0]] == ["Linear", "LayerNorm"]
    x = tensors()
    out = f(x)
    assert out.shape == (2, 23, HIDDEN)
    torch.testing.assert_close(out[:, 0], f.begin_image[0].expand(2, -1))
    torch.testing.assert_close(out[:, -1], f.end_image[0].expand(2, -1))
    torch.testing.assert_close(out[:, 1:5], f.query_projs[0](x["qformer.queries"]))
    torch.testing.assert_close(out[:, 5:-1], f.grid_proj(f.mix_grid(x)))
    out.sum().backward()
    assert all(p.grad is not None for p in f.parameters())


def test_nearest_x2_upsampling_equals_repeat_interleave():
    f = mix()
    x = tensors()
    mixed = f.mix_grid(x)
    assert mixed.shape == (2, 17, 32 + 64 + 48)
    cnx = x["convnext_clip.tokens"]
    grid = cnx[:, 1:].reshape(2, 2, 2, 64)
    expected = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 16, 64)
    torch.testing.assert_close(mixed[:, 1:, 32:96], expected, rtol=0, atol=0)
    torch.testing.assert_close(mixed[:, 0, 32:96], cnx[:, 0])  # the mean token stays in the leading slot
    torch.testing.assert_close(mixed[:, :, :32], x["clip.tokens"])  # CLIP is already on the 4x4 grid
    torch.testing.assert_close(mixed[:, :, 96:], x["dinov2.tokens"])


def test_bilinear_and_pool_resampling():
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    pooled = resample_grid(tokens, 2, "pool")
    torch.testing.assert_close(pooled.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 block means
    small = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    assert not torch.equal(resample_grid(small, 4, "bilinear"), resample_grid(small, 4, "nearest"))
    f = mix({"grid": 2, "resample": "pool"})
    assert f.grid_tokens == 5 and f.num_tokens == 4 + 5 + 2
    x = tensors()
    torch.testing.assert_close(f.mix_grid(x)[:, 1:, :32], resample_grid(x["clip.tokens"][:, 1:], 2, "pool"))


def test_lead_tokens_are_handled_consistently():
    streams = {"clip.tokens": (16, 8), "dinov2.tokens": (17, 8)}  # CLIP without CLS, DINOv2 with
    f = FUSIONS.build({"name": "sphinx_mix", "wrap": False}, "model.fusion", streams=streams, hidden_size=HIDDEN)
    assert f.lead and f.num_tokens == 17 and f.query_names == []
    x = tensors(streams)
    mixed = f.mix_grid(x)
    torch.testing.assert_close(mixed[:, 0, :8], x["clip.tokens"].mean(dim=1))  # its grid mean fills the slot
    torch.testing.assert_close(mixed[:, 0, 8:], x["dinov2.tokens"][:, 0])
    drop = FUSIONS.build({"name": "sphinx_mix", "wrap": False, "lead_token": "drop"}, "model.fusion",
                         streams=streams, hidden_size=HIDDEN)
    assert drop.num_tokens == 16
    torch.testing.assert_close(drop.mix_grid(x)[:, :, 8:], x["dinov2.tokens"][:, 1:])


def test_query_streams_detected_or_explicit():
    assert grid_layout(257) == (16, True) and grid_layout(256) == (16, False) and grid_layout(32) is None
    auto = FUSIONS.build({"name": "sphinx_mix"}, "model.fusion", streams=SPHINX_STREAMS, hidden_size=HIDDEN)
    assert auto.query_names == ["qformer.queries"] and auto.num_tokens == 291
    sixteen = {"clip.tokens": (17, 8), "qformer.queries": (16, 8)}  # 16 queries look like a 4x4 grid
    assert FUSIONS.build({"name": "sphinx_mix"}, "model.fusion", streams=sixteen,
                         hidden_size=HIDDEN).query_names == []
    explicit = FUSIONS.build({"name": "sphinx_mix", "query_streams": ["qformer.queries"]}, "model.fusion",
                             streams=sixteen, hidden_size=HIDDEN)
    assert explicit.query_names == ["qformer.queries"] and explicit.num_tokens == 16 + 17 + 2


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"resample": "cubic"}, r"model.fusion.resample: 'cubic' is not one of"),
        ({"grid": 0}, r"model.fusion.grid: must be a positive grid side"),
        ({"lead_token": "first"}, r"model.fusion.lead_token: 'first' is not one of"),
        ({"projector": "mlp2x_relu"}, r"model.fusion.projector: unknown projector"),
        ({"query_streams": ["q.x", "q.x"]}, r"model.fusion.query_streams: stream\(s\) \['q.x'\] listed more"),
        ({"streams": ["clip.tokens"], "query_streams": ["qformer.queries"]},
         r"model.fusion.query_streams: \['qformer.queries'\] are not among the selected `streams`"),
        ({"query_stream": ["qformer.queries"]}, r"unknown key. Did you mean 'query_streams'"),
    ],
)
def test_sphinx_mix_recipe_errors(section: dict, match: str):
    with pytest.raises(RecipeError, match=match):
        FUSIONS.parse_args({"name": "sphinx_mix", **section}, "model.fusion")


def test_sphinx_mix_build_errors():
    with pytest.raises(RecipeError, match=r"model.fusion.query_streams: .*unknown stream\(s\) \['qformer.q'\]"):
        mix({"query_streams": ["qformer.q"]})
    with pytest.raises(RecipeError, match=r"needs at least one grid stream"):
        FUSIONS.build({"name": "sphinx_mix", "query_streams": ["a.q"]}, "model.fusion",
                      streams={"a.q": (32, 8)}, hidden_size=HIDDEN)
    with pytest.raises(RecipeError, match=r"'a.q' has 11 tokens, which is neither a square grid"):
        FUSIONS.build({"name": "sphinx_mix", "query_streams": []}, "model.fusion",
                      streams={"clip.tokens": (17, 8), "a.q": (11, 8)}, hidden_size=HIDDEN)


# ------------------------------------------------------------------------- the tiny SPHINX mix, end to end

SPHINX_TINY = """\
seed: 0
model:
  encoders:
    - name: clip
      keep_cls: true
      config: {{vision_cfg: {{image_size: 16, patch_size: 4, width: 32, layers: 1, heads: 2}}}}
    - name: convnext_clip
      mean_token: true
      config: {{vision_cfg: {{timm_model_name: convnext_atto, image_size: 64,
                             timm_kwargs: {{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}}}}}}
    - name: dinov2
      config: {{model: vit_small_patch14_dinov2, img_size: 16, patch_size: 4, embed_dim: 24, depth: 1,
               num_heads: 2}}
    - name: qformer
      config: {{num_query_tokens: 4,
               vision_config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
                               num_attention_heads: 2, image_size: 16, patch_size: 4}},
               qformer_config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
                                num_attention_heads: 2}}}}
  fusion: {{name: sphinx_mix, query_streams: [qformer.queries]}}
  views: {{grid: 2, size: 16}}
  llm:
    name: hf_causal
    tokenizer: {demo}/tokenizer
    config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 512}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 4, num_workers: 0}}
stages:
  - {{name: tune, trainable: [fusion, llm], lr: 1.0e-3, max_steps: 2}}
trainer: {{accelerator: cpu, progress_bar: false}}
"""


@pytest.fixture()
def sphinx_recipe(demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "sphinx_tiny.yaml"
    path.write_text(SPHINX_TINY.format(demo=demo_dir))
    return path


def test_tiny_sphinx_token_counts_per_view_and_total(sphinx_recipe: Path):
    torch.manual_seed(0)
    model = vlkit.build_model(vlkit.load_recipe(sphinx_recipe))
    assert {k: e.num_tokens for k, e in model.encoders.items()} == {
        "clip": 17, "convnext_clip": 5, "dinov2": 17, "qformer": 4}
    assert model.fusion.num_tokens == 4 + 17 + 2  # the tiny analogue of 32 + 257 (+ begin/end)
    assert model.num_views == 5 and model.num_image_tokens == 5 * 23
    proc = model.processor()
    feats = proc.train_features([Message("user", "<image>\nWhat shape?"), Message("assistant", "circle")],
                                Image.new("RGB", (64, 64), "red"))
    assert feats["pixel_values"].shape == (3, 32, 32)
    assert sum(i == IMAGE_TOKEN_ID for i in feats["input_ids"]) == 115
    tokens = model.encode_images(feats["pixel_values"].unsqueeze(0))
    assert tokens.shape == (1, 115, 32)
    for v in range(5):  # every view is wrapped in its own begin/end-of-image embeddings
        torch.testing.assert_close(tokens[0, v * 23], model.fusion.begin_image[0, 0])
        torch.testing.assert_close(tokens[0, v * 23 + 22], model.fusion.end_image[0, 0])


def test_frozen_encoders_get_no_gradient_fusion_and_llm_do(sphinx_recipe: Path):
    recipe = vlkit.load_recipe(sphinx_recipe)
    model = vlkit.build_model(recipe)
    apply_trainable(model, recipe.stages[0])
    proc = model.processor()
    batch = proc.collate([proc.train_features([Message("user", "<image>\nWhat color is it?"),
                                               Message("assistant", "red")], Image.new("RGB", (40, 64), "red"))])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        trains = name.startswith(("fusion.", "llm."))
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
    assert model.fusion.begin_image.grad.abs().sum() > 0 and model.fusion.query_projs[0][0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", ["sphinx.yaml", "sphinx_1k.yaml", "demo/sphinx.yaml"])
def test_sphinx_recipes_validate(name: str):
    recipe = vlkit.load_recipe(ROOT / "recipes" / name)
    names = [e["name"] for e in recipe.model.encoders]
    assert names == ["clip", "convnext_clip", "dinov2", "qformer"]
    assert recipe.model.fusion["name"] == "sphinx_mix"
    assert recipe.model.fusion["query_streams"] == ["qformer.queries"]
    assert all(s.trainable == ["fusion", "llm"] for s in recipe.stages)  # every encoder frozen, as in SPHINX
    if name == "sphinx.yaml":
        assert recipe.model.views is None
    else:
        assert recipe.model.views is not None and recipe.model.views.grid == 2
    if name == "sphinx_1k.yaml":
        assert recipe.model.views.size * recipe.model.views.grid == 448


def test_demo_sphinx_recipe_builds(demo_dir: Path):
    recipe = vlkit.load_recipe(ROOT / "recipes" / "demo" / "sphinx.yaml",
                               [f"model.llm.tokenizer={demo_dir}/tokenizer"])
    model = vlkit.build_model(recipe)
    assert model.num_image_tokens == model.num_views * model.fusion.num_tokens
    assert model.fusion.query_names == ["qformer.queries"]
    with torch.no_grad():
        assert model.encode_images(torch.rand(2, 3, model.image_size, model.image_size)).shape == (
            2, model.num_image_tokens, model.llm.hidden_size)
