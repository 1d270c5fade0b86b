"""florence2 encoder and dbfusion: streams equal transformers' own Florence-2, gradients, recipe ablations.

A tiny random Florence-2 (transformers-native) is saved with ``save_pretrained`` (model + processor with an
offline tokenizer) and loaded back through the encoder's ``checkpoint:`` folder path, the path users take.
Nothing touches the network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, Florence2ForConditionalGeneration

import vlkit
from vlkit.encoders._florence2.tokenizer import build_processor, build_tokenizer
from vlkit.encoders.florence2 import Florence2Encoder, make_config
from vlkit.errors import CheckpointError, RecipeError
from vlkit.fusions.dbfusion import DBFusion
from vlkit.registry import ENCODERS, FUSIONS
from vlkit.training.checkpoint import read_weights
from vlkit.training.stages import apply_trainable

SIZE = 32  # DaViT strides 4, 2 -> 4x4 grid: 16 tokens (+1 pooled)
FREE_TEXT = "What color is the shape?"
TINY = {
    "vision_config": {"depths": [1, 1], "embed_dim": [16, 32], "num_heads": [2, 4], "num_groups": [2, 4],
                      "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                      "patch_prenorm": [False, True], "window_size": 4, "projection_dim": 24,
                      "drop_path_rate": 0.0},
    "text_config": {"vocab_size": 64, "d_model": 24, "encoder_layers": 2, "decoder_layers": 1,
                    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 48,
                    "decoder_ffn_dim": 48, "max_position_embeddings": 64},
}
TASK_TOKENS = {"detailed_caption": "<DETAILED_CAPTION>", "ocr": "<OCR>", "dense_region_caption": "<DENSE_REGION_CAPTION>"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Florence-2 + Florence2Processor written with save_pretrained, as a user's checkpoint folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("florence2-tiny")
    tokenizer = build_tokenizer([FREE_TEXT])
    config = make_config({**TINY, "image_token_id": tokenizer.image_token_id})
    Florence2ForConditionalGeneration(config).save_pretrained(path)
    processor = build_processor(tokenizer, SIZE, num_image_tokens=17, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    processor.save_pretrained(path)
    return path


def florence(**kwargs) -> Florence2Encoder:
    return ENCODERS.build({"name": "florence2", **kwargs}, "model.encoders[0]")


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ streams


def test_stream_names_shapes_and_preprocess(folder: Path):
    enc = florence(checkpoint=str(folder))
    assert list(enc.stream_dims) == ["depth", "detailed_caption", "ocr", "dense_region_caption"]
    assert set(enc.stream_dims.values()) == {24}
    assert enc.num_tokens == 16 and enc.grid == 4
    # preprocessing comes from the checkpoint's processor config
    assert enc.preprocess.size == SIZE
    assert enc.preprocess.mean == (0.5, 0.5, 0.5) and enc.preprocess.std == (0.25, 0.25, 0.25)
    out = enc(pixels())
    assert list(out) == list(enc.stream_dims)
    assert all(t.shape == (2, 16, 24) for t in out.values())
    # decoder and LM head are dropped
    names = [n for n, _ in enc.named_parameters()]
    assert not any("decoder" in n or "lm_head" in n for n in names)

    pooled = florence(checkpoint=f"local-dir:{folder}", keep_pooled=True, stages=[0, -1], prompts=["ocr"])
    assert pooled.num_tokens == 17
    assert pooled.stream_dims == {"depth": 24, "stage0": 16, "stage1": 32, "ocr": 24}
    assert {k: tuple(v.shape) for k, v in pooled.encode(torch.rand(2, 3, 50, 50)).items()} == {
        "depth": (2, 17, 24), "stage0": (2, 17, 16), "stage1": (2, 17, 32), "ocr": (2, 17, 24)}


def test_prompt_streams_equal_transformers_florence2(folder: Path):
    """Each breadth stream = transformers' Florence-2 encoder output at the image positions for the input the
    processor builds (<image> x 17, <s>, expanded prompt, </s>); depth = get_image_features."""
    enc = florence(checkpoint=str(folder), keep_pooled=True,
                   prompts=["detailed_caption", "ocr", "dense_region_caption", FREE_TEXT]).eval()
    dropped = florence(checkpoint=str(folder), prompts=["ocr", "<DETAILED_CAPTION>"]).eval()
    hf = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    x = pixels()
    with torch.no_grad():
        out, out_dropped = enc(x), dropped(x)
        depth = hf.model.get_image_features(x).pooler_output
        torch.testing.assert_close(out["depth"], depth, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_dropped["depth"], depth[:, 1:], atol=1e-5, rtol=0)
        for stream, text in [*TASK_TOKENS.items(), ("prompt3", FREE_TEXT)]:
            inputs = processor(text=[text] * 2, images=[Image.new("RGB", (SIZE, SIZE))] * 2, return_tensors="pt")
            assert (inputs["input_ids"][:, :17] == processor.tokenizer.image_token_id).all()
            reference = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=x).encoder_last_hidden_state[:, :17]
            torch.testing.assert_close(out[stream], reference, atol=1e-5, rtol=0, msg=stream)
            if stream in out_dropped:
                torch.testing.assert_close(out_dropped[stream], reference[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_dropped["detailed_caption"], out["detailed_caption"][:, 1:], atol=1e-5, rtol=0)


def test_prompts_are_expanded_by_the_processor(folder: Path):
    enc = florence(checkpoint=str(folder), prompts=["detailed_caption", {"colour": FREE_TEXT}])
    tokenizer = enc.processor.tokenizer
    rows = [tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist()) for ids, mask in zip(enc.prompt_ids, enc.prompt_mask)]
    assert rows[0] == ["<s>", "Describe", "in", "detail", "what", "is", "shown", "in", "the", "image", ".",
                               "</s>"]
    assert rows[1] == ["<s>", "What", "color", "is", "the", "shape", "?", "</s>"]
    assert list(enc.stream_dims) == ["depth", "detailed_caption", "colour"]
    assert tokenizer.decode(enc.prompt_ids[0][enc.prompt_mask[0].bool()], skip_special_tokens=True) == \
        "Describe in detail what is shown in the image."


def test_different_prompts_give_different_streams(folder: Path):
    out = florence(checkpoint=str(folder)).eval()(pixels())
    names = ["depth", "detailed_caption", "ocr", "dense_region_caption"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(out[a], out[b], atol=1e-3), (a, b)


def test_davit_runs_once_and_prompts_run_as_one_batched_call(folder: Path):
    enc = florence(checkpoint=str(folder)).eval()
    calls: dict[str, list[int]] = {"davit": [], "text": []}
    enc.vision_tower.convs[0].register_forward_hook(lambda m, i, o: calls["davit"].append(i[0].shape[0]))
    enc.text_encoder.register_forward_hook(lambda m, i, kw, o: calls["text"].append(kw["inputs_embeds"].shape[0]),
                                           with_kwargs=True)
    enc(pixels(batch=3))
    assert calls == {"davit": [3], "text": [3 * 3]}


def test_depth_only_encoder_drops_the_text_encoder(folder: Path):
    enc = florence(checkpoint=str(folder), prompts=[])
    assert enc.text_encoder is None and enc.embed_tokens is None
    assert list(enc(pixels())) == ["depth"]


def test_random_init_from_inline_config():
    enc = florence(config=TINY, image_size=SIZE, prompts=["ocr", "caption", "Where is the red circle?"])
    assert list(enc.stream_dims) == ["depth", "ocr", "caption", "prompt2"]
    unk = enc.processor.tokenizer.unk_token_id
    assert not (enc.prompt_ids == unk).any()
    assert enc.preprocess.size == SIZE and enc.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert enc(pixels())["prompt2"].shape == (2, 16, 24)


# -------------------------------------------------------------------------------------------- gradients

RECIPE = """\
model:
  encoders:
    - {{name: florence2, checkpoint: "{folder}", prompts: [detailed_caption, ocr, dense_region_caption]}}
  fusion: {{name: dbfusion, projector: mlp3x_gelu}}
  llm:
    name: hf_causal
    tokenizer: {demo}/tokenizer
    config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 4, num_workers: 0}}
  val: {{name: shards, urls: "{demo}/val-000000.tar", batch_size: 16, num_workers: 0}}
stages:
  - {{name: pretrain, trainable: [encoders, fusion, llm], lr: 1.0e-3, max_steps: 2}}
  - {{name: finetune, trainable: [fusion, llm], lr: 1.0e-3, max_steps: 3}}
eval: {{max_samples: 16, max_new_tokens: 2}}
trainer: {{accelerator: cpu, progress_bar: false, checkpoint_every: 1, log_every_n_steps: 1}}
"""


@pytest.fixture()
def recipe_path(folder: Path, demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "florence.yaml"
    path.write_text(RECIPE.format(folder=folder, demo=demo_dir))
    return path


def test_gradients_reach_florence2_when_trainable_and_none_when_frozen(recipe_path: Path):
    recipe = vlkit.load_recipe(recipe_path)
    model = vlkit.build_model(recipe)
    enc = model.encoders["florence2"]
    apply_trainable(model, recipe.stages[0])
    model.encode_images(torch.rand(2, 3, SIZE, SIZE)).square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, f"Florence-2 parameters without gradient: {missing}"
    for part in (enc.vision_tower, enc.projector, enc.text_encoder):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())

    model.zero_grad(set_to_none=True)
    apply_trainable(model, recipe.stages[1])
    out = model.encode_images(torch.rand(2, 3, SIZE, SIZE))
    out.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_fit_trains_florence2_in_stage1_only_and_resumes_across_stages(recipe_path: Path, folder: Path,
                                                                        tmp_path: Path, crash_at):
    """Both stages through vlkit.fit: stage 1 changes Florence-2's weights (it really trains), stage 2 leaves
    them alone; a crash in stage 2 resumes there without redoing stage 1."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        vlkit.fit(vlkit.load_recipe(recipe_path), run, callbacks=[crash_at("finetune", 2)])
    assert (run / "stage0-pretrain" / "done.json").exists() and not (run / "stage1-finetune" / "done.json").exists()
    summary = vlkit.fit(vlkit.load_recipe(recipe_path), run)
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "finetune"]
    assert json.loads((run / "stage1-finetune" / "done.json").read_text())["steps"] == 3
    assert "val/accuracy" in summary["val"]

    initial = Florence2ForConditionalGeneration.from_pretrained(folder).state_dict()
    after1 = read_weights(run / "stage0-pretrain" / "last")
    after2 = read_weights(run / "stage1-finetune" / "last")
    prefix = "model.encoders.florence2."
    for part, hf_prefix in [("vision_tower.convs.0.conv.weight", "model.vision_tower.convs.0.conv.weight"),
                            ("projector.image_projection.weight", "model.multi_modal_projector.image_projection.weight"),
                            ("text_encoder.layers.0.fc1.weight", "model.language_model.encoder.layers.0.fc1.weight")]:
        assert not torch.equal(after1[prefix + part], initial[hf_prefix]), f"{part} did not train in stage 1"
        assert torch.equal(after2[prefix + part], after1[prefix + part]), f"{part} changed in stage 2 (frozen)"
    assert not torch.equal(after2["model.fusion.projector.0.weight"], after1["model.fusion.projector.0.weight"])


# ------------------------------------------------------------------------------------------------ fusion

STREAMS = {"florence2.depth": (16, 24), "florence2.detailed_caption": (16, 24), "florence2.ocr": (16, 24),
           "florence2.dense_region_caption": (16, 24), "florence2.stage0": (16, 16), "dino.tokens": (17, 24)}


def dbfusion(section: dict, streams: dict[str, tuple[int, int]] | None = None, hidden: int = 40) -> DBFusion:
    streams = streams or {k: v for k, v in STREAMS.items() if k != "dino.tokens"}
    return FUSIONS.build({"name": "dbfusion", **section}, "model.fusion", streams=streams, hidden_size=hidden)


def tensors(streams: dict[str, tuple[int, int]], batch: int = 2) -> dict[str, torch.Tensor]:
    return {name: torch.randn(batch, n, c) for name, (n, c) in streams.items()}


def test_dbfusion_channel_concat_then_mlp3x_gelu():
    f = dbfusion({})
    assert f.args.projector == "mlp3x_gelu" and f.args.mode == "concat"
    assert f.in_dim == 4 * 24 + 16 and f.num_tokens == 16
    assert [type(m) for m in f.projector] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert f.projector[0].in_features == f.in_dim
    x = tensors(STREAMS)
    out = f(x)
    assert out.shape == (2, 16, 40)
    torch.testing.assert_close(out, f.projector(torch.cat([x[n] for n in f.stream_names], dim=-1)))


@pytest.mark.parametrize(("streams", "width"), [
    (["florence2.depth"], 24),                                                    # depth only
    (["florence2.detailed_caption", "florence2.ocr", "florence2.dense_region_caption"], 72),  # breadth only
    (["florence2.ocr", "florence2.depth"], 48),                                   # fewer prompts, any order
])
def test_dbfusion_stream_subsets(streams, width):
    f = dbfusion({"streams": streams, "projector": "linear"})
    assert isinstance(f.projector, nn.Linear) and f.in_dim == width
    assert f(tensors(STREAMS)).shape == (2, 16, 40)


def test_dbfusion_mean_mode():
    names = ["florence2.depth", "florence2.ocr", "florence2.detailed_caption"]
    f = dbfusion({"mode": "mean", "streams": names, "projector": "mlp2x_gelu"})
    assert f.in_dim == 24
    x = tensors(STREAMS)
    torch.testing.assert_close(f(x), f.projector((x[names[0]] + x[names[1]] + x[names[2]]) / 3))
    with pytest.raises(RecipeError, match=r"model.fusion.mode: .*same width"):
        dbfusion({"mode": "mean"})  # stage0 is 16 wide, the others 24


def test_dbfusion_validation():
    with pytest.raises(RecipeError, match=r"model.fusion.streams: .*same token count.*token_concat"):
        dbfusion({}, streams=STREAMS)  # dino has 17 tokens
    with pytest.raises(RecipeError, match=r"model.fusion.streams: .*unknown stream"):
        dbfusion({"streams": ["florence2.depht"]})
    with pytest.raises(RecipeError, match=r"model.fusion.projector: unknown projector 'mlp3x_relu'"):
        FUSIONS.parse_args({"name": "dbfusion", "projector": "mlp3x_relu"}, "model.fusion")
    with pytest.raises(RecipeError, match=r"model.fusion.mode: 'sum' is not one of"):
        FUSIONS.parse_args({"name": "dbfusion", "mode": "sum"}, "model.fusion")


def test_ablations_by_recipe_override_alone(recipe_path: Path):
    """DBFusion, its mean-pooling ablation and token integration from the same recipe, overrides only."""
    x = torch.rand(2, 3, SIZE, SIZE)
    shapes = {}
    for name, overrides in {"dbfusion": [], "mean": ["model.fusion.mode=mean"],
                            "tokens": ["model.fusion.name=token_concat"],
                            "depth": ["model.fusion.streams=[florence2.depth]"]}.items():
        model = vlkit.build_model(vlkit.load_recipe(recipe_path, overrides))
        shapes[name] = tuple(model.encode_images(x).shape)
        if name == "mean":
            assert model.fusion.in_dim == 24
        if name == "depth":
            assert model.fusion.in_dim == 24
        if name == "dbfusion":
            assert model.fusion.in_dim == 4 * 24
    assert shapes == {"dbfusion": (2, 16, 32), "mean": (2, 16, 32), "tokens": (2, 4 * 16, 32), "depth": (2, 16, 32)}


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("section", "match"), [
    ({"prompts": ["detailed_captoin"]}, r"unknown Florence-2 task 'detailed_captoin'.*Did you mean 'detailed_caption'"),
    ({"prompts": ["<OCRR>"]}, r"unknown Florence-2 task token <OCRR>"),
    ({"prompts": ["open_vocabulary_detection"]}, r"needs an input"),
    ({"prompts": ["<OCR> extra words"]}, r"takes no input"),
    ({"prompts": ["ocr", "<OCR>"]}, r"two prompts make the stream 'ocr'"),
    ({"prompts": [{"depth": "ocr"}]}, r"'depth' is reserved"),
    ({"prompts": [{"a b": "ocr"}]}, r"must be an identifier"),
    ({"stages": [1, 1]}, r"`stages`: lists a stage twice"),
    ({"image_size": 0}, r"`image_size`: must be positive"),
    ({"config": {**TINY, "vision_config": {**TINY["vision_config"], "embed_dims": [1]}}},
     r"unknown Florence2VisionConfig key 'embed_dims'.*Did you mean 'embed_dim'"),
    ({"config": {"vision_config": {}}}, r"needs `vision_config` and `text_config`"),
])
def test_bad_recipe_options(section, match):
    section = {"config": TINY, **section}
    with pytest.raises(RecipeError, match=rf"model.encoders\[0\]: florence2 encoder: .*{match}"):
        ENCODERS.parse_args({"name": "florence2", **section}, "model.encoders[0]")


def test_exactly_one_source():
    for section, got in [({}, "got none of them"), ({"config": TINY, "checkpoint": "x"}, "got `checkpoint`, `config`")]:
        with pytest.raises(RecipeError, match=rf"exactly one of `checkpoint`.*`config`.*{got}"):
            ENCODERS.parse_args({"name": "florence2", **section}, "model.encoders[0]")


def test_bad_options_found_when_building(folder: Path):
    with pytest.raises(RecipeError, match=r"`stages\[0\]`: stage 2 is out of range for a DaViT with 2 stages"):
        florence(checkpoint=str(folder), stages=[2])
    with pytest.raises(RecipeError, match=r"`image_size`: 4096 px gives a 512x512 grid, more than the 50"):
        florence(checkpoint=str(folder), image_size=4096)
    small_vocab = {**TINY, "text_config": {**TINY["text_config"], "vocab_size": 8}}
    with pytest.raises(RecipeError, match=r"tokenizer has \d+ tokens but text_config.vocab_size is 8"):
        florence(config=small_vocab, image_size=SIZE)


def test_checkpoint_errors(folder: Path, tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=re.escape(f"not found: {missing}")):
        florence(checkpoint=str(missing))
    with pytest.raises(CheckpointError, match=r"not found"):
        florence(checkpoint=f"local-dir:{missing}")
    # a model folder without its processor
    bare = tmp_path / "bare"
    Florence2ForConditionalGeneration(make_config(TINY)).save_pretrained(bare)
    with pytest.raises(CheckpointError, match=r"cannot load a Florence-2 processor.*processor.save_pretrained"):
        florence(checkpoint=str(bare))
    florence(checkpoint=str(bare), processor=str(folder))  # `processor:` points at another folder
    # the original remote-code layout (microsoft/Florence-2-*) is refused with a pointer to the native one
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.y"},
                                                    "vision_config": {"model_type": "davit"}}))
    with pytest.raises(CheckpointError, match=r"not a transformers-native Florence-2.*florence-community"):
        florence(checkpoint=str(remote))
