"""HoVLE: the holistic embedding module, the monolithic VLM and its three training stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message
from vlkit.encoders.holistic import HolisticEncoder
from vlkit.errors import RecipeError
from vlkit.objectives.base import build_objective
from vlkit.objectives.distill import distill_loss
from vlkit.registry import DATASETS
from vlkit.training.stages import apply_trainable, build_optimizer

HOVLE_RECIPE = """\
seed: 0
model:
  encoders:
    - {{name: holistic, width: 32, depth: 2, heads: 2, mlp_hidden: 64, patch_size: 8, image_size: 32}}
  llm:
    name: hf_causal
    tokenizer: {demo}/tokenizer
    chat_template: auto
    config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: 0}}
  val: {{name: shards, urls: "{demo}/val-000000.tar", batch_size: 32, num_workers: 0}}
stages:
  - name: distill
    objective: distill
    trainable: [encoders]
    lr: 3.0e-3
    max_steps: 4
    data: {{name: distill_images, urls: "{demo}/train-{{000000..000003}}.tar", val_urls: "{demo}/val-000000.tar",
           batch_size: 8, num_workers: 0, text_length: 6, val_samples: 16, shuffle_buffer: 16}}
    distill:
      teacher: {{name: clip, config: {{embed_dim: 16, vision_cfg: {{image_size: 32, patch_size: 16, width: 16,
                                                              layers: 1, heads: 2}}}}}}
      projector: mlp2x_gelu
  - {{name: align, trainable: [encoders], lr: 1.0e-3, max_steps: 3}}
  - {{name: tune, trainable: [encoders, llm], lr: 1.0e-3, max_steps: 3}}
eval: {{max_samples: 16, max_new_tokens: 3}}
trainer: {{accelerator: cpu, progress_bar: false, checkpoint_every: 2, log_every_n_steps: 1}}
"""


@pytest.fixture()
def hovle_recipe(demo_dir: Path, tmp_path: Path) -> Path:
    """A three-stage HoVLE recipe of tiny parts: 32 px images, patch 8 -> 4x4 -> 2x2 = 4 image tokens."""
    path = tmp_path / "hovle.yaml"
    path.write_text(HOVLE_RECIPE.format(demo=demo_dir))
    return path


def build(recipe: Path, *overrides: str) -> vlkit.VLM:
    torch.manual_seed(0)
    return vlkit.build_model(vlkit.load_recipe(recipe, list(overrides)))


def image(color: str = "red", size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), color)
    img.paste((0, 0, 255), (0, 0, size // 2, size // 2))
    return img


def batch_for(model: vlkit.VLM, question: str = "What color is the <image> square?", answer: str = "red",
              n: int = 1) -> dict:
    proc = model.processor()
    feats = [proc.train_features([Message("user", question), Message("assistant", answer)], image())] * n
    return proc.collate(feats)


def test_placeholders_are_replaced_by_the_module_image_features(hovle_recipe: Path):
    model = build(hovle_recipe)
    holistic = model.encoders["holistic"]
    assert isinstance(holistic, HolisticEncoder) and model.fusion is None
    batch = batch_for(model)
    ids = batch["input_ids"]
    slots = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    assert len(slots) == model.num_image_tokens == holistic.num_tokens == 4  # 32/8 = 4x4 patches -> 2x2
    assert torch.equal(slots, torch.arange(slots[0], slots[0] + 4))
    embeds = model.embed(ids, batch["pixel_values"], batch["attention_mask"])
    assert embeds.shape == (1, ids.shape[1], 32)
    # the image positions carry the image: another image changes them (and, by attention, later positions)
    other = model.processor().collate([model.processor().train_features(
        [Message("user", "What color is the <image> square?"), Message("assistant", "red")],
        Image.new("RGB", (32, 32), "green"))])
    changed = (model.embed(ids, other["pixel_values"]) - embeds).abs().amax(-1)[0]
    assert (changed[:slots[0]] == 0).all()  # positions before the image do not see it (causal)
    assert (changed[slots] > 1e-4).all()
    # the placeholder count must match the images
    with pytest.raises(ValueError, match="do not fill"):
        model.embed(ids, torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(ids, None)
    # the LLM reads the module's output as its whole input: its own embedding table is bypassed
    with torch.no_grad():
        model.llm.model.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(model.embed(ids, batch["pixel_values"]), embeds)


def test_text_table_starts_as_the_llm_table_and_output_at_its_scale(hovle_recipe: Path):
    model = build(hovle_recipe)
    llm_table = model.llm.model.get_input_embeddings().weight
    assert torch.equal(model.encoders["holistic"].text_embed.weight, llm_table)
    holistic = model.encoders["holistic"]
    assert holistic.text_embed.weight.data_ptr() != llm_table.data_ptr()  # a copy, trained separately
    rms = llm_table.pow(2).mean().sqrt()
    out = model.embed(batch_for(model)["input_ids"][:, -5:], None)
    assert torch.allclose(out.pow(2).mean().sqrt(), rms, rtol=0.2)
    fresh = build(hovle_recipe, "model.encoders.0.init_text_from_llm=false")
    assert not torch.equal(fresh.encoders["holistic"].text_embed.weight,
                           fresh.llm.model.get_input_embeddings().weight)


@pytest.mark.parametrize("hd", [False, True])
def test_module_is_causal(hovle_recipe: Path, hd: bool):
    model = build(hovle_recipe, f"model.encoders.0.hd={str(hd).lower()}").eval()
    batch = batch_for(model)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    out = model.embed(ids, pixels)
    for cut in (3, ids.shape[1] - 2):  # a change before and after the image
        changed = ids.clone()
        changed[0, cut] = (changed[0, cut] + 7) % 60 + 1
        new = model.embed(changed, pixels)
        assert torch.allclose(new[:, :cut], out[:, :cut], atol=1e-6)
        assert not torch.allclose(new[:, cut], out[:, cut])
    # padding: left- and right-padded copies of a sequence embed alike (positions count real tokens)
    proc = model.processor()
    feats = proc.prompt_features([Message("user", "<image>\nWhat color?")], image())
    longer = proc.prompt_features([Message("user", "<image>\nWhat color is the square on the left?")], image())
    left = proc.collate([feats, longer], padding_side="left")
    right = proc.collate([feats, longer], padding_side="right")
    n = len(feats["input_ids"])
    a = model.embed(left["input_ids"], left["pixel_values"], left["attention_mask"])[0, -n:]
    b = model.embed(right["input_ids"], right["pixel_values"], right["attention_mask"])[0, :n]
    assert torch.allclose(a, b, atol=1e-5)


def test_position_embedding_interpolates_to_other_sizes(hovle_recipe: Path):
    holistic = build(hovle_recipe).encoders["holistic"]
    assert holistic.position_embedding(4, 4) is holistic.pos_embed  # the learned grid: no interpolation
    with torch.no_grad():  # a position table linear in the row (channel 0) and the column (channel 1)
        holistic.pos_embed.zero_()
        grid = holistic.pos_embed.view(4, 4, 32)
        grid[..., 0] = torch.arange(4.0).view(4, 1)
        grid[..., 1] = torch.arange(4.0).view(1, 4)
    pos = holistic.position_embedding(8, 8).reshape(8, 8, 32)
    rows, cols = pos[..., 0], pos[..., 1]
    assert torch.allclose(rows, rows[:, :1].expand(8, 8)) and torch.allclose(cols, cols[:1].expand(8, 8))
    assert (rows[1:, 0] > rows[:-1, 0]).all() and torch.allclose(rows, cols.T)  # rows stay rows
    assert torch.allclose(rows[:, 0] + rows.flip(0)[:, 0], torch.full((8,), 3.0))  # symmetric about the centre
    assert 0 < float(rows[4, 0] - rows[3, 0]) < 0.75  # finer steps than the 4x4 grid's
    pixels = torch.rand(2, 3, 48, 48)
    assert holistic(pixels)["tokens"].shape == (2, 9, 32)  # 48 px: 6x6 patches -> 3x3 tokens
    assert holistic(torch.rand(2, 3, 32, 32))["tokens"].shape == (2, 4, 32)
    with pytest.raises(ValueError, match="multiple of"):
        holistic(torch.rand(1, 3, 40, 40))


def test_hd_mode_module_sees_4x_tokens_llm_gets_the_reduced_count(hovle_recipe: Path):
    base = build(hovle_recipe)
    hd = build(hovle_recipe, "model.encoders.0.hd=true")
    assert hd.num_image_tokens == base.num_image_tokens == 4
    seen: list[int] = []
    hd.encoders["holistic"].blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    batch = batch_for(hd, n=2)
    out = hd.embed(batch["input_ids"], batch["pixel_values"])
    length = batch["input_ids"].shape[1]
    assert seen == [length + 3 * 4]  # 16 patch tokens in the module instead of 4
    assert out.shape == (2, length, 32)  # the LLM gets 4 image tokens
    assert torch.isfinite(hd(**batch).loss)
    # HD: the image-only stream also has the reduced count
    assert hd.encoders["holistic"](torch.rand(3, 3, 32, 32))["tokens"].shape == (3, 4, 32)


def test_generation_embeds_new_tokens_with_the_module(hovle_recipe: Path):
    model = build(hovle_recipe).eval()
    proc = model.processor()
    feats = [proc.prompt_features([Message("user", q)], image())
             for q in ("<image>\nWhat color?", "<image>\nHow many shapes are there in the picture?")]
    batch = proc.collate(feats, padding_side="left")
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    new = model.strategy.generate(model, ids, mask, pixels, max_new_tokens=4)
    # reference without any cache: rerun module and LLM on the whole sequence for every token
    ref_ids, ref_mask = ids, mask
    for step in range(new.shape[1]):
        embeds = model.embed(ref_ids, pixels, ref_mask)
        positions = (ref_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.llm.model(inputs_embeds=embeds, attention_mask=ref_mask, position_ids=positions).logits
        token = logits[:, -1].argmax(-1)
        finished = torch.isin(new[:, :step], torch.tensor(model.llm.template.stop_token_ids(model.llm.tokenizer)))
        token = token.masked_fill(finished.any(1), model.llm.tokenizer.pad_token_id)
        assert torch.equal(token, new[:, step])
        ref_ids = torch.cat([ref_ids, token[:, None]], 1)
        ref_mask = torch.cat([ref_mask, torch.ones_like(ref_mask[:, :1])], 1)
    questions = ["What color is the square?", "How many shapes?"]
    answers = model.answer([image(), None], questions, max_new_tokens=3)
    # batched (left-padded, one row without image) answers equal the rows answered alone
    assert answers == [model.answer([image()], questions[:1], max_new_tokens=3)[0],
                       model.answer([None], questions[1:], max_new_tokens=3)[0]]


def test_distillation_loss_zero_at_target_and_decreasing(hovle_recipe: Path):
    target = torch.randn(5, 8)
    for kind in ("cosine", "mse"):
        assert distill_loss(target.clone(), target, kind).abs().max() < 1e-6
        assert (distill_loss(target + torch.randn(5, 8), target, kind) > 0).all()
    assert torch.allclose(distill_loss(2 * target, target, "cosine"), torch.zeros(5), atol=1e-6)

    recipe = vlkit.load_recipe(hovle_recipe)
    model = build(hovle_recipe)
    stage = recipe.stages[0]
    distiller = build_objective(stage, model, recipe.eval, seed=0, where="stages[0]")
    data = DATASETS.build(stage.data, "stages[0].data")
    batch = next(iter(data.train_loader(model.processor(), seed=0)))
    n_img = model.num_image_tokens
    assert batch["input_ids"].shape == (8, n_img + 6) and batch["pixel_values"].shape == (8, 3, 32, 32)
    assert (batch["input_ids"][:, :n_img] == IMAGE_TOKEN_ID).all()
    special = set(model.llm.tokenizer.all_special_ids)
    assert not special & set(batch["input_ids"][:, n_img:].flatten().tolist())

    apply_trainable(model, stage)
    optimizer, _ = build_optimizer(model, stage)
    losses = []
    for _ in range(15):
        out = distiller(model, batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in distiller.parameters())  # the teacher and projector stay frozen
    assert all(p.grad is None for p in model.llm.parameters())  # stage I: the LLM is only a lookup table
    assert all(p.grad is not None for p in model.encoders["holistic"].parameters())

    # the loss is exactly zero when the module's output equals the targets
    targets = torch.empty(8, batch["input_ids"].shape[1], 32)
    targets[:, :n_img] = distiller.image_targets(batch["pixel_values"], n_img)
    targets[:, n_img:] = model.llm.embed(batch["input_ids"][:, n_img:])
    model.embed = lambda *args, **kwargs: targets  # type: ignore[method-assign]
    out = distiller(model, batch)
    assert float(out.loss) < 1e-6 and out.cos_image / out.n_image > 0.9999 and out.cos_text / out.n_text > 0.9999


def test_frozen_parts_get_no_gradient_in_each_stage(hovle_recipe: Path):
    recipe = vlkit.load_recipe(hovle_recipe)
    model = build(hovle_recipe)
    llm_table = model.llm.model.get_input_embeddings().weight
    for stage in recipe.stages[1:]:
        apply_trainable(model, stage)
        assert not llm_table.requires_grad  # bypassed by the holistic module: always frozen
        model.zero_grad(set_to_none=True)
        model(**batch_for(model, n=2)).loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (stage.name, name)
            else:
                assert p.grad is None, (stage.name, name)
        trains_llm = any(p.requires_grad for p in model.llm.parameters())
        assert trains_llm == (stage.name == "tune")
        assert all(p.requires_grad for p in model.encoders["holistic"].parameters())


def test_recipe_errors(hovle_recipe: Path, tiny_recipe: Path):
    with pytest.raises(RecipeError, match="hidden size") as err:
        build(hovle_recipe, "model.encoders.0.width=64", "model.encoders.0.heads=4")
    assert err.value.key == "model.encoders[0].width"
    with pytest.raises(RecipeError, match="fusion: null"):
        vlkit.load_recipe(hovle_recipe, ["model.fusion={name: mlp}"])
    with pytest.raises(RecipeError, match="only encoder"):
        vlkit.load_recipe(hovle_recipe, ["model.encoders=[{name: holistic}, {name: holistic, key: h2}]"])
    with pytest.raises(RecipeError, match="model.fusion: missing required key"):
        vlkit.load_recipe(tiny_recipe, ["model.fusion=null"])
    with pytest.raises(RecipeError, match="has none"):
        vlkit.load_recipe(tiny_recipe, ["stages.0.objective=distill"])
    with pytest.raises(RecipeError, match="needs a `distill:` section"):
        vlkit.load_recipe(hovle_recipe, ["stages.0.distill=null"])
    with pytest.raises(RecipeError, match="stages\\[1\\].data: dataset 'shards' gives 'lm' batches"):
        vlkit.load_recipe(hovle_recipe, ["stages.1.objective=distill",
                                         "stages.1.distill={teacher: {name: clip, model: ViT-B-16}}"])
    with pytest.raises(RecipeError, match="needs conversations"):
        vlkit.load_recipe(hovle_recipe, ["stages.0.objective=lm", "stages.0.distill=null"])
    with pytest.raises(RecipeError, match="width.*heads"):
        vlkit.load_recipe(hovle_recipe, ["model.encoders.0.heads=3"])
    with pytest.raises(RecipeError, match="even multiple"):
        vlkit.load_recipe(hovle_recipe, ["model.encoders.0.image_size=40"])


def test_xformers_without_gpu_is_a_clear_error(hovle_recipe: Path):
    recipe = vlkit.load_recipe(hovle_recipe, ["model.encoders.0.attn_impl=xformers"])  # validates anywhere
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RecipeError, match="xformers"):
        vlkit.build_model(recipe)


def test_three_stage_fit_writes_distill_metrics_and_resumes(hovle_recipe: Path, tmp_path: Path, crash_at):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        vlkit.fit(vlkit.load_recipe(hovle_recipe), run, callbacks=[crash_at("distill", 3)])
    assert torch.load(run / "stage0-distill" / "last" / "state.pt", weights_only=True)["global_step"] == 2
    summary = vlkit.fit(vlkit.load_recipe(hovle_recipe), run)  # resumes stage I (teacher included)
    stages = [json.loads((run / f"stage{i}-{name}" / "done.json").read_text())
              for i, name in enumerate(("distill", "align", "tune"))]
    assert [s["steps"] for s in stages] == [4, 3, 3]
    distill = stages[0]["val"]
    assert {"val/loss", "val/cos_image", "val/cos_text"} <= set(distill)
    assert "val/accuracy" not in distill
    for key in ("val/accuracy", "val/baseline"):
        assert key in summary["val"] and key in stages[2]["val"]
    assert any(key.startswith("val/accuracy/") for key in summary["val"])  # per question type
    # the distillation teacher is saved with stage I (for resume) but is not part of the model
    state = vlkit.training.checkpoint.read_weights(run / "stage0-distill" / "last")
    assert any(k.startswith("objective.teacher.") for k in state)
    assert any(k.startswith("model.encoders.holistic.") for k in state)
    _, model = vlkit.load_run(run)
    assert model.strategy.name == "holistic" and not any("teacher" in k for k in model.state_dict())
    # the stage-I weights carry into stage II
    stage1 = vlkit.training.checkpoint.read_weights(run / "stage0-distill" / "last")
    fresh = build(hovle_recipe)
    assert not torch.equal(fresh.encoders["holistic"].pos_embed, stage1["model.encoders.holistic.pos_embed"])
