"""The VLM: token splicing, label masks, freezing, text-only samples, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, Message
from vlkit.training.stages import apply_trainable, build_optimizer, count_parts


@pytest.fixture()
def model(tiny_recipe: Path) -> vlkit.VLM:
    torch.manual_seed(0)
    return vlkit.build_model(vlkit.load_recipe(tiny_recipe))


def image(color: str = "red") -> Image.Image:
    return Image.new("RGB", (64, 64), color)


def test_visual_tokens_are_spliced_at_the_placeholder(model: vlkit.VLM):
    proc = model.processor()
    conv = [Message("user", "What color is the <image> square?"), Message("assistant", "red")]
    feats = proc.train_features(conv, image())
    ids = torch.tensor(feats["input_ids"])
    slots = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    assert len(slots) == model.num_image_tokens == 16  # 32 px / patch 8 -> 4x4 grid
    assert torch.equal(slots, torch.arange(slots[0], slots[0] + 16))  # one contiguous run
    labels = torch.tensor(feats["labels"])
    assert (labels[slots] == IGNORE_INDEX).all()
    trained = model.llm.tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert trained.split()[0] == "red"  # only the assistant answer (+ end of turn) trains

    batch = proc.collate([feats])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    visual = model.encode_images(batch["pixel_values"])
    assert torch.allclose(embeds[0, slots], visual[0])
    text_pos = (ids != IMAGE_TOKEN_ID).nonzero().flatten()
    assert torch.allclose(embeds[0, text_pos], model.llm.embed(ids[text_pos].unsqueeze(0))[0])


def test_mixed_batch_with_text_only_sample(model: vlkit.VLM):
    proc = model.processor()
    with_img = proc.train_features([Message("user", "<image>\nWhat digit is this?"),
                                    Message("assistant", "3")], image("white"))
    text_only = proc.train_features([Message("user", "How many shapes are there?"),
                                     Message("assistant", "two")], None)
    batch = proc.collate([text_only, with_img])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.fusion.projector[0].weight.grad is not None
    with pytest.raises(ValueError, match="do not fill"):
        model.embed(batch["input_ids"], torch.cat([batch["pixel_values"]] * 2))


def test_frozen_parts_get_no_grad_and_no_optimizer_state(model: vlkit.VLM, tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["stages.0.trainable=[fusion,llm.model.model.layers.0]"])
    apply_trainable(model, recipe.stages[0])
    proc = model.processor()
    batch = proc.collate([proc.train_features([Message("user", "<image>\nWhat color is the circle?"),
                                               Message("assistant", "blue")], image("blue"))])
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        trains = name.startswith(("fusion.", "llm.model.model.layers.0."))
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
    opt, _ = build_optimizer(model, recipe.stages[0])
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters() if p.requires_grad}
    rows = {r.part: r for r in count_parts(model)}
    assert rows["encoders.clip"].trainable == 0 and rows["fusion"].trainable == rows["fusion"].total
    assert 0 < rows["llm"].trainable < rows["llm"].total


def test_trainable_encoder_gets_gradients(model: vlkit.VLM, tiny_recipe: Path):
    apply_trainable(model, vlkit.load_recipe(tiny_recipe, ["stages.0.trainable=[encoders]"]).stages[0])
    proc = model.processor()
    batch = proc.collate([proc.train_features([Message("user", "<image>\nWhat shape?"),
                                               Message("assistant", "circle")], image())])
    model(**batch).loss.backward()
    grads = [p.grad for p in model.encoders.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_unknown_trainable_path_is_a_recipe_error(model: vlkit.VLM, tiny_recipe: Path):
    stage = vlkit.load_recipe(tiny_recipe, ["stages.0.trainable=[fusoin]"]).stages[0]
    with pytest.raises(vlkit.errors.RecipeError, match="no part or module 'fusoin'.*Did you mean 'fusion'"):
        apply_trainable(model, stage)


def test_per_part_learning_rates(model: vlkit.VLM, tiny_recipe: Path):
    stage = vlkit.load_recipe(tiny_recipe, ["stages.1.lrs={fusion: 0.01}"]).stages[1]
    apply_trainable(model, stage)
    opt, _ = build_optimizer(model, stage)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == 0.01 for p in model.fusion.parameters())
    assert all(lr_of[id(p)] == stage.lr for p in model.llm.parameters())


@pytest.mark.parametrize("schedule, floor, expected", [
    # step:            0     1     2 (warmup ends)            6 (half of the decay)       10 (last)
    ("cosine", 0.1, {0: 0.1, 1: 0.55, 2: 1.0, 6: 0.1 + 0.9 * 0.5, 10: 0.1}),
    ("linear", 0.0, {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 10: 0.0}),
    ("constant", 0.0, {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0}),
])
def test_warmup_then_schedule_per_optimizer_step(model: vlkit.VLM, tiny_recipe: Path, schedule: str,
                                                 floor: float, expected: dict[int, float]):
    stage = vlkit.load_recipe(tiny_recipe, ["stages.1.max_steps=10", "stages.1.warmup=2", "stages.1.lr=0.01",
                                            f"stages.1.schedule={schedule}", f"stages.1.min_lr_ratio={floor}"]
                              ).stages[1]
    apply_trainable(model, stage)
    opt, scheduler = build_optimizer(model, stage)
    seen = {}
    for step in range(11):
        seen[step] = opt.param_groups[0]["lr"] / 0.01
        opt.step()
        scheduler.step()
    assert {k: seen[k] for k in expected} == pytest.approx(expected)
    after_warmup = [seen[k] for k in range(2, 11)]
    assert after_warmup == sorted(after_warmup, reverse=True)  # never rises again


def test_cpu_optimizer_is_fused_and_steps_like_the_default(model: vlkit.VLM, tiny_recipe: Path):
    stage = vlkit.load_recipe(tiny_recipe, ["stages.1.weight_decay=0.1"]).stages[1]
    apply_trainable(model, stage)
    proc = model.processor()
    batch = proc.collate([proc.train_features([Message("user", "<image>\nWhat shape?"),
                                               Message("assistant", "circle")], image())])
    model(**batch).loss.backward()
    opt, _ = build_optimizer(model, stage)
    assert all(g["fused"] for g in opt.param_groups)
    reference = torch.optim.AdamW([{**g, "params": [p.detach().clone() for p in g["params"]], "fused": None}
                                   for g in opt.param_groups])
    for ref, group in zip(reference.param_groups, opt.param_groups):
        for r, p in zip(ref["params"], group["params"]):
            r.grad = p.grad.clone()
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for _ in range(3):
        opt.step()
        reference.step()
    assert all(g["lr"] > 0 for g in opt.param_groups)
    assert not all(torch.equal(b, p) for b, p in zip(before, (p for g in opt.param_groups for p in g["params"])))
    for ref, group in zip(reference.param_groups, opt.param_groups):
        for r, p in zip(ref["params"], group["params"]):
            torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)


def test_generate_answers_questions(model: vlkit.VLM):
    questions = ["What color is it?", "How many shapes are there?"]
    answers = model.answer([image(), None], questions, max_new_tokens=3)
    # a batch answers as its samples one at a time (left padding, the image-less row, per-row stopping)
    assert answers == [model.answer([image()], questions[:1], max_new_tokens=3)[0],
                       model.answer([None], questions[1:], max_new_tokens=3)[0]]
    assert all(len(model.llm.tokenizer(a, add_special_tokens=False)["input_ids"]) <= 3 for a in answers)
