"""``vlkit data check RECIPE|URLS``: readable shards, sample counts, images, tokenization, the summary."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlkit.cli import main


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def good(key: str) -> dict:
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    return {"__key__": key, "json": json.dumps({"conversations": conv, "type": "color"}).encode(), "png": png()}


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for s in samples:
            writer.write(s)


def check(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(["data", "check", *argv])
    out = capsys.readouterr()
    return code, re.sub(r"\s+", " ", out.out + out.err)


def test_good_shards_pass(demo_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = check(capsys, f"{demo_dir}/train-*.tar", "--tokenizer", str(demo_dir / "tokenizer"),
                      "--image-tokens", "4")
    index = json.loads((demo_dir / "index.json").read_text())["splits"]["train"]
    assert code == 0
    assert f"{index['samples']} samples, 0 bad, 0 unreadable shard(s) (0 samples lost)" in out


def test_bad_samples_and_shards_are_listed_by_shard_and_key(demo_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    long = good("long")
    long["json"] = json.dumps({"conversations": [
        {"from": "human", "value": "<image>\n" + "What color is the circle? " * 40},
        {"from": "gpt", "value": "red"}]}).encode()
    untrained = good("untrained")
    untrained["json"] = json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhat color?"}]}).encode()
    bad_png, bad_json = good("bad_png"), good("bad_json")
    bad_png["png"] = b"\x89PNG\r\n\x1a\n not a png"
    bad_json["json"] = b'{"conversations": [ oops'
    write_shard(data / "a-000000.tar", [good("a0"), bad_png, bad_json, long, untrained, good("a5")])
    write_shard(data / "a-000001.tar", [good(f"b{i}") for i in range(6)])
    with tarfile.open(data / "a-000001.tar") as tar:
        cut = tar.getmember("b3.png").offset_data + 10
    (data / "a-000001.tar").write_bytes((data / "a-000001.tar").read_bytes()[:cut])
    (data / "index.json").write_text(json.dumps({"splits": {"a": {
        "shards": ["a-000000.tar", "a-000001.tar"], "samples": 12, "shard_samples": [6, 6]}}}))

    code, out = check(capsys, f"{data}/a-*.tar", "--tokenizer", str(demo_dir / "tokenizer"), "--image-tokens",
                      "4", "--max-length", "64")
    assert code == 1
    shard = f"{data}/a-000000.tar"
    assert f"{shard}: sample bad_png: cannot decode image 'png'" in out
    assert f"{shard}: sample bad_json: malformed JSON" in out
    assert re.search(rf"{re.escape(shard)}: sample long: .*max_length", out)
    assert f"{shard}: sample untrained: sample has no trained token" in out
    assert not re.search(r"sample (a0|a5|b\d):", out)
    # b3 is cut: b0..b2 are read, b3 (incomplete) .. b5 are lost
    assert "9 samples, 4 bad, 1 unreadable shard(s) (3 samples lost)" in out

    # without a tokenizer only reading, JSON and images are checked
    code, out = check(capsys, f"{data}/a-000000.tar")
    assert code == 1 and "sample bad_png" in out and "sample long" not in out and "sample untrained" not in out


def test_recipe_checks_its_datasets(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = check(capsys, str(tiny_recipe))
    assert code == 0 and "data.train: 4 shard(s)" in out and "data.val: 1 shard(s)" in out
    bad = tmp_path / "bad-000000.tar"
    sample = good("broken")
    sample["png"] = png()[:20]
    write_shard(bad, [good("fine"), sample])
    code, out = check(capsys, str(tiny_recipe), f"data.val.urls={bad}")
    assert code == 1 and f"{bad}: sample broken: cannot decode image" in out
    assert "2 samples, 1 bad, 0 unreadable shard(s)" in out
