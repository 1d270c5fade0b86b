"""Mixed precision: trained weights stay float32 (bf16 compute under bf16-mixed); half-precision storage only
for parts that train in no stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vlkit import build_model, load_recipe
from vlkit.cli import main
from vlkit.errors import RecipeError
from vlkit.training.fit import fit
from vlkit.training.lora import sync_lora
from vlkit.training.stages import apply_trainable, count_parts

LR = 1.0e-4
ONE_STEP = ["data.val=null", "trainer.precision=bf16-mixed",
            f"stages=[{{name: tune, trainable: [llm], lr: {LR}, warmup: 0, schedule: constant, max_steps: 1}}]"]
"""One step of the LLM at lr 1e-4 under bf16-mixed (with the default gradient clipping, as the recipes)."""


class _Record(Callback):
    """The final norm's weight (all ones at init) before and after the first optimizer step, its gradient,
    and the dtype the LLM's first linear layer computed in."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.compute: list[torch.dtype] = []

    def on_train_start(self, trainer, pl_module) -> None:
        llm = pl_module.model.llm.model
        llm.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, i, out: self.compute.append(out.dtype))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        weight = pl_module.model.llm.model.model.norm.weight
        self.seen["before"] = weight.detach().clone()
        self.seen["grad"] = weight.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.setdefault("after", pl_module.model.llm.model.model.norm.weight.detach().clone())


def test_a_bf16_mixed_step_moves_a_weight_by_less_than_bf16_resolves(tiny_recipe: Path, tmp_path: Path):
    record = _Record()
    fit(load_recipe(tiny_recipe, ONE_STEP), tmp_path / "run", callbacks=[record])
    before, grad, after = record.seen["before"], record.seen["grad"], record.seen["after"]
    assert torch.bfloat16 in record.compute  # the LLM computed in bf16 ...
    assert before.dtype == after.dtype == torch.float32  # ... on float32 weights
    assert torch.equal(before, torch.ones_like(before))
    # AdamW's first step (bias-corrected m = g, v = g^2): -lr * g / (|g| + eps), ~1e-4 here (clipping the
    # gradient's norm scales g, which this step ignores up to eps)
    update = -LR * grad / (grad.abs() + 1.0e-8)
    assert grad.abs().min() > 1e-6 and update.abs().max() <= LR
    # in bf16 (resolution 7.8e-3 at 1.0) this step would round away: the weight would not move
    assert torch.equal((before + update).to(torch.bfloat16), before.to(torch.bfloat16))
    torch.testing.assert_close(after - before, update, rtol=0, atol=2e-7)  # the float32 weight moved by it


def test_half_precision_dtype_on_a_trained_part_is_refused(tiny_recipe: Path, capsys):
    assert main(["config", str(tiny_recipe), "model.llm.dtype=bfloat16"]) == 2
    err = capsys.readouterr().err
    for text in ("model.llm.dtype", "stage 'tune' trains 'llm'", "bfloat16", "Remove `dtype`", "bf16-mixed"):
        assert text in err, (text, err)
    with pytest.raises(RecipeError, match=r"model.llm.dtype: stage 'tune' trains 'llm\.model\.model\.norm'"):
        load_recipe(tiny_recipe, ["model.llm.dtype=float16", "stages.1.trainable=[fusion, llm.model.model.norm]"])
    with pytest.raises(RecipeError, match=r"trainer.precision: precision bf16-true stores the weights"):
        load_recipe(tiny_recipe, ["trainer.precision=bf16-true"])
    with pytest.raises(RecipeError, match=r"stages\[1\].precision: precision 16-true"):
        load_recipe(tiny_recipe, ["stages.1.precision=16-true"])


def test_half_precision_is_allowed_for_frozen_parts_and_lora_adapters_train_in_fp32(tiny_recipe: Path):
    frozen = load_recipe(tiny_recipe, ["model.llm.dtype=bfloat16", "stages.1.trainable=[fusion]"])
    assert main(["config", str(tiny_recipe), "model.llm.dtype=bfloat16", "stages.1.trainable=[fusion]"]) == 0
    lora = load_recipe(tiny_recipe, ["model.llm.dtype=bfloat16", "stages.1.trainable=[fusion]",
                                     "stages.1.lora={parts: [llm], r: 4, alpha: 8}"])
    model = build_model(lora)
    sync_lora(model, lora.stages)
    apply_trainable(model, lora.stages[1], "stages[1]")
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and set(trained.values()) == {torch.float32}
    assert {p.dtype for n, p in model.llm.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    rows = {r.part: r for r in count_parts(model)}
    assert rows["llm"].dtypes == "bf16+fp32" and rows["fusion"].dtypes == "fp32"
    apply_trainable(build_model(frozen), frozen.stages[1], "stages[1]")  # nothing half-precision trains


def test_a_stage_refuses_training_weights_loaded_in_half_precision(tiny_recipe: Path):
    """What the recipe cannot tell (e.g. ``dtype: auto`` on a bf16 checkpoint) is caught at stage start."""
    recipe = load_recipe(tiny_recipe)
    model = build_model(recipe)
    model.fusion.to(torch.bfloat16)
    with pytest.raises(RecipeError, match=r"stages\[0\].trainable: stage 'align' trains fusion\.\S+ \(fusion\), "
                                          r"whose weights are stored in torch.bfloat16"):
        apply_trainable(model, recipe.stages[0], "stages[0]")  # align: trains the fusion
