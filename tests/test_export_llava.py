"""``vlkit export --format llava`` (issue 13, item 2), checked against transformers itself: the export loads
with AutoModelForImageTextToText / AutoProcessor / pipeline and computes what vlkit computes."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, pipeline

import vlkit
from vlkit.cli import main
from vlkit.data.conversation import IMAGE_TOKEN_ID, Message
from vlkit.errors import CheckpointError
from vlkit.export.llava import export_llava
from vlkit.model import build_model

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    # LLaVA-1.5's layout: mlp2x_gelu, CLS dropped, stretched images, the tokenizer's own (ChatML) template
    "mlp2x_gelu": [],
    # a linear projector, CLS kept, the penultimate of two blocks, QuickGELU, LLaVA's pad-to-square, vicuna
    "linear": ["model.fusion.projector=linear", "model.encoders.0.keep_cls=true", "model.encoders.0.layer=-2",
               "model.encoders.0.config.vision_cfg.layers=2", "model.encoders.0.config.quick_gelu=true",
               "model.resize_policy=pad", "model.llm.chat_template=vicuna"],
}
QUESTION = "How many shapes are there?"


def demo_images(demo_dir: Path, n: int) -> list[tuple[Image.Image, str]]:
    """The first ``n`` (image, question) pairs of the demo's validation shard."""
    out = []
    with tarfile.open(demo_dir / "val-000000.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(k for k in members if k.endswith(".json"))[:n]:
            sample = json.loads(tar.extractfile(members[name]).read())
            png = tar.extractfile(members[name.replace(".json", ".png")]).read()
            question = sample["conversations"][0]["value"].replace("<image>\n", "")
            out.append((Image.open(io.BytesIO(png)).convert("RGB"), question))
    return out


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def hf_messages(question: str, img: Image.Image | None = None) -> list[dict]:
    image = {"type": "image", **({"image": img} if img is not None else {})}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


@pytest.fixture(params=list(VARIANTS))
def exported(request, tiny_recipe: Path, tmp_path: Path):
    """(vlkit model, export folder) for each variant, exported through the CLI from a saved model."""
    model = build_model(vlkit.load_recipe(tiny_recipe, VARIANTS[request.param]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # off the initial values (LayerNorms, biases), so every weight mapping matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    out = tmp_path / "llava"
    assert main(["export", str(tmp_path / "saved"), "--format", "llava", "--out", str(out)]) == 0
    return model, out


def test_transformers_computes_what_vlkit_computes(exported, demo_dir: Path):
    model, out = exported
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(hf, LlavaForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(out, backend="pil")  # PIL resampling, as vlkit's pipeline
    vocab = model.llm.model.get_input_embeddings().num_embeddings
    vproc = model.processor()
    for img in (noise((70, 45)), noise((30, 52), 1)):  # non-square: the resize policy matters
        inputs = processor(images=img, text=processor.apply_chat_template(hf_messages(QUESTION),
                                                                          add_generation_prompt=True),
                           return_tensors="pt")
        batch = vproc.collate([vproc.prompt_features([Message("user", QUESTION)], img)])
        ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id)
        assert torch.equal(inputs["input_ids"], ids)
        (encoder,) = model.encoders.values()
        torch.testing.assert_close(inputs["pixel_values"], encoder.prepare(batch["pixel_values"]),
                                   rtol=0, atol=1e-6)
        with torch.no_grad():
            ours = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
            theirs = hf(**inputs).logits
        assert theirs.shape[-1] >= vocab and ours.shape[-1] == vocab
        assert (theirs[..., :vocab] - ours).abs().max().item() <= 1e-4

    # the default (torchvision) image processor on images already at the model's size: same pixels, same logits
    default = AutoProcessor.from_pretrained(out)
    size = model.image_size
    img = noise((size, size), 2)
    inputs = default(images=img, text=default.apply_chat_template(hf_messages(QUESTION), add_generation_prompt=True),
                     return_tensors="pt")
    batch = vproc.collate([vproc.prompt_features([Message("user", QUESTION)], img)])
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        assert (hf(**inputs).logits[..., :vocab] - ours).abs().max().item() <= 1e-4

    # greedy answers on demo images: transformers' generate == vlkit's
    samples = demo_images(demo_dir, 4)
    expected = model.answer([s[0] for s in samples], [s[1] for s in samples], max_new_tokens=6)
    got = []
    for img, question in samples:
        inputs = processor(images=img, text=processor.apply_chat_template(hf_messages(question),
                                                                          add_generation_prompt=True),
                           return_tensors="pt")
        new = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        got.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    assert got == expected and any(expected)


def test_pipeline_answers_a_question(exported):
    model, out = exported
    size = model.image_size
    img = noise((size, size), 3)
    pipe = pipeline("image-text-to-text", model=str(out))
    result = pipe(text=hf_messages(QUESTION, img), max_new_tokens=5, return_full_text=False)
    assert result[0]["generated_text"].strip() == model.answer([img], [QUESTION], max_new_tokens=5)[0]


def test_export_writes_the_llava_files(exported):
    model, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    (encoder,) = model.encoders.values()
    assert config["vision_feature_select_strategy"] == ("full" if encoder.args.keep_cls else "default")
    assert config["vision_feature_layer"] == -1  # vlkit keeps exactly the blocks up to its feature layer
    assert config["vision_config"]["num_hidden_layers"] == len(encoder.visual.transformer.resblocks)
    assert config["image_seq_length"] == model.num_image_tokens
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == [config["image_token_index"]]
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


@pytest.fixture()
def demo_recipes(demo_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir)
    shutil.copytree(ROOT / "recipes" / "demo", tmp_path / "recipes" / "demo")
    return tmp_path / "recipes" / "demo"


@pytest.mark.parametrize("name, reason", [
    ("florence_dbfusion.yaml", "dbfusion has 4 input streams"),
    ("sphinx.yaml", "multi-scale views"),
    ("hovle.yaml", "embeds the whole sequence"),
])
def test_other_architectures_are_refused_with_the_reason(name: str, reason: str, demo_recipes: Path,
                                                         tmp_path: Path):
    model = build_model(vlkit.load_recipe(demo_recipes / name)).eval()
    with pytest.raises(CheckpointError, match=f"--format llava: .*{reason}.*use the vlkit format"):
        export_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_encoders_are_refused(tiny_recipe: Path, tmp_path: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["model.encoders.0.keep_cls=true"])
    second = {**recipe.model.encoders[0], "key": "clip2"}
    recipe.model.encoders.append(second)
    recipe.model.fusion = {"name": "mlp", "projector": "mlp2x_gelu", "streams": None}
    model = build_model(recipe)
    with pytest.raises(CheckpointError, match="2 encoders"):
        export_llava(model, tmp_path / "out")


def test_a_llava_folder_loads_back_into_vlkit(exported):
    """Start from the exported checkpoint: vlkit.from_pretrained(LLaVA folder) computes the original's logits."""
    model, out = exported
    loaded = vlkit.from_pretrained(out)
    vproc, lproc = model.processor(), loaded.processor()
    img = noise((50, 33), 4)
    batches = [p.collate([p.prompt_features([Message("user", QUESTION)], img)]) for p in (vproc, lproc)]
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    torch.testing.assert_close(batches[1]["pixel_values"], batches[0]["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        ours = model(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["pixel_values"]).logits
        back = loaded(batches[1]["input_ids"], batches[1]["attention_mask"], batches[1]["pixel_values"]).logits
    vocab = ours.shape[-1]
    assert back.shape[-1] == vocab + 1  # the <image> row
    assert (back[..., :vocab] - ours).abs().max().item() <= 1e-5
