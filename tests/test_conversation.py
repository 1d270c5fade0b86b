"""Chat templates and label masks: what trains, what is masked, and that the text is the official format.

Every test tokenizes with a byte-level tokenizer (exact round trip of any text) that knows the special
tokens of all built-in templates, so decoding a trained span gives back exactly the text that trains.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlkit.data.conversation import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    ChatTemplate,
    Message,
    TokenizerTemplate,
    get_template,
    messages_from_llava,
    tokenize_conversation,
)
from vlkit.errors import DataError, RecipeError

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>", "<|system|>",
            "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]
CHATML_JINJA = (  # ChatML as Qwen / SmolLM tokenizers ship it (without a default system prompt)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_JINJA = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
PHI3_JINJA = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)
SMOLLM2_JINJA = (  # HuggingFaceTB/SmolLM2-135M-Instruct: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

N = 3  # visual tokens per <image>
CONVERSATION = [
    Message("system", "You describe images."),
    Message("user", "<image> and <image>: what colour is the square?"),
    Message("assistant", "Blue."),
    Message("user", "And the circle?"),
    Message("assistant", "Red, mostly."),
]
ANSWERS = ["Blue.", "Red, mostly."]
END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "phi3": "<|end|>\n", "vicuna": "</s>",
       "plain": "\n</s>", "auto": "<|im_end|>\n", "auto-llama3": "<|eot_id|>", "auto-smollm2": "<|im_end|>\n"}
# The whole conversation as the official formats write it (FastChat's vicuna_v1.1 for vicuna; LLaVA's
# pretraining "plain" format: no system prompt, no roles, one caption per image).
RENDERED = {
    "chatml": "<|im_start|>system\nYou describe images.<|im_end|>\n<|im_start|>user\n<image> and <image>: what "
              "colour is the square?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnd "
              "the circle?<|im_end|>\n<|im_start|>assistant\nRed, mostly.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou describe images.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n<image> and <image>: what colour is the square?"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|><|start_header_id|>"
              "user<|end_header_id|>\n\nAnd the circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
              "\n\nRed, mostly.<|eot_id|>",
    "phi3": "<|system|>\nYou describe images.<|end|>\n<|user|>\n<image> and <image>: what colour is the square?"
            "<|end|>\n<|assistant|>\nBlue.<|end|>\n<|user|>\nAnd the circle?<|end|>\n<|assistant|>\n"
            "Red, mostly.<|end|>\n",
    "vicuna": "<s>You describe images. USER: <image> and <image>: what colour is the square? ASSISTANT: Blue.</s>"
              "USER: And the circle? ASSISTANT: Red, mostly.</s>",
    "plain": "<image> and <image>: what colour is the square?Blue.\n</s>And the circle?Red, mostly.\n</s>",
}
TEMPLATES = ["chatml", "llama3", "phi3", "vicuna", "plain", "auto", "auto-llama3", "auto-smollm2"]


def make_tokenizer(chat_template: str | None = CHATML_JINJA) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every string tokenizes, and decoding returns it exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens=SPECIALS[4:])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {"chatml": make_tokenizer(), "llama3": make_tokenizer(LLAMA3_JINJA),
            "smollm2": make_tokenizer(SMOLLM2_JINJA)}


def setup(name: str, tokenizers: dict) -> tuple[PreTrainedTokenizerBase, ChatTemplate]:
    """``auto`` uses the tokenizer's own ChatML; ``auto-<x>`` the official Jinja template of model x."""
    tok = tokenizers[name.split("-")[1] if name.startswith("auto-") else "chatml"]
    return tok, get_template("auto" if name.startswith("auto") else name, tok)


def decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Decode ids with each run of N image ids shown as ``<image>``."""
    text, run = [], []
    i = 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_ID:
            assert ids[i:i + N] == [IMAGE_TOKEN_ID] * N
            text.append(tok.decode(run) + "<image>")
            run, i = [], i + N
        else:
            run.append(ids[i])
            i += 1
    return "".join(text) + tok.decode(run)


def trained_spans(tok: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each maximal run of trained positions (labels must equal the ids there)."""
    spans, run = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            assert label == i
            run.append(label)
    return [*spans, tok.decode(run)] if run else spans


def official(name: str, tok: PreTrainedTokenizerBase) -> str:
    if name in RENDERED:
        return RENDERED[name]
    return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in CONVERSATION],
                                   tokenize=False)


# ------------------------------------------------------------------------------------------- label masks


@pytest.mark.parametrize("name", TEMPLATES)
def test_only_assistant_answers_and_end_of_turn_train(name, tokenizers):
    tok, template = setup(name, tokenizers)
    ids, labels, n_images = tokenize_conversation(CONVERSATION, tok, template, N)
    assert len(ids) == len(labels)
    assert n_images == 2 and ids.count(IMAGE_TOKEN_ID) == 2 * N
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == IMAGE_TOKEN_ID)
    # exactly the answers and their end-of-turn train; system, user turns and assistant headers do not
    assert trained_spans(tok, ids, labels) == [a + END[name] for a in ANSWERS]
    # and the text is the model's official format
    assert decode(tok, ids) == official(name, tok)


@pytest.mark.parametrize("name", TEMPLATES)
def test_train_on_last_and_all(name, tokenizers):
    tok, template = setup(name, tokenizers)
    ids, labels, _ = tokenize_conversation(CONVERSATION, tok, template, N, train_on="last")
    assert trained_spans(tok, ids, labels) == [ANSWERS[-1] + END[name]]
    ids, labels, _ = tokenize_conversation(CONVERSATION, tok, template, N, train_on="all")
    assert labels == [IGNORE_INDEX if i == IMAGE_TOKEN_ID else i for i in ids]


@pytest.mark.parametrize("name", TEMPLATES)
def test_per_message_trainable_overrides_the_policy(name, tokenizers):
    tok, template = setup(name, tokenizers)
    messages = list(CONVERSATION)
    messages[2] = Message("assistant", "Blue.", trainable=False)
    ids, labels, _ = tokenize_conversation(messages, tok, template, N)
    assert trained_spans(tok, ids, labels) == [ANSWERS[1] + END[name]]
    # a trainable user turn trains (all of its text); the next assistant header still does not
    messages[3] = Message("user", "And the circle?", trainable=True)
    ids, labels, _ = tokenize_conversation(messages, tok, template, N)
    text = "".join(trained_spans(tok, ids, labels))
    assert "And the circle?" in text and text.endswith(ANSWERS[1] + END[name])
    assert "Blue." not in text and "what colour" not in text
    header = "".join(s[0] for s in template.segments(messages[:4], tok, add_generation_prompt=True))
    header = header[len("".join(s[0] for s in template.segments(messages[:4], tok))):]
    assert bool(header) == (name != "plain")  # plain has no role headers
    assert not header or header not in text.replace(ANSWERS[1] + END[name], "")
    # trainable=True on an answer trains it under train_on="last" too
    messages = list(CONVERSATION)
    messages[2] = Message("assistant", "Blue.", trainable=True)
    ids, labels, _ = tokenize_conversation(messages, tok, template, N, train_on="last")
    assert trained_spans(tok, ids, labels) == [a + END[name] for a in ANSWERS]


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_ends_with_the_assistant_header(name, tokenizers):
    tok, template = setup(name, tokenizers)
    prompt = CONVERSATION[:4]
    ids, _, n_images = tokenize_conversation(prompt, tok, template, N, add_generation_prompt=True)
    full, _, _ = tokenize_conversation(CONVERSATION, tok, template, N)
    assert n_images == 2
    text, whole = decode(tok, ids), decode(tok, full)
    assert whole.startswith(text) and whole[len(text):] == ANSWERS[1] + END[name]


@pytest.mark.parametrize("n", [1, 4])
def test_image_positions_per_placeholder(n, tokenizers):
    tok = tokenizers["chatml"]
    messages = [Message("user", "<image><image>\nCompare."), Message("assistant", "Same."),
                Message("user", "And <image>?"), Message("assistant", "Other.")]
    ids, labels, n_images = tokenize_conversation(messages, tok, BUILTIN_TEMPLATES["chatml"], n)
    assert n_images == 3 and ids.count(IMAGE_TOKEN_ID) == 3 * n
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first:first + 2 * n] == [IMAGE_TOKEN_ID] * 2 * n  # adjacent placeholders stay adjacent
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == IMAGE_TOKEN_ID)
    ids, labels, _ = tokenize_conversation(messages, tok, BUILTIN_TEMPLATES["chatml"], n, train_on="all")
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == IMAGE_TOKEN_ID)


def test_conversation_opening_with_an_answer_masks_its_header(tokenizers):
    messages = [Message("assistant", "Hello! Send me a picture."), Message("user", "<image>"),
                Message("assistant", "A cat.")]
    for name in ("auto", "chatml", "auto-smollm2"):
        tok, template = setup(name, tokenizers)
        ids, labels, _ = tokenize_conversation(messages, tok, template, N)
        assert trained_spans(tok, ids, labels) == ["Hello! Send me a picture.<|im_end|>\n", "A cat.<|im_end|>\n"]


# ----------------------------------------------------------------------------------- official formats


def test_chatml_matches_the_chatml_jinja_template(tokenizers):
    tok = tokenizers["chatml"]
    chatml = BUILTIN_TEMPLATES["chatml"]
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[1:2], True)]:
        rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                           tokenize=False, add_generation_prompt=gen)
        assert "".join(s[0] for s in chatml.segments(messages, tok, gen)) == rendered


def test_llama3_and_phi3_match_their_official_jinja_templates(tokenizers):
    tok = tokenizers["chatml"]
    for messages in (CONVERSATION, CONVERSATION[1:]):
        chat = [{"role": m.role, "content": m.content} for m in messages]
        for gen in (False, True):
            msgs = messages[:-1] if gen else messages
            llama3 = tok.apply_chat_template(chat[:len(msgs)], chat_template=LLAMA3_JINJA, tokenize=False,
                                             add_generation_prompt=gen, bos_token="<|begin_of_text|>")
            assert "".join(s[0] for s in BUILTIN_TEMPLATES["llama3"].segments(msgs, tok, gen)) == llama3
            phi3 = tok.apply_chat_template(chat[:len(msgs)], chat_template=PHI3_JINJA, tokenize=False,
                                           add_generation_prompt=gen, eos_token="<|endoftext|>")
            ours = "".join(s[0] for s in BUILTIN_TEMPLATES["phi3"].segments(msgs, tok, gen))
            # Phi-3's template closes a finished conversation with eos; <|end|> already stops each turn
            assert ours + ("" if gen else "<|endoftext|>") == phi3


def test_stop_tokens(tokenizers):
    tok = tokenizers["chatml"]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    assert BUILTIN_TEMPLATES["chatml"].stop_token_ids(tok) == sorted({ids["</s>"], ids["<|im_end|>"]})
    assert BUILTIN_TEMPLATES["llama3"].stop_token_ids(tok) == sorted(
        {ids["</s>"], ids["<|eot_id|>"], ids["<|end_of_text|>"]})
    assert BUILTIN_TEMPLATES["phi3"].stop_token_ids(tok) == sorted(
        {ids["</s>"], ids["<|end|>"], ids["<|endoftext|>"]})
    assert ids["<|im_end|>"] in TokenizerTemplate().stop_token_ids(tok)


# ------------------------------------------------------------------------------------------------ errors


def test_get_template_errors(tokenizers):
    with pytest.raises(RecipeError, match=r"model.llm.chat_template: unknown chat template 'lama3'.*'llama3'"):
        get_template("lama3", tokenizers["chatml"])
    with pytest.raises(RecipeError, match=r"'auto' needs a tokenizer with its own chat template.*'chatml'"):
        get_template("auto", make_tokenizer(chat_template=None))


def test_prefix_unstable_template_is_rejected():
    # marks the last message differently, so adding a turn rewrites earlier text
    tok = make_tokenizer("{% for m in messages %}{{ m['content'] }}{% if loop.last %}[last]{% endif %}{% endfor %}")
    with pytest.raises(RecipeError, match=r"not prefix-stable.*chat_template"):
        tokenize_conversation([Message("user", "a"), Message("assistant", "b")], tok, get_template("auto", tok), N)


def test_messages_from_llava():
    messages = messages_from_llava([{"from": "system", "value": "S"}, {"from": "human", "value": "<image>\nQ"},
                                    {"from": "gpt", "value": "A"}, {"role": "user", "value": "Q2"},
                                    {"from": "Assistant", "value": "A2"}])
    assert messages == [Message("system", "S"), Message("user", "<image>\nQ"), Message("assistant", "A"),
                        Message("user", "Q2"), Message("assistant", "A2")]
    assert messages_from_llava([]) == []


@pytest.mark.parametrize(("turns", "error"), [
    (["hi"], r"conversations\[0\] must be an object with 'from' and 'value', got 'hi'"),
    ([{"from": "human"}], r"conversations\[0\] must be an object with 'from' and 'value'"),
    ([{"value": "x"}], r"conversations\[0\] must be an object with 'from' and 'value'"),
    ([{"from": "gpt", "value": "a"}, {"from": "bot", "value": "b"}], r"conversations\[1\]: unknown speaker 'bot'"),
    ([{"role": "robot", "value": "b"}], r"conversations\[0\]: unknown speaker 'robot'"),
    ([{"from": "human", "value": ["a"]}], r"conversations\[0\].value must be a string, got list"),
])
def test_messages_from_llava_errors(turns, error):
    with pytest.raises(DataError, match=error):
        messages_from_llava(turns)
