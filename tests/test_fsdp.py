"""``trainer.strategy`` mappings: FSDP wraps every part's block class; DeepSpeed configs pass through.

Lightning 2.6 refuses FSDP without CUDA (checked below, so this file notices when that changes); the FSDP
training run (train, resume, export) is ``benchmarks/gpu/fsdp.py``, for a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

import vlkit
from vlkit.errors import RecipeError
from vlkit.training.strategy import block_classes, build_strategy


@pytest.fixture()
def model(tiny_recipe: Path):
    return vlkit.build_model(vlkit.load_recipe(tiny_recipe))


def test_fsdp_wraps_every_part_block_class(model):
    blocks = block_classes(model)
    assert {c.__name__ for c in blocks} == {"ResidualAttentionBlock", "LlamaDecoderLayer"}
    for spec in ("fsdp", {"name": "fsdp", "sharding_strategy": "SHARD_GRAD_OP"}):
        strategy = build_strategy(spec, model)
        assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == blocks
        assert strategy._state_dict_type == "full"  # rank 0 writes the checkpoint vlkit resumes and exports
    assert build_strategy("ddp", model) == "ddp"


def test_lightning_fsdp_needs_cuda(model):
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=build_strategy("fsdp", model), logger=False)


def test_deepspeed_config_passes_through(model, monkeypatch):
    import lightning.pytorch.strategies.deepspeed as ds

    if not ds._DEEPSPEED_AVAILABLE:  # not installed here: building the strategy only sets deepspeed's log level
        import logging
        import sys
        import types

        stub = types.ModuleType("deepspeed")
        stub.utils = types.SimpleNamespace(logging=types.SimpleNamespace(logger=logging.getLogger("deepspeed")))
        monkeypatch.setitem(sys.modules, "deepspeed", stub)
        monkeypatch.setattr(ds, "_DEEPSPEED_AVAILABLE", True)
        monkeypatch.setattr(ds, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    config = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "train_micro_batch_size_per_gpu": 2}
    strategy = build_strategy({"name": "deepspeed", "config": config}, model)
    assert strategy.config["zero_optimization"] == config["zero_optimization"]
    assert strategy.config["train_micro_batch_size_per_gpu"] == 2
    assert build_strategy({"name": "deepspeed", "stage": 3}, model).config["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(("override", "match"), [
    ("trainer.strategy={name: horovod}", "needs `name: fsdp` or `name: deepspeed`"),
    ("trainer.strategy={name: fsdp, state_dict_type: local}", "full or sharded"),
    ("trainer.strategy={name: fsdp, auto_wrap_policy: x}", "FSDP wraps every part's block class"),
    ("trainer.strategy={name: deepspeed, stage: 4}", "must be 1, 2 or 3"),
    ("trainer.strategy={name: deepspeed, stage: 2, config: {}}", "not both"),
])
def test_strategy_mappings_are_validated_with_the_recipe(tiny_recipe: Path, override, match):
    with pytest.raises(RecipeError, match=match):
        vlkit.load_recipe(tiny_recipe, [override])
