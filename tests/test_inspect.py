"""``vlkit data inspect``: samples as the model sees them, checked against the shards they come from."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from vlkit.cli import main
from vlkit.config import load_recipe
from vlkit.model import build_model

HEADER = re.compile(r"^sample (\d+): (\S+) in (\S+)", re.M)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "inspect", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def answers_of(url: str, key: str) -> list[str]:
    with tarfile.open(url) as tar:
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    return [t["value"] for t in meta["conversations"] if t["from"] == "gpt"]


@pytest.fixture(scope="module")
def model_facts(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    path = tmp_path_factory.mktemp("r") / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(demo=demo_dir))
    model = build_model(load_recipe(path))
    return model.num_image_tokens, model.llm.tokenizer


def test_inspect_shows_trained_answers_and_visual_tokens(tiny_recipe, capsys, model_facts):
    n_visual, tok = model_facts
    code, out, err = run(capsys, str(tiny_recipe), "-n", "3")
    assert code == 0, err
    headers = HEADER.findall(out)
    assert [h[0] for h in headers] == ["1", "2", "3"]
    blocks = out.split("\nsample ")[1:]
    for (_, key, url), block in zip(headers, blocks):
        answers = answers_of(url, key)
        expected = [tok.decode(tok.encode(a + "<|im_end|>\n", add_special_tokens=False)) for a in answers]
        trained = next(line for line in block.splitlines() if line.startswith("trained: "))
        assert trained == "trained: " + " | ".join(repr(e) for e in expected)
        assert f"1 image(s): image 1: {n_visual} visual tokens" in block
        assert f"[image 1: {n_visual} tokens]" in block
        assert "not truncated (max_length 512)" in block


def test_inspect_reports_truncation_and_the_validation_split(tiny_recipe, capsys, model_facts):
    n_visual, _ = model_facts
    limit = n_visual + 40
    code, out, err = run(capsys, str(tiny_recipe), "-n", "8", f"data.train.max_length={limit}",
                         "data.train.overflow=truncate")
    assert code == 0, err
    cuts = [int(c) for c in re.findall(rf"truncated: (\d+) tokens cut \(overflow: truncate, max_length {limit}\)",
                                       out)]
    lengths = [int(n) for n in re.findall(r"^(\d+) tokens, (\d+) trained", out, re.M) for n in n[:1]]
    trained = [int(n[1]) for n in re.findall(r"^(\d+) tokens, (\d+) trained", out, re.M)]
    assert cuts and all(c > 0 for c in cuts)  # the multi-turn demo samples are longer than the limit
    assert max(lengths) == limit and min(trained) >= 1

    code, out, err = run(capsys, str(tiny_recipe), "--split", "val", "-n", "2")
    assert code == 0, err
    assert [url.endswith("val-000000.tar") for _, _, url in HEADER.findall(out)] == [True, True]


def test_inspect_errors(tiny_recipe, capsys):
    code, _, err = run(capsys, str(tiny_recipe), "--stage", "nope")
    assert code == 2 and "no stage named 'nope'; stages: align, tune" in err
