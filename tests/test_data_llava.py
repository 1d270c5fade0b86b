"""LLaVA-format JSON -> shards: conversion, skipped entries, strict mode, reading back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlkit.data.conversation import IMAGE_TOKEN_ID, get_template
from vlkit.data.llava import convert_llava
from vlkit.data.processor import VLMProcessor
from vlkit.data.shards import ShardDataset, iter_tar_samples
from vlkit.errors import DataError


def turn(question: str, answer: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def llava(tmp_path: Path) -> tuple[Path, Path]:
    """A LLaVA JSON with 4 usable entries (png, jpg, webp, text only) and 3 bad ones."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(images / "sub" / "blue.jpg", quality=90)
    Image.new("RGB", (20, 20), (0, 160, 0)).save(images / "green.webp")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    entries = [
        {"id": "000000033471.a", "image": "red.png", "conversations": turn("What color is the square?", "red"),
         "type": "color"},
        {"id": "b", "image": "sub/blue.jpg", "conversations": turn("What color is the square?", "blue"),
         "task": "vqa"},
        {"id": "c", "image": "green.webp", "conversations": turn("What color is the square?", "green")},
        {"id": "text", "conversations": turn("Describe the image.", "a red circle.", image=False)},
        {"id": "missing", "image": "nope.jpg", "conversations": turn("What color is the square?", "red")},
        {"id": "broken", "image": "broken.png", "conversations": turn("What color is it?", "red")},
        {"id": "noconv", "image": "red.png"},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    return path, images


def read_back(out: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    return {key: files for p in sorted(out.glob(f"{split}-*.tar")) for key, files in iter_tar_samples(str(p))}


def test_convert_skips_and_reports_bad_entries(llava: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    path, images = llava
    out = tmp_path / "out"
    index = convert_llava(path, images, out, shard_size=3, progress=False)
    assert index["splits"]["train"]["samples"] == 4
    assert index["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "index.json").read_text()) == index
    assert index["skipped"]["count"] == 3
    reasons = {p["id"]: p["reason"] for p in index["skipped"]["examples"]}
    assert "image file not found" in reasons["missing"] and "nope.jpg" in reasons["missing"]
    assert "unreadable image" in reasons["broken"]
    assert "conversations" in reasons["noconv"]
    err = capsys.readouterr().err
    assert "skipped 3 of 7 entries" in err and "missing" in err

    samples = read_back(out)
    assert set(samples) == {"000000033471_a", "b", "c", "text"}
    assert samples["b"]["jpg"] == (images / "sub" / "blue.jpg").read_bytes()  # original bytes kept
    assert samples["000000033471_a"]["png"] == (images / "red.png").read_bytes()
    assert "png" in samples["c"] and "webp" not in samples["c"]  # re-encoded
    assert set(samples["text"]) == {"json"}
    meta = json.loads(samples["000000033471_a"]["json"])
    assert meta["id"] == "000000033471.a" and meta["type"] == "color"
    assert json.loads(samples["b"]["json"])["task"] == "vqa"


def test_read_back_through_shard_dataset(llava: tuple[Path, Path], tmp_path: Path, demo_dir: Path) -> None:
    path, images = llava
    out = tmp_path / "out"
    convert_llava(path, images, out, shard_size=2, progress=False)
    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    processor = VLMProcessor(tokenizer=tok, template=get_template("auto", tok), num_image_tokens=4, image_size=32)
    ds = ShardDataset(ShardDataset.Args(urls=str(out / "train-*.tar"), batch_size=2, num_workers=0))
    assert ds.num_samples() == 4
    batches = list(ds.val_loader(processor))
    assert sorted(a for b in batches for a in b["answer"]) == ["a red circle.", "blue", "green", "red"]
    assert sum(b["skipped"] for b in batches) == 0
    images_seen = sum(0 if b["pixel_values"] is None else b["pixel_values"].shape[0] for b in batches)
    assert images_seen == 3
    for b in ds.train_loader(processor):
        n_images = 0 if b["pixel_values"] is None else b["pixel_values"].shape[0]
        assert int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) == 4 * n_images
    assert sorted(a for _, a in ds.iter_answers()) == ["a red circle.", "blue", "green", "red"]


def test_strict_raises_on_first_bad_entry(llava: tuple[Path, Path], tmp_path: Path) -> None:
    path, images = llava
    with pytest.raises(DataError, match=r"entry 4 \(id 'missing'\): image file not found"):
        convert_llava(path, images, tmp_path / "out", strict=True, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_val_fraction_and_refusing_non_empty_out(llava: tuple[Path, Path], tmp_path: Path) -> None:
    path, images = llava
    out = tmp_path / "out"
    index = convert_llava(path, images, out, val_fraction=0.3, progress=False)
    assert index["splits"]["val"]["shards"] == ["val-000000.tar"]
    total = index["splits"]["train"]["samples"] + index["splits"]["val"]["samples"]
    assert total == 4 and index["splits"]["val"]["samples"] >= 1
    assert not set(read_back(out, "train")) & set(read_back(out, "val"))
    with pytest.raises(DataError, match="overwrite"):
        convert_llava(path, images, out, progress=False)
    again = convert_llava(path, images, out, val_fraction=0.3, overwrite=True, progress=False)
    assert again["splits"] == index["splits"]  # same seed, same split


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="JSON list"):
        convert_llava(bad, tmp_path / "images", tmp_path / "out", progress=False)
    bad.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        convert_llava(bad, tmp_path / "images", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        convert_llava(bad, tmp_path / "nowhere", tmp_path / "out", progress=False)
    bad.write_text(json.dumps([{"id": "x", "conversations": turn("q?", "a", image=True)}]))
    with pytest.raises(DataError, match=r"none of its 1 entries.*placeholder"):
        convert_llava(bad, tmp_path / "images", tmp_path / "out2", progress=False)
