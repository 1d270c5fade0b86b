"""Saved models (issue 13, item 1): ``VLM.save_pretrained`` / ``vlkit.from_pretrained`` for every architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.data.conversation import Message
from vlkit.errors import CheckpointError
from vlkit.model import build_model

ROOT = Path(__file__).resolve().parents[1]
DEMOS = sorted(p.name for p in (ROOT / "recipes" / "demo").glob("*.yaml"))


@pytest.fixture()
def demo_recipes(demo_dir: Path, tmp_path: Path) -> Path:
    """recipes/demo/ copied next to a data/demo link to the test data (the recipes name ../../data/demo)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir)
    shutil.copytree(ROOT / "recipes" / "demo", tmp_path / "recipes" / "demo")
    return tmp_path / "recipes" / "demo"


def perturbed(model: torch.nn.Module, seed: int = 123) -> torch.nn.Module:
    """Move every weight off its initial value, so a reload that re-initialises instead of loading fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def image(seed: int = 0, size: tuple[int, int] = (70, 50)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def logits(model, question: str = "What colour is the circle?", img: Image.Image | None = None) -> torch.Tensor:
    processor = model.processor()
    batch = processor.collate([processor.prompt_features([Message("user", question)], img or image())])
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


@pytest.mark.parametrize("name", DEMOS)
def test_every_demo_architecture_round_trips(name: str, demo_recipes: Path, tmp_path: Path):
    recipe = vlkit.load_recipe(demo_recipes / name)
    model = perturbed(build_model(recipe))
    out = tmp_path / "saved"
    assert model.save_pretrained(out) == out
    (tmp_path / "data" / "demo").unlink()  # the recipe's tokenizer folder is gone: the save carries its own
    torch.manual_seed(999)  # a reload that re-initialised would differ
    loaded = vlkit.from_pretrained(out)
    assert not loaded.training
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.answer([image(1)], ["How many shapes?"], max_new_tokens=4) == \
        model.answer([image(1)], ["How many shapes?"], max_new_tokens=4)

    config = json.loads((out / "config.json").read_text())
    assert config["vlkit_format_version"] == 1 and config["vlkit_version"] == vlkit.__version__
    assert config["image_token"] == "<image>" and config["chat_template"] == model.llm.template.name
    assert config["model"]["llm"]["tokenizer"] == "${recipe_dir}/tokenizer"
    assert [e["name"] for e in config["model"]["encoders"]] == [e["name"] for e in recipe.model.encoders]
    processor = config["processor"]
    assert processor["image_size"] == model.image_size and processor["num_image_tokens"] == model.num_image_tokens
    assert processor["views"] == (None if recipe.model.views is None else
                                  {"grid": recipe.model.views.grid, "size": recipe.model.views.size,
                                   "pad": recipe.model.views.pad})
    for key, enc in model.encoders.items():
        if hasattr(enc, "preprocess"):
            assert processor["encoders"][key]["mean"] == pytest.approx(list(enc.preprocess.mean))
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert "im_start" in (out / "tokenizer" / "chat_template.jinja").read_text()
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".jinja", ".txt", ".model"}, suffixes  # no pickles


def test_sharded_save_and_refusals(tiny_recipe: Path, tmp_path: Path):
    model = perturbed(build_model(vlkit.load_recipe(tiny_recipe)))
    out = model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    torch.testing.assert_close(logits(vlkit.from_pretrained(out)), logits(model), rtol=0, atol=0)

    model.save_pretrained(out)  # an earlier save is replaced (single file now)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a vlkit saved model"):
        model.save_pretrained(busy)
    assert (busy / "notes.txt").read_text() == "mine"

    config = json.loads((out / "config.json").read_text())
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    (newer / "config.json").write_text(json.dumps({**config, "vlkit_format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99.*reads versions up to 1.*Upgrade vlkit"):
        vlkit.from_pretrained(newer)

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        vlkit.from_pretrained(truncated)

    other = tmp_path / "other"
    shutil.copytree(out, other)
    config["model"]["llm"]["config"]["num_hidden_layers"] = 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match the model.*missing"):
        vlkit.from_pretrained(other)
    with pytest.raises(CheckpointError, match="no such folder"):
        vlkit.from_pretrained(tmp_path / "nowhere")


@pytest.mark.slow
def test_export_cli_from_a_run_folder_and_a_stage_checkpoint(tiny_recipe: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert main(["fit", str(tiny_recipe), "trainer.progress_bar=false", "--run-dir", str(run)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    from_run = vlkit.from_pretrained(run)
    reference = logits(from_run)
    torch.testing.assert_close(logits(vlkit.from_pretrained(out)), reference, rtol=0, atol=0)
    last_stage = sorted(run.glob("stage*-*/last"))[-1]
    torch.testing.assert_close(logits(vlkit.from_pretrained(last_stage)), reference, rtol=0, atol=0)
    first_stage = sorted(run.glob("stage*-*/last"))[0]
    assert not torch.equal(logits(vlkit.from_pretrained(first_stage)), reference)  # the earlier stage's weights


@pytest.mark.slow
def test_a_lora_run_loads_merged(tiny_recipe: Path, tmp_path: Path):
    """from_pretrained on a run / stage checkpoint whose stage holds LoRA adapters: the adapters merged, the
    trained module's logits; exporting it writes a plain saved model."""
    from lightning.pytorch.callbacks import Callback

    class Keep(Callback):
        def on_train_end(self, trainer, pl_module):
            model = pl_module.model.eval()
            self.logits = logits(model)
            self.adapters = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
            model.train()

    keep = Keep()
    recipe = vlkit.load_recipe(tiny_recipe, [
        "stages=[{name: adapt, trainable: [fusion], lr: 1.0e-2, max_steps: 2, warmup: 0, "
        "lora: {parts: [llm], r: 4, alpha: 8, dropout: 0.0}}]", "data.val=null"])
    run = tmp_path / "run"
    vlkit.fit(recipe, run, callbacks=[keep])
    assert keep.adapters > 0
    for source in (run, run / "stage0-adapt" / "last"):
        merged = vlkit.from_pretrained(source)
        assert not merged.training and not [n for n, _ in merged.named_parameters() if "lora_" in n]
        torch.testing.assert_close(logits(merged), keep.logits, rtol=0, atol=1e-5)
    assert main(["export", str(run), "--out", str(tmp_path / "saved")]) == 0
    torch.testing.assert_close(logits(vlkit.from_pretrained(tmp_path / "saved")), keep.logits, rtol=0, atol=1e-5)


def test_predict_takes_the_generation_flags(tiny_recipe: Path, tmp_path: Path, capsys):
    """`vlkit predict` on a saved model with the flags chat and serve take (vlkit.generation)."""
    from vlkit.generation import GenerationOptions, answer

    model = perturbed(build_model(vlkit.load_recipe(tiny_recipe)), seed=3)
    saved = model.save_pretrained(tmp_path / "saved")
    image(5).save(tmp_path / "x.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": "x.png", "question": "What colour is the circle?"}) + "\n"
                         + json.dumps({"question": "How many shapes are there?"}) + "\n")
    imgs = [Image.open(tmp_path / "x.png").convert("RGB"), None]
    texts = ["What colour is the circle?", "How many shapes are there?"]

    def predict(*flags: str) -> list[str]:
        out = tmp_path / "a.jsonl"
        assert main(["predict", str(saved), "--input", str(questions), "--out", str(out), *flags]) == 0
        return [json.loads(line)["answer"] for line in out.read_text().splitlines()]

    greedy = predict("--max-new-tokens", "4")
    assert greedy == answer(model, imgs, texts, GenerationOptions(max_new_tokens=4))
    sampled = predict("--max-new-tokens", "5", "--temperature", "1.5", "--top-p", "0.9", "--seed", "11",
                      "--batch-size", "1")
    options = GenerationOptions(max_new_tokens=5, temperature=1.5, top_p=0.9, seed=11)
    assert sampled == [answer(model, [i], [t], options)[0] for i, t in zip(imgs, texts)]
    full = predict("--max-new-tokens", "6")
    words = full[0].split()
    assert len(words) > 1
    stop = words[1]  # a stop string cuts the answer before it
    assert predict("--max-new-tokens", "6", "--stop", stop)[0] == full[0][: full[0].find(stop)].strip()
    capsys.readouterr()
    assert main(["predict", str(saved), "--question", "Hi?", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
