"""Generation options (issue 13, item 6): greedy, sampling, beams, stop strings, max_new_tokens, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.generation import GenerationError, GenerationOptions, answer
from vlkit.model import build_model

QUESTIONS = ["What colour is the circle?", "How many?", "Where is the big blue square in this picture?", "Hi"]


@pytest.fixture(scope="module")
def model(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import TINY_RECIPE

    path = tmp_path_factory.mktemp("gen") / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(demo=demo_dir))
    torch.manual_seed(0)  # the same model whatever ran before
    m = build_model(vlkit.load_recipe(path))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def images(n: int) -> list[Image.Image | None]:
    rng = np.random.default_rng(0)
    out: list[Image.Image | None] = [Image.fromarray(rng.integers(0, 256, (20 + 9 * i, 40, 3), dtype=np.uint8))
                                     for i in range(n)]
    out[-1] = None  # a text-only prompt in the same batch
    return out


def test_batched_mixed_lengths_equal_one_at_a_time(model):
    imgs = images(len(QUESTIONS))
    options = GenerationOptions(max_new_tokens=8)
    batched = answer(model, imgs, QUESTIONS, options)
    single = [answer(model, [i], [q], options)[0] for i, q in zip(imgs, QUESTIONS)]
    assert batched == single
    assert len({b for b in batched if b}) >= 2  # real, different answers
    assert batched == model.answer(imgs, QUESTIONS, max_new_tokens=8)  # greedy is VLM.answer's default


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model):
    imgs, qs = images(3), QUESTIONS[:3]
    hot = GenerationOptions(max_new_tokens=8, temperature=1.5, seed=7)
    state = torch.get_rng_state()
    first = answer(model, imgs, qs, hot)
    assert torch.equal(torch.get_rng_state(), state)
    assert answer(model, imgs, qs, hot) == first
    others = {tuple(answer(model, imgs, qs, GenerationOptions(max_new_tokens=8, temperature=1.5, seed=s)))
              for s in range(4)}
    assert len(others) > 1  # the seed changes the draw
    greedy = answer(model, imgs, qs, GenerationOptions(max_new_tokens=8))
    assert first != greedy
    # nucleus with a tiny top_p keeps only the most likely token: sampling collapses to greedy
    assert answer(model, imgs, qs, GenerationOptions(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=1)) == greedy


def test_stop_strings_and_max_new_tokens(model):
    imgs, qs = images(2), QUESTIONS[:2]
    full = answer(model, imgs, qs, GenerationOptions(max_new_tokens=12))
    words = full[0].split()
    assert len(words) >= 3
    stop = words[2]
    cut = answer(model, imgs, qs, GenerationOptions(max_new_tokens=12, stop=[stop]))
    assert cut[0] == full[0][: full[0].find(stop)].strip() and stop not in cut[0]
    assert cut[1] == (full[1][: full[1].find(stop)].strip() if stop in full[1] else full[1])
    short = answer(model, imgs, qs, GenerationOptions(max_new_tokens=2))
    for s, f in zip(short, full):
        assert len(model.llm.tokenizer.encode(s, add_special_tokens=False)) <= 2 and f.startswith(s)


def test_beam_search(model):
    imgs, qs = images(2), QUESTIONS[:2]
    beams = answer(model, imgs, qs, GenerationOptions(max_new_tokens=6, num_beams=3))
    # each row's beams are its own: a batch answers as its rows do alone (padding never enters the search)
    assert beams == [answer(model, [img], [q], GenerationOptions(max_new_tokens=6, num_beams=3))[0]
                     for img, q in zip(imgs, qs)]
    assert answer(model, imgs, qs, GenerationOptions(max_new_tokens=6, num_beams=1)) == \
        answer(model, imgs, qs, GenerationOptions(max_new_tokens=6))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"num_beams": 0}, "num_beams"), ({"stop": [""]}, "stop"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        GenerationOptions(**kwargs)


def test_holistic_models_decode_greedily_or_sample(demo_dir: Path, tmp_path: Path):
    import shutil

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir)
    shutil.copytree(root / "recipes" / "demo", tmp_path / "recipes" / "demo")
    hovle = build_model(vlkit.load_recipe(tmp_path / "recipes" / "demo" / "hovle.yaml")).eval()
    imgs = images(2)
    greedy = answer(hovle, imgs, QUESTIONS[:2], GenerationOptions(max_new_tokens=4))
    assert greedy == hovle.answer(imgs, QUESTIONS[:2], max_new_tokens=4)
    hot = GenerationOptions(max_new_tokens=4, temperature=1.0, seed=0)  # sampling is seeded (issue 16)
    assert answer(hovle, imgs, QUESTIONS[:2], hot) == answer(hovle, imgs, QUESTIONS[:2], hot)
    with pytest.raises(GenerationError, match="beam search"):
        answer(hovle, imgs, QUESTIONS[:2], GenerationOptions(num_beams=2))
