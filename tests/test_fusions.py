"""Fusions (linear, mlp, token_concat) and LLaVA-style projectors: shapes, structure, validation, registry."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from vlkit.errors import RecipeError
from vlkit.fusions.linear import LinearFusion
from vlkit.fusions.mlp import MLPFusion
from vlkit.fusions.projector import build_projector
from vlkit.fusions.token_concat import TokenConcatFusion
from vlkit.registry import FUSIONS

HIDDEN = 24
# two encoders with the same token count (and one stream of another width), one with a different count
STREAMS = {"clip.tokens": (16, 32), "siglip.tokens": (16, 48), "dinov2.tokens": (17, 32)}


def fusion(section: dict, streams: dict[str, tuple[int, int]] = STREAMS, hidden_size: int = HIDDEN):
    return FUSIONS.build(section, "model.fusion", streams=streams, hidden_size=hidden_size)


def tensors(streams: dict[str, tuple[int, int]] = STREAMS, batch: int = 2) -> dict[str, torch.Tensor]:
    return {name: torch.randn(batch, n, c) for name, (n, c) in streams.items()}


# --------------------------------------------------------------------------------------------- projector


def test_linear_projector():
    proj = build_projector("linear", 8, 16)
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (8, 16)


def test_mlp3x_gelu_structure():
    proj = build_projector("mlp3x_gelu", 8, 16)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, nn.Linear)] == [(8, 16), (16, 16),
                                                                                            (16, 16)]
    one = build_projector("mlp1x_gelu", 8, 16)
    assert [type(m) for m in one] == [nn.Linear]
    assert proj(torch.randn(2, 5, 8)).shape == (2, 5, 16)


@pytest.mark.parametrize("spec", ["mlp0x_gelu", "mlp2x_relu", "mlp", "conv", "MLP2x_gelu", "mlp2x_gelu "])
def test_unknown_projector_lists_valid_forms(spec):
    with pytest.raises(RecipeError, match=r"model.fusion.projector: unknown projector.*'linear' or 'mlp\{N\}x_gelu'"):
        build_projector(spec, 8, 16)


def test_bad_projector_is_caught_when_the_recipe_is_validated():
    for name in ("mlp", "token_concat"):
        with pytest.raises(RecipeError, match=r"model.fusion.projector: unknown projector 'mlp2x_swish'"):
            FUSIONS.parse_args({"name": name, "projector": "mlp2x_swish"}, "model.fusion")


# ------------------------------------------------------------------------------------------ linear / mlp


def test_linear_channel_concat():
    f = fusion({"name": "linear", "streams": ["clip.tokens", "siglip.tokens"]})
    assert f.num_tokens == 16 and isinstance(f.projector, nn.Linear)
    assert f.projector.in_features == 32 + 48
    x = tensors()
    out = f(x)
    assert out.shape == (2, 16, HIDDEN)
    expected = f.projector(torch.cat([x["clip.tokens"], x["siglip.tokens"]], dim=-1))
    torch.testing.assert_close(out, expected)


def test_mlp_shares_the_linear_implementation():
    f = fusion({"name": "mlp", "streams": ["siglip.tokens", "clip.tokens"]})
    assert isinstance(f, MLPFusion) and isinstance(f, LinearFusion)
    assert f.args.projector == "mlp2x_gelu"
    assert [type(m) for m in f.projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert f.projector[0].in_features == 80
    assert f(tensors()).shape == (2, 16, HIDDEN)
    deep = fusion({"name": "mlp", "projector": "mlp3x_gelu", "streams": ["clip.tokens"]})
    assert len(deep.projector) == 5 and deep.num_tokens == 16


def test_single_stream_default_selects_all():
    only = {"clip.tokens": (16, 32)}
    f = fusion({"name": "mlp"}, streams=only)
    assert f.stream_names == ["clip.tokens"]
    assert f(tensors(only)).shape == (2, 16, HIDDEN)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_channel_concat_needs_equal_token_counts(name):
    with pytest.raises(RecipeError, match=r"model.fusion.streams: .*same token count.*token_concat"):
        fusion({"name": name})  # all three streams: 16, 16, 17 tokens


@pytest.mark.parametrize("name", ["linear", "mlp", "token_concat"])
@pytest.mark.parametrize(
    ("streams", "match"),
    [
        (["clip.tokenz"], r"unknown stream\(s\) \['clip.tokenz'\]"),
        (["clip.tokens", "clip.tokens"], "listed more than once"),
        ([], "name at least one stream"),
    ],
)
def test_bad_stream_selection(name, streams, match):
    with pytest.raises(RecipeError, match=rf"model.fusion.streams: .*{match}"):
        fusion({"name": name, "streams": streams})


# ----------------------------------------------------------------------------------------- token_concat


def test_token_concat_sums_tokens_in_stream_order():
    f = fusion({"name": "token_concat", "streams": ["dinov2.tokens", "siglip.tokens", "clip.tokens"]})
    assert isinstance(f, TokenConcatFusion)
    assert f.num_tokens == 17 + 16 + 16
    assert len(f.projectors) == 3
    assert [p[0].in_features for p in f.projectors] == [32, 48, 32]
    x = tensors()
    out = f(x)
    assert out.shape == (2, 49, HIDDEN)
    torch.testing.assert_close(out[:, :17], f.projectors[0](x["dinov2.tokens"]))
    torch.testing.assert_close(out[:, 17:33], f.projectors[1](x["siglip.tokens"]))
    torch.testing.assert_close(out[:, 33:], f.projectors[2](x["clip.tokens"]))


def test_token_concat_shared_projector():
    f = fusion({"name": "token_concat", "projector": "linear", "shared_projector": True,
                "streams": ["clip.tokens", "dinov2.tokens"]})
    assert len(f.projectors) == 1 and f.num_tokens == 33
    x = tensors()
    out = f(x)
    torch.testing.assert_close(out[:, 16:], f.projectors[0](x["dinov2.tokens"]))
    with pytest.raises(RecipeError, match=r"model.fusion.shared_projector: .*equal width"):
        fusion({"name": "token_concat", "shared_projector": True})  # widths 32, 48, 32


def test_gradients_reach_projectors():
    f = fusion({"name": "token_concat"})
    x = {k: v.requires_grad_() for k, v in tensors().items()}
    f(x).sum().backward()
    assert all(p.grad is not None for p in f.parameters())
    assert all(v.grad is not None for v in x.values())


def test_no_streams_at_all():
    with pytest.raises(RecipeError, match=r"provide no streams"):
        fusion({"name": "linear"}, streams={})


def test_encoder_streams_into_fusion_via_registries():
    """The wiring model.py does: encoder stream dims -> fusion built from the registry."""
    from vlkit.registry import ENCODERS

    enc = ENCODERS.build({"name": "dinov2", "config": {"model": "vit_small_patch14_dinov2", "img_size": 32,
                                                       "patch_size": 8, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2}})
    streams = {f"dino.{k}": (enc.num_tokens, d) for k, d in enc.stream_dims.items()}
    f = fusion({"name": "mlp"}, streams=streams)
    out = f({f"dino.{k}": v for k, v in enc(torch.randn(2, 3, 32, 32)).items()})
    assert out.shape == (2, 17, HIDDEN)
