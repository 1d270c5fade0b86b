"""Part contracts: a part that breaks its interface fails when built or on its first forward with one error
naming the part, its recipe path and the rule, not deep inside another part."""

from __future__ import annotations

import copy
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE

import vlkit
from vlkit.contracts import ContractError
from vlkit.registry import ENCODERS, FUSIONS

BAD_PARTS = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    from torch import nn

    from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder
    from vlkit.fusions.base import Fusion


    class ConvEncoder(VisionEncoder):
        """Patchify with a conv; ``transpose`` decides whether it returns (B, N, C) or, wrongly, (B, C, N)."""

        @dataclass
        class Args:
            width: int = 32
            transpose: bool = True
            set_num_tokens: bool = True

        def __init__(self, args):
            super().__init__()
            self.args = args
            self.conv = nn.Conv2d(3, args.width, 8, 8)
            self.stream_dims = {"tokens": args.width}
            if args.set_num_tokens:
                self.num_tokens = 16
            self.preprocess = Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)

        def forward(self, pixel_values):
            x = self.conv(pixel_values).flatten(2)  # (B, C, N)
            return {"tokens": x.transpose(1, 2) if self.args.transpose else x}


    class ShortFusion(Fusion):
        """Declares 8 tokens but returns the encoder's 16."""

        @dataclass
        class Args:
            pass

        def __init__(self, args, streams, hidden_size):
            super().__init__()
            (n, c), = streams.values()
            self.proj = nn.Linear(c, hidden_size)
            self.num_tokens = 8

        def forward(self, streams):
            (x,) = streams.values()
            return self.proj(x)
''')


@pytest.fixture()
def bad_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "contract_parts.py").write_text(BAD_PARTS)
    monkeypatch.syspath_prepend(str(tmp_path))


def _recipe(tmp_path: Path, demo: Path, overrides: list[str]) -> vlkit.Recipe:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(demo=demo))
    return vlkit.load_recipe(path, ["model.encoders.0={name: 'contract_parts:ConvEncoder', key: conv}",
                                    *overrides])


def test_encoder_missing_num_tokens_fails_at_build(bad_parts):
    with pytest.raises(ContractError) as err:
        ENCODERS.build({"name": "contract_parts:ConvEncoder", "set_num_tokens": False}, "model.encoders[0]")
    message = str(err.value)
    assert message.startswith("encoder 'contract_parts:ConvEncoder' (model.encoders[0]) breaks the encoder "
                              "contract: it has no `num_tokens`")
    assert "\n" not in message


def test_encoder_returning_channels_first_fails_on_first_forward(bad_parts):
    encoder = ENCODERS.build({"name": "contract_parts:ConvEncoder", "transpose": False}, "model.encoders[1]")
    with pytest.raises(ContractError, match=r"encoder 'contract_parts:ConvEncoder' \(model.encoders\[1\]\) breaks "
                       r"the encoder contract: stream 'tokens' has shape \(2, 32, 16\), expected \(B, num_tokens, "
                       r"channels\) = \(2, 16, 32\); it looks transposed"):
        encoder.encode(torch.rand(2, 3, 40, 48))


def test_a_good_part_is_checked_once_and_stays_picklable(bad_parts):
    encoder = ENCODERS.build({"name": "contract_parts:ConvEncoder"}, "model.encoders[0]")
    assert encoder.encode(torch.rand(3, 3, 32, 32))["tokens"].shape == (3, 16, 32)
    hook = next(iter(encoder._forward_hooks.values()))
    assert hook.done  # later forwards are not checked again
    clone = pickle.loads(pickle.dumps(copy.deepcopy(encoder)))
    assert clone.encode(torch.rand(1, 3, 32, 32))["tokens"].shape == (1, 16, 32)


def test_fusion_output_tokens_checked_against_num_tokens(bad_parts):
    fusion = FUSIONS.build({"name": "contract_parts:ShortFusion"}, "model.fusion",
                           streams={"conv.tokens": (16, 32)}, hidden_size=24)
    with pytest.raises(ContractError, match=r"fusion 'contract_parts:ShortFusion' \(model.fusion\) breaks the "
                       r"fusion contract: forward returned \(2, 16, 24\), expected \(B, num_tokens, hidden_size\) = "
                       r"\(2, 8, 24\)"):
        fusion({"conv.tokens": torch.randn(2, 16, 32)})


def test_contract_error_through_the_model_names_the_recipe_path(bad_parts, tmp_path: Path, demo_dir: Path):
    recipe = _recipe(tmp_path, demo_dir, ["model.encoders.0.transpose=false"])
    assert recipe.model.encoders[0]["key"] == "conv"  # `key:` accepted though ConvEncoder.Args lacks it
    model = vlkit.build_model(recipe)
    assert list(model.encoders) == ["conv"]
    with pytest.raises(ContractError, match=r"\(model.encoders\[0\]\) breaks the encoder contract: stream 'tokens'"):
        model.encode_images(torch.rand(2, 3, 32, 32))  # not `mat1 and mat2 shapes cannot be multiplied`
    good = vlkit.build_model(_recipe(tmp_path, demo_dir, []))
    assert good.encode_images(torch.rand(2, 3, 32, 32)).shape == (2, 16, 32)


def test_builtin_parts_keep_their_contracts(tiny_recipe: Path):
    path = tiny_recipe
    model = vlkit.build_model(vlkit.load_recipe(path))
    assert model.encode_images(torch.rand(2, 3, 32, 32)).shape == (2, model.fusion.num_tokens, 32)
