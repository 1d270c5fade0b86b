"""Multimodal sequence packing (``data.train.packing``): a packed batch trains exactly what the padded batch of
the same samples trains (loss and gradients), samples in a row never see each other, image blocks stay whole
and are spliced in order, position ids restart, recipes validate it, and ``vlkit fit`` trains with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, Message
from vlkit.data.packing import collate_packed, first_fit_decreasing, sample_spans
from vlkit.errors import DataError, RecipeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model(tiny_recipe: Path) -> vlkit.VLM:
    torch.manual_seed(0)
    m = vlkit.build_model(vlkit.load_recipe(tiny_recipe))
    return m.eval()  # no dropout: the padded and packed forward passes compute the same function


def conversations() -> list[tuple[list[Message], Image.Image | None]]:
    """Samples of different lengths, with and without an image, some multi-turn."""
    img = lambda c: Image.new("RGB", (40, 24), c)  # noqa: E731
    return [
        ([Message("user", "<image>\nWhat color is the square?"), Message("assistant", "red")], img("red")),
        ([Message("user", "How many shapes are there in a picture with three circles?"),
          Message("assistant", "three")], None),
        ([Message("user", "<image>\nDescribe the picture in detail."),
          Message("assistant", "A blue square at the top left, a green circle below it and a small digit seven "
                               "written in white next to them."),
          Message("user", "And the digit?"), Message("assistant", "seven")], img("blue")),
        ([Message("user", "<image>\nIs there a circle?"), Message("assistant", "yes")], img("green")),
        ([Message("user", "Say hi."), Message("assistant", "hi")], None),
    ]


def features(model: vlkit.VLM, train_on: str = "assistant") -> list[dict]:
    proc = dataclasses.replace(model.processor(), train_on=train_on)
    return [proc.train_features(msgs, image) for msgs, image in conversations()]


def grads(model: vlkit.VLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_packed_loss_and_gradients_equal_the_padded_batch(model: vlkit.VLM, train_on: str):
    """Token-weighted: both losses are the mean over every trained token of the batch. With ``train_on: all``
    every sample's first token has a label, so the equality needs the -100 at each sample boundary."""
    feats = features(model, train_on)
    proc = model.processor()
    padded = proc.collate(feats)
    packed = collate_packed(proc, feats, max_tokens=2 * max(len(f["input_ids"]) for f in feats))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed: fewer rows
    assert (padded["labels"][:, 1:] != IGNORE_INDEX).sum() == (packed["labels"] != IGNORE_INDEX).sum()
    loss_padded, grads_padded = grads(model, padded)
    loss_packed, grads_packed = grads(model, packed)
    assert abs(float(loss_padded) - float(loss_packed)) <= 1e-5
    assert set(grads_padded) == set(grads_packed) and len(grads_padded) > 10  # encoder, fusion and LLM
    assert any(n.startswith("encoders.") for n in grads_padded)
    for name, g in grads_padded.items():
        assert (g - grads_packed[name]).abs().max() <= 1e-5, name


def test_samples_in_a_row_do_not_see_each_other(model: vlkit.VLM):
    """Changing one sample's text and image leaves the logits of the other samples in its row unchanged, and
    each sample's logits equal those it gets alone."""
    feats = features(model)
    proc = model.processor()
    capacity = sum(len(f["input_ids"]) for f in feats)  # one row holds them all
    changed = [dict(f) for f in feats]
    victim = 2  # the long one with an image, in the middle of the row
    ids = list(changed[victim]["input_ids"])
    text = [i for i, t in enumerate(ids) if t != IMAGE_TOKEN_ID][3:]
    for i in text:
        ids[i] = (ids[i] + 7) % len(model.llm.tokenizer)
    changed[victim]["input_ids"] = ids
    changed[victim]["pixel_values"] = proc.pixels(Image.new("RGB", (40, 24), "yellow"))
    with torch.no_grad():
        batches = [collate_packed(proc, f, capacity) for f in (feats, changed)]
        assert all(b["input_ids"].shape[0] == 1 for b in batches)
        logits = [model(**b).logits[0] for b in batches]
    spans, start = [], 0
    for n in (len(f["input_ids"]) for f in feats):
        spans.append(slice(start, start + n))
        start += n
    for k, span in enumerate(spans):
        same = torch.allclose(logits[0][span], logits[1][span], atol=1e-6, rtol=0)
        assert same == (k != victim), k
        with torch.no_grad():
            alone = model(**proc.collate([feats[k]])).logits[0]
        assert torch.allclose(logits[0][span], alone, atol=1e-5, rtol=0), k


def test_rows_keep_samples_and_image_blocks_whole_and_positions_restart(model: vlkit.VLM):
    feats = [{**f, "__key__": f"s{i}"} for i, f in enumerate(features(model))]
    proc = model.processor()
    capacity = max(len(f["input_ids"]) for f in feats) + 20
    batch = collate_packed(proc, feats, capacity)
    rows = batch["packed_rows"]
    assert len(rows) > 1 and sorted(k for row in rows for k in row) == list(range(len(feats)))
    images = []
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            src = feats[int(batch["__key__"][k][1:])]  # the per-sample lists are in row order
            n = len(src["input_ids"])
            assert batch["input_ids"][r, start:start + n].tolist() == src["input_ids"]  # whole, image block too
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            assert batch["labels"][r, start] == IGNORE_INDEX
            assert batch["labels"][r, start + 1:start + n].tolist() == src["labels"][1:]
            assert batch["attention_mask"][r, start:start + n].all()
            if src["pixel_values"] is not None:
                images.append(src["pixel_values"])
            start += n
        assert start <= capacity
        pad = batch["input_ids"].shape[1] - start
        assert batch["position_ids"][r, start:].tolist() == list(range(pad))  # the padding: its own block
        assert not batch["attention_mask"][r, start:].any()
    assert torch.equal(batch["pixel_values"], torch.stack(images))  # stacked in row order
    spans = sample_spans(batch)  # what `vlkit data inspect` shows of a packed batch
    assert [batch["input_ids"][r][at].tolist() for r, at in spans] == [
        feats[int(key[1:])]["input_ids"] for key in batch["__key__"]]
    padded = proc.collate(feats)
    assert [padded["input_ids"][r][at].tolist() for r, at in sample_spans(padded)] == [
        f["input_ids"] for f in feats]
    # the splice strategy fills the image blocks in that order: each block holds its own image's tokens
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        visual = model.encode_images(batch["pixel_values"])
    slots = embeds[batch["input_ids"] == IMAGE_TOKEN_ID].reshape(len(images), model.num_image_tokens, -1)
    assert torch.allclose(slots, visual)


def test_first_fit_decreasing():
    lengths = [5, 9, 2, 7, 3, 4]
    assert first_fit_decreasing(lengths, capacity=10) == [[1], [3, 4], [0, 5], [2]]
    assert first_fit_decreasing(lengths, capacity=30) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(DataError, match="max_tokens"):
        first_fit_decreasing([11], capacity=10)


def test_cached_streams_pack_like_pixels(model: vlkit.VLM):
    """Feature-cache samples (``image_streams`` per image) pack and give the loss of their pixels."""
    feats = features(model)
    proc = model.processor()
    cached = []
    for f in feats:
        f = dict(f)
        if f["pixel_values"] is not None:
            with torch.no_grad():
                streams = model.image_streams(f["pixel_values"][None])
            f["image_streams"] = {k: v for k, v in streams.items()}  # (views=1, N, C) per image
            f["pixel_values"] = None
        cached.append(f)
    with torch.no_grad():
        from_pixels = model(**collate_packed(proc, feats, 400)).loss
        batch = collate_packed(proc, cached, 400)
        assert batch["pixel_values"] is None and batch["image_streams"]["clip.tokens"].shape[0] == 3
        from_cache = model(**batch).loss
    assert abs(float(from_pixels) - float(from_cache)) <= 1e-5


def test_the_shards_loader_packs_training_batches_only(tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["data.train.packing={max_tokens: 512}"])
    model = vlkit.build_model(recipe)
    from vlkit.registry import DATASETS

    data = DATASETS.build(recipe.data.train, "data.train")
    proc = model.processor()
    batch = next(iter(data.train_loader(proc)))
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert sum(len(r) for r in batch["packed_rows"]) == len(batch["__key__"]) == 8  # batch_size samples
    assert batch["input_ids"].shape[1] <= 512
    real = int(batch["attention_mask"].sum())
    padded = DATASETS.build({**recipe.data.train, "packing": None}, "data.train")
    plain = next(iter(padded.train_loader(proc)))
    assert plain["__key__"] == sorted(plain["__key__"], key=batch["__key__"].index)  # the same samples
    assert int(plain["attention_mask"].sum()) == real
    assert plain["input_ids"].numel() > batch["input_ids"].numel()  # less padding


def test_recipes_validate_packing(tiny_recipe: Path, demo_dir: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match=r"data\.train: packing\.max_tokens \(256\) is below max_length \(512\)"):
        vlkit.load_recipe(tiny_recipe, ["data.train.packing={max_tokens: 256}"])
    vlkit.load_recipe(tiny_recipe, ["data.train.packing={max_tokens: 256}", "data.train.max_length=256"])
    with pytest.raises(RecipeError, match=r"data\.val\.packing.*training batches"):
        vlkit.load_recipe(tiny_recipe, ["data.val.packing={max_tokens: 512}"])
    with pytest.raises(RecipeError, match=r"stages\[1\]\.data: packing\.max_tokens \(8\) is below"):
        vlkit.load_recipe(tiny_recipe, ["stages.1.data={packing: {max_tokens: 8}}"])
    from vlkit.registry import DATASETS

    member = {"task": "vqa", "urls": f"{demo_dir}/train-000000.tar"}
    mix = DATASETS.parse_args({"name": "mix", "datasets": [member], "packing": {"max_tokens": 512}}, "data.train")
    assert mix.packing.max_tokens == 512
    with pytest.raises(RecipeError, match=r"packing\.max_tokens \(8\) is below max_length"):
        DATASETS.parse_args({"name": "mix", "datasets": [member], "packing": {"max_tokens": 8}}, "data.train")
    with pytest.raises(RecipeError, match=r"datasets\[0\]\.packing: set packing once for the whole mix"):
        DATASETS.parse_args({"name": "mix", "datasets": [{**member, "packing": {"max_tokens": 512}}]}, "data.train")
    hovle = (ROOT / "recipes" / "demo" / "hovle.yaml").read_text().replace(
        "${recipe_dir}/../../data/demo", str(demo_dir))
    path = tmp_path / "hovle.yaml"
    path.write_text(hovle)
    vlkit.load_recipe(path)
    with pytest.raises(RecipeError, match=r"data\.train\.packing.*holistic encoder.*attend to each other"):
        vlkit.load_recipe(path, ["data.train.packing={max_tokens: 512}"])


@pytest.mark.slow
def test_fit_trains_with_packing(tiny_recipe: Path, tmp_path: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["data.train.packing={max_tokens: 512}", "stages.0.max_steps=2",
                                             "stages.1.max_steps=2"])
    summary = vlkit.fit(recipe, tmp_path / "run")
    assert [s["steps"] for s in summary["stages"]] == [2, 2]
    import csv

    with open(tmp_path / "run" / "stage1-tune" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
