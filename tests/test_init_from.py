"""``model: {init: ...}`` (issue 13, item 3): a recipe starts from a LLaVA folder / hub id or a vlkit saved model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.data.conversation import Message
from vlkit.errors import CheckpointError, RecipeError
from vlkit.io.init import InitUnavailable
from vlkit.model import build_model

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How many shapes are there?"


def image(seed: int = 0, size: tuple[int, int] = (60, 41)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def step0(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, logits) of a prompt with an image, through the model's own processor."""
    processor = model.processor()
    batch = processor.collate([processor.prompt_features([Message("user", QUESTION)], image())])
    with torch.no_grad():
        out = model.eval()(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    return batch["input_ids"], out


def init_recipe(tmp_path: Path, demo_dir: Path, model: dict, stages: str | None = None, name: str = "init.yaml"
                ) -> Path:
    stages = stages or "  - {name: tune, trainable: [fusion, llm], lr: 1.0e-3, max_steps: 1, warmup: 0}\n"
    path = tmp_path / name
    path.write_text(
        f"seed: 1\nmodel: {json.dumps(model)}\n"
        f"data:\n  train: {{name: shards, urls: '{demo_dir}/train-{{000000..000003}}.tar', batch_size: 4, "
        "num_workers: 0}\n"
        f"stages:\n{stages}"
        "trainer: {accelerator: cpu, progress_bar: false, log_every_n_steps: 1}\n")
    return path


@pytest.fixture()
def trained_export(tiny_recipe: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(run folder, its ``--format llava`` export) of the tiny demo model trained two steps."""
    recipe = vlkit.load_recipe(tiny_recipe, [
        "stages=[{name: tune, trainable: [fusion, llm], lr: 1.0e-2, max_steps: 2, warmup: 0}]", "data.val=null"])
    run = tmp_path / "run"
    vlkit.fit(recipe, run)
    out = tmp_path / "llava"
    assert main(["export", str(run), "--format", "llava", "--out", str(out)]) == 0
    return run, out


@pytest.mark.slow
def test_a_new_run_from_a_llava_export_starts_at_the_original_and_trains(trained_export, demo_dir, tmp_path):
    run, export = trained_export
    original = vlkit.from_pretrained(run)
    ids, expected = step0(original)
    path = init_recipe(tmp_path, demo_dir, {"init": str(export)})
    recipe = vlkit.load_recipe(path)
    assert recipe.model.init == str(export)
    (enc,), llm = recipe.model.encoders, recipe.model.llm
    assert enc["name"] == "clip" and enc["config"]["vision_cfg"]["width"] == 32 and recipe.model.fusion["name"] == "mlp"
    assert llm["config"]["model_type"] == "llama" and llm["tokenizer"] == str(export)

    torch.manual_seed(321)  # a build that kept its random init would differ
    model = build_model(recipe)  # step 0 of the new run: the export's weights
    got_ids, logits = step0(model)
    assert torch.equal(got_ids, ids)
    vocab = expected.shape[-1]
    assert logits.shape[-1] == vocab + 1  # the export's <image> row
    assert (logits[..., :vocab] - expected).abs().max().item() <= 1e-4

    new_run = tmp_path / "new"
    summary = vlkit.fit(recipe, new_run)
    assert summary["stages"][0]["steps"] == 1
    trained = vlkit.from_pretrained(new_run)  # the run folder's recipe names the init; its checkpoint wins
    assert not torch.allclose(step0(trained)[1][..., :vocab], expected, atol=1e-4)


@pytest.mark.slow
def test_init_from_a_saved_model_with_overrides(tiny_recipe: Path, demo_dir: Path, tmp_path: Path, capsys):
    model = build_model(vlkit.load_recipe(tiny_recipe))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    saved = model.save_pretrained(tmp_path / "saved")
    _, expected = step0(model)

    same = build_model(vlkit.load_recipe(init_recipe(tmp_path, demo_dir, {"init": str(saved)})))
    torch.testing.assert_close(step0(same)[1], expected, rtol=0, atol=0)

    # overrides: the LLM stored in bfloat16 (frozen: only the projector trains), the CLS token kept
    stages = "  - {name: align, trainable: [fusion], lr: 1.0e-3, max_steps: 1, warmup: 0}\n"
    path = init_recipe(tmp_path, demo_dir, {"init": str(saved), "llm": {"dtype": "bfloat16"}}, stages, "o.yaml")
    recipe = vlkit.load_recipe(path, ["model.encoders.0.keep_cls=true"])
    assert recipe.model.llm["dtype"] == "bfloat16" and recipe.model.encoders[0]["keep_cls"] is True
    assert recipe.model.llm["config"] == json.loads((saved / "config.json").read_text())["model"]["llm"]["config"]
    bf16 = build_model(vlkit.load_recipe(path))
    assert {p.dtype for p in bf16.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.fusion.parameters()} == {torch.float32}
    for name, p in bf16.llm.state_dict().items():  # the saved weights, rounded to bfloat16
        assert torch.equal(p, model.llm.state_dict()[name].to(torch.bfloat16)), name
    vlkit.fit(recipe, tmp_path / "run")  # trains with the override
    assert json.loads((tmp_path / "run" / "stage0-align" / "done.json").read_text())["steps"] == 1

    capsys.readouterr()
    assert main(["config", str(path)]) == 0  # the resolved recipe shows the init's sections
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]
    assert resolved["init"] == str(saved) and resolved["encoders"][0]["name"] == "clip"
    assert resolved["llm"]["dtype"] == "bfloat16" and resolved["fusion"]["projector"] == "mlp2x_gelu"


def test_bad_inits_are_refused_with_the_fix(tiny_recipe: Path, demo_dir: Path, tmp_path: Path, capsys):
    def error(model: dict, overrides=()) -> str:
        with pytest.raises(RecipeError) as info:
            vlkit.load_recipe(init_recipe(tmp_path, demo_dir, model, name="bad.yaml"), overrides)
        return str(info.value)

    missing = tmp_path / "nowhere"
    message = error({"init": str(missing)})
    assert f"{tmp_path / 'bad.yaml'}: model.init: folder not found: {missing}" in message
    assert main(["fit", str(tmp_path / "bad.yaml")]) == 2 and "folder not found" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "neither a vlkit saved model nor a Hugging Face LLaVA model" in error({"init": str(other)})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("seed: 0\n")
    assert "export it first" in error({"init": str(tmp_path / "run")})

    model = build_model(vlkit.load_recipe(tiny_recipe))
    saved = model.save_pretrained(tmp_path / "saved")
    assert "'linear' would replace the init's 'mlp'" in error({"init": str(saved), "fusion": {"name": "linear"}})
    assert "the init has 1 encoder(s)" in error({"init": str(saved), "encoders": [{}, {}]})
    shape = vlkit.load_recipe(init_recipe(tmp_path, demo_dir, {"init": str(saved)}, name="shape.yaml"),
                              ["model.llm.config.intermediate_size=48"])
    with pytest.raises(CheckpointError, match=r"model.init .*saved: .*does an override change a part"):
        build_model(shape)

    with pytest.raises(InitUnavailable) as info:  # a hub id, offline and not cached
        vlkit.load_recipe(init_recipe(tmp_path, demo_dir, {"init": "no-org/not-cached-llava"}, name="hub.yaml"))
    text = str(info.value)
    assert "'no-org/not-cached-llava'" in text and "HF_HUB_OFFLINE" in text and "hf download" in text


def test_a_hub_id_resolves_through_the_hugging_face_cache(trained_export, demo_dir, tmp_path, monkeypatch):
    """``init: org/name`` goes through huggingface_hub (here an offline cache holding the export)."""
    from huggingface_hub import constants

    run, export = trained_export
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llava"
    shutil.copytree(export, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    recipe = vlkit.load_recipe(init_recipe(tmp_path, demo_dir, {"init": "tiny-org/tiny-llava"}))
    assert recipe.model.llm["tokenizer"] == "tiny-org/tiny-llava"  # resolved by transformers, as the id
    _, expected = step0(vlkit.from_pretrained(run))
    logits = step0(build_model(recipe))[1]
    assert (logits[..., : expected.shape[-1]] - expected).abs().max().item() <= 1e-4


# llava-hf/llava-1.5-7b-hf's config.json is written as differences from the defaults, like this one
LLAVA_1_5_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def test_the_llava_1_5_finetune_recipe(tmp_path: Path, monkeypatch, capsys):
    recipe_file = ROOT / "recipes" / "llava_1_5_finetune.yaml"
    assert main(["config", str(recipe_file)]) == 0  # offline, not cached: checks the rest and says so
    out = capsys.readouterr()
    printed = yaml.safe_load(out.out)
    assert printed["model"]["init"] == "llava-hf/llava-1.5-7b-hf"
    assert printed["stages"][0]["lr"] == 2.0e-5 and printed["stages"][0]["trainable"] == ["fusion", "llm"]
    assert printed["trainer"]["precision"] == "bf16-mixed"
    assert "NOT checked" in out.err and "llava-hf/llava-1.5-7b-hf" in out.err
    assert main(["fit", str(recipe_file)]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err

    # with its config files in the cache, the whole recipe validates, the architecture read from them
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAVA_1_5_7B_CONFIG))
    (snapshot / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "size": {"shortest_edge": 336}}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = vlkit.load_recipe(recipe_file)
    (enc,) = recipe.model.encoders
    assert enc["layer"] == -2 and enc["keep_cls"] is False and enc["config"]["quick_gelu"] is True
    assert enc["config"]["vision_cfg"] == {"image_size": 336, "patch_size": 14, "width": 1024, "layers": 24,
                                           "head_width": 64, "mlp_ratio": 4.0}
    assert enc["config"]["preprocess_cfg"] == {"mean": CLIP_MEAN, "std": CLIP_STD}
    assert recipe.model.fusion["projector"] == "mlp2x_gelu" and recipe.model.resize_policy == "pad"
    llm = recipe.model.llm
    assert llm["tokenizer"] == "llava-hf/llava-1.5-7b-hf" and llm["chat_template"] == "vicuna"
    assert llm["config"]["vocab_size"] == 32064 and llm["config"]["rms_norm_eps"] == 1e-5
    assert llm["gradient_checkpointing"] is True and llm["dtype"] == "float32"
