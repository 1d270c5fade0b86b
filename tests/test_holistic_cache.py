"""HoVLE generation with a key/value cache inside the holistic module (issue 16, item 10).

The reference is the loop without any cache: every step re-embeds the whole grown sequence with the module
and reruns the LLM on it. The cached generation must give the same token ids (greedy and sampled), while the
module runs only the new token per step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import vlkit
from vlkit.data.conversation import Message
from vlkit.generation import GenerationError, GenerationOptions, answer

# the shapes of recipes/demo/hovle.yaml (random init; the demo tokenizer)
DEMO_SHAPED = """\
seed: 0
model:
  encoders:
    - {{name: holistic, width: 128, depth: 4, heads: 4, mlp_hidden: 512, patch_size: 8, image_size: 64, hd: {hd}}}
  llm:
    name: hf_causal
    tokenizer: {demo}/tokenizer
    chat_template: auto
    config: {{model_type: llama, hidden_size: 128, intermediate_size: 512, num_hidden_layers: 2,
             num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 512}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: 0}}
stages:
  - {{name: tune, trainable: [encoders, llm], lr: 1.0e-3, max_steps: 1}}
trainer: {{accelerator: cpu, progress_bar: false}}
"""

@pytest.fixture(scope="module")
def models(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, vlkit.VLM]:
    """The demo-shaped model without and with ``hd`` (built once for this file)."""
    tmp = tmp_path_factory.mktemp("holistic_cache")
    return {hd: build(demo_dir, tmp, hd) for hd in (False, True)}


QUESTIONS = ["<image>\nWhat color?", "<image>\nHow many shapes are there in the picture, and where is the big one?",
             "Hi"]


def build(demo_dir: Path, tmp_path: Path, hd: bool = False) -> vlkit.VLM:
    path = tmp_path / f"hovle-{hd}.yaml"
    path.write_text(DEMO_SHAPED.format(demo=demo_dir, hd=str(hd).lower()))
    torch.manual_seed(0)
    model = vlkit.build_model(vlkit.load_recipe(path))
    g = torch.Generator().manual_seed(1)  # a less uniform next-token distribution than the plain init's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def image(color: str) -> Image.Image:
    img = Image.new("RGB", (64, 64), color)
    img.paste((0, 0, 255), (0, 0, 32, 32))
    return img


def prompts(model: vlkit.VLM) -> dict:
    """Three left-padded prompts of different lengths; the last one text-only."""
    proc = model.processor()
    feats = [proc.prompt_features([Message("user", q)], img)
             for q, img in zip(QUESTIONS, [image("red"), image("green"), None])]
    batch = proc.collate(feats, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # there is left padding
    return batch


def reference_generate(model: vlkit.VLM, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None,
                       max_new_tokens: int, sample: dict | None = None) -> torch.Tensor:
    """The uncached loop: the module re-embeds and the LLM reruns the whole sequence for every new token;
    sampling as transformers' generate does it (its warpers, one multinomial draw over the batch per step)."""
    llm = model.llm
    stop = torch.tensor(llm.template.stop_token_ids(llm.tokenizer))
    pad = llm.tokenizer.pad_token_id
    warpers = None
    if sample is not None:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sample["temperature"]),
                                       TopKLogitsWarper(sample["top_k"]), TopPLogitsWarper(sample["top_p"])])
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    new: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            embeds = model.embed(ids, pixels, mask)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            scores = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            if warpers is None:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(warpers(ids, scores).softmax(-1), num_samples=1).squeeze(1)
            token = token.masked_fill(finished, pad)
            new.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                break
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(new, 1)


def stop_on(model: vlkit.VLM, monkeypatch: pytest.MonkeyPatch, token: int) -> None:
    """Make ``token`` the model's only end-of-turn token (so rows stop early, at different steps)."""
    monkeypatch.setattr(model.llm.template, "stop_token_ids", lambda tokenizer: [token])


@pytest.mark.parametrize("hd", [False, True])
def test_cached_greedy_generation_equals_full_re_embedding(models, monkeypatch: pytest.MonkeyPatch, hd: bool):
    model = models[hd]
    batch = prompts(model)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    free = model.strategy.generate(model, ids, mask, pixels, max_new_tokens=8)
    assert len({tuple(r.tolist()) for r in free}) == 3  # the rows differ
    # stop rows at EOS: the first new token a row produces after another one becomes the end-of-turn token
    step, row = min((k, r) for r in range(3) for k in range(1, 8) if int(free[r, k]) not in free[r, :k].tolist())
    eos = int(free[row, step])
    stop_on(model, monkeypatch, eos)
    new = model.strategy.generate(model, ids, mask, pixels, max_new_tokens=8)
    assert torch.equal(new, reference_generate(model, ids, mask, pixels, max_new_tokens=8))
    assert int((new[row] == eos).nonzero()[0]) == step
    assert (new[row, step + 1:] == model.llm.tokenizer.pad_token_id).all()  # padded after its EOS
    ended = [(r == eos).nonzero().flatten() for r in new]
    assert any(len(e) == 0 or int(e[0]) > step for e in ended)  # another row went on after that one stopped


def test_cached_sampling_equals_full_re_embedding(models, monkeypatch: pytest.MonkeyPatch):
    model = models[False]
    batch = prompts(model)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    greedy = model.strategy.generate(model, ids, mask, pixels, max_new_tokens=8)
    stop_on(model, monkeypatch, int(greedy[1, 2]))
    sample = {"temperature": 0.7, "top_k": 40, "top_p": 0.9}
    draws = set()
    for seed in range(2):
        torch.manual_seed(seed)
        new = model.strategy.generate(model, ids, mask, pixels, max_new_tokens=8, do_sample=True, **sample)
        torch.manual_seed(seed)
        assert torch.equal(new, reference_generate(model, ids, mask, pixels, 8, sample))
        draws.add(tuple(new.flatten().tolist()))
    assert len(draws) > 1  # the seed changes the draw


@pytest.mark.parametrize("hd", [False, True])
def test_module_cache_gives_the_full_sequence_embeddings(models, hd: bool):
    model = models[hd]
    encoder = model.encoders["holistic"]
    batch = prompts(model)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    more = torch.randint(5, 60, (3, 4))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        full = encoder.embed_sequence(full_ids, pixels, full_mask)
        cache = encoder.new_cache()
        length = ids.shape[1]
        pieces = [encoder.embed_sequence(ids, pixels, mask, cache=cache),  # the prompt, then 1 and 3 tokens
                  encoder.embed_sequence(more[:, :1], None, full_mask[:, :length + 1], cache=cache),
                  encoder.embed_sequence(more[:, 1:], None, full_mask, cache=cache)]
    real = full_mask.bool()
    assert torch.allclose(torch.cat(pieces, 1)[real], full[real], atol=1e-5)
    assert cache.length == full_ids.shape[1]
    with pytest.raises(ValueError, match="cached \\+ 1 new positions"):
        encoder.embed_sequence(more[:, :1], None, full_mask, cache=cache)  # a mask without the new position


def test_module_runs_only_the_new_token_per_step(models):
    model = models[False]
    encoder = model.encoders["holistic"]
    seen: list[tuple[int, int]] = []  # (queries, keys) of the first block's attention per call
    hook = encoder.blocks[0].attn.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].shape[1], args[4][0].keys[0].shape[2] if args[4] else -1)))
    batch = prompts(model)
    length = batch["input_ids"].shape[1]
    try:
        new = model.strategy.generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      max_new_tokens=6)
    finally:
        hook.remove()
    assert new.shape[1] == 6
    # the prompt once, then one query per new token against the cached keys (none for the last token)
    assert seen == [(length, length)] + [(1, length + k) for k in range(1, 6)]


def test_public_paths_sample_stream_and_stop(models, tmp_path: Path):
    from vlkit.chat import ChatSession

    model = vlkit.from_pretrained(models[False].save_pretrained(tmp_path / "hovle"))  # as predict/chat/serve load it
    imgs, qs = [image("red"), None], ["What color?", "How many?"]
    greedy = answer(model, imgs, qs, GenerationOptions(max_new_tokens=6))
    assert greedy == answer(models[False], imgs, qs, GenerationOptions(max_new_tokens=6)) and all(greedy)
    hot = GenerationOptions(max_new_tokens=6, temperature=1.0, seed=3)
    assert answer(model, imgs, qs, hot) == answer(model, imgs, qs, hot)
    assert answer(model, imgs, qs, GenerationOptions(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=1)) == greedy
    # a chat turn streams the answer token by token and cuts it at a stop string
    image("red").save(tmp_path / "red.png")
    session = ChatSession(model, GenerationOptions(max_new_tokens=6))
    session.attach(tmp_path / "red.png")
    shown: list[str] = []
    assert session.reply(qs[0], shown.append) == greedy[0] and "".join(shown) == greedy[0]
    assert len(shown) > 1  # streamed, not written at once
    stop = greedy[0].split()[1]
    assert answer(model, imgs[:1], qs[:1], GenerationOptions(max_new_tokens=6, stop=[stop]))[0] == \
        greedy[0][: greedy[0].find(stop)].strip()
    with pytest.raises(GenerationError, match="beam search"):
        answer(model, imgs, qs, GenerationOptions(num_beams=2))
