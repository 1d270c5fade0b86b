"""Frozen parts run in eval mode while training (no dropout / drop-path, fixed batch-norm statistics);
trainable parts in train mode; re-applied at every stage and after every validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vlkit import build_model, load_recipe
from vlkit.training.checkpoint import read_weights
from vlkit.training.fit import fit
from vlkit.training.stages import apply_trainable

DINO = ("{model: vit_small_patch14_dinov2, img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
        "drop_path_rate: 0.3, proj_drop_rate: 0.3, attn_drop_rate: 0.3}")
DROPOUT = [f"model.encoders=[{{name: dinov2, config: {DINO}}}]", "model.llm.config.attention_dropout=0.2"]
"""Overrides of the tiny recipe: an encoder with dropout and drop-path, an LLM with attention dropout."""


def _pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_train_mode_puts_frozen_parts_in_eval_and_follows_each_stage(tiny_recipe: Path):
    recipe = load_recipe(tiny_recipe, DROPOUT)
    model = build_model(recipe)
    encoder = model.encoders["dinov2"]
    apply_trainable(model, recipe.stages[0])  # align: only the fusion trains
    model.train()
    assert not any(m.training for m in encoder.modules()) and not any(m.training for m in model.llm.modules())
    assert model.training and all(m.training for m in model.fusion.modules())
    first, second = model.image_streams(_pixels()), model.image_streams(_pixels())
    assert torch.equal(first["dinov2.tokens"], second["dinov2.tokens"])  # no dropout in the frozen encoder
    apply_trainable(model, recipe.stages[1])  # tune: the LLM trains too, so its dropout is on again
    model.train()
    assert all(m.training for m in model.llm.modules()) and not encoder.training
    # a trainable encoder does train with its dropout (what the frozen one must not do)
    model.requires_grad_(True)
    model.train()
    assert encoder.training
    assert not torch.equal(model.image_streams(_pixels())["dinov2.tokens"], first["dinov2.tokens"])
    model.eval()
    assert not any(m.training for m in model.modules())
    assert torch.equal(model.image_streams(_pixels())["dinov2.tokens"], first["dinov2.tokens"])  # = eval output


class RecordModes(Callback):
    """At every training step: the modes of the parts, and whether two forwards of the encoder agree."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, bool, bool, bool, bool]] = []
        self.validations = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validations += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        with torch.no_grad():
            a = model.image_streams(batch["pixel_values"])["dinov2.tokens"]
            b = model.image_streams(batch["pixel_values"])["dinov2.tokens"]
        self.steps.append((pl_module.stage.name, trainer.global_step, model.encoders["dinov2"].training,
                           model.fusion.training, model.llm.training, torch.equal(a, b)))


@pytest.mark.slow
def test_frozen_encoder_forwards_agree_during_a_fit_and_after_validation(tiny_recipe: Path, tmp_path: Path):
    recipe = load_recipe(tiny_recipe, [*DROPOUT, "stages.0.val_every=1", "stages.1.val_every=2",
                                       "eval.max_samples=8"])
    record = RecordModes()
    fit(recipe, tmp_path / "run", callbacks=[record])
    assert [(s, step) for s, step, *_ in record.steps] == [("align", 0), ("align", 1), ("align", 2),
                                                         ("tune", 0), ("tune", 1), ("tune", 2), ("tune", 3)]
    assert record.validations >= 4  # after steps 1, 2 (align), 2 (tune) and at each stage's end
    for stage, step, encoder, fusion, llm, agree in record.steps:
        assert not encoder and agree, (stage, step)  # frozen in both stages: eval mode, identical forwards
        assert fusion, (stage, step)  # trains in both stages
        assert llm == (stage == "tune"), (stage, step)  # frozen in align, trained in tune


BN_PLUGIN = '''
from dataclasses import dataclass

from torch import nn

from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder


class BNEncoder(VisionEncoder):
    """Patch convolution + batch norm: 32 px -> 4x4 tokens."""

    @dataclass
    class Args:
        width: int = 16

    def __init__(self, args):
        super().__init__()
        self.conv = nn.Conv2d(3, args.width, 8, 8)
        self.bn = nn.BatchNorm2d(args.width)
        self.stream_dims = {"tokens": args.width}
        self.num_tokens = 16
        self.preprocess = Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, pixel_values):
        return {"tokens": self.bn(self.conv(pixel_values)).flatten(2).transpose(1, 2)}
'''


@pytest.mark.slow
def test_batch_norm_statistics_of_a_frozen_encoder_never_move(tiny_recipe: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "bn_plugin_encoder.py").write_text(BN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(tiny_recipe, ["model.encoders=[{name: 'bn_plugin_encoder:BNEncoder', key: bn}]",
                                       "stages=[{name: frozen, trainable: [fusion], max_steps: 3, lr: 1.0e-3}, "
                                       "{name: trained, trainable: [encoders, fusion], max_steps: 2, lr: 1.0e-3}]"])
    fit(recipe, tmp_path / "run")
    frozen = read_weights(tmp_path / "run" / "stage0-frozen" / "last")
    trained = read_weights(tmp_path / "run" / "stage1-trained" / "last")
    prefix = "model.encoders.bn.bn."
    assert torch.equal(frozen[prefix + "running_mean"], torch.zeros(16))  # as initialised: 3 steps moved nothing
    assert torch.equal(frozen[prefix + "running_var"], torch.ones(16))
    assert int(frozen[prefix + "num_batches_tracked"]) == 0
    assert int(trained[prefix + "num_batches_tracked"]) == 2  # the same encoder, trained: its statistics move
    assert not torch.equal(trained[prefix + "running_mean"], torch.zeros(16))
