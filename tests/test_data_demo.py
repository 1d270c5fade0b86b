"""The offline demo dataset: files, index, balance (majority baseline), held-out digits, tokenizer."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlkit.data.conversation import (
    IMAGE_PLACEHOLDER,
    Message,
    TokenizerTemplate,
    get_template,
    tokenize_conversation,
)
from vlkit.data.demo import build_demo
from vlkit.data.scenes import ANSWERS, QUESTION_TYPES
from vlkit.data.shards import ShardDataset, iter_tar_samples
from vlkit.errors import DataError


def _samples(path: Path) -> list[tuple[str, dict, dict[str, bytes]]]:
    return [(key, json.loads(files["json"]), files) for key, files in iter_tar_samples(str(path))]


def test_files_and_index_match_the_tars(demo_dir: Path) -> None:
    index = json.loads((demo_dir / "index.json").read_text())
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["shards"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert val["shards"] == ["val-000000.tar"]
    assert (demo_dir / "tokenizer" / "tokenizer.json").is_file()
    assert not list(demo_dir.glob("*.tmp")) and not list(demo_dir.glob(".*"))
    for split in (train, val):
        counts = []
        for name in split["shards"]:
            with tarfile.open(demo_dir / name) as tar:
                names = tar.getnames()
            keys = {n.split(".", 1)[0] for n in names}
            assert sorted(names) == sorted([f"{k}.json" for k in keys] + [f"{k}.png" for k in keys])
            counts.append(len(keys))
        assert counts == split["shard_samples"]
        assert sum(counts) == split["samples"]
    # 300 train scenes (a fifth of them captions) + every training digit once
    assert train["shard_tasks"] and sum(t.get("caption", 0) for t in train["shard_tasks"]) == 60
    assert train["types"]["digit"] == 1797 - 60
    assert val["samples"] == 6 * 60
    assert val["types"] == {t: 60 for t in QUESTION_TYPES}


def test_conversations_are_well_formed(demo_dir: Path) -> None:
    turns = Counter()
    for _key, meta, files in _samples(demo_dir / "train-000000.tar"):
        conv = meta["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith(IMAGE_PLACEHOLDER + "\n")
        assert sum(IMAGE_PLACEHOLDER in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert "png" in files
        if meta["task"] == "caption":
            assert conv[1]["value"].endswith(".") and meta["type"] == "caption"
        elif "types" in meta:
            assert 3 <= len(meta["types"]) <= 5 and len(set(meta["types"])) == len(meta["types"])
            assert len(meta["types"]) == len(conv) // 2
            for qtype, answer in zip(meta["types"], conv[1::2]):
                assert answer["value"] in ANSWERS[qtype]
            turns[len(meta["types"])] += 1
        else:
            assert meta["type"] == "digit" and conv[1]["value"] in ANSWERS["digit"]
    assert set(turns) == {3, 4, 5}


def test_val_answers_balanced_and_majority_baseline_low(demo_dir: Path) -> None:
    val = ShardDataset(ShardDataset.Args(urls=str(demo_dir / "val-000000.tar")))
    train = ShardDataset(ShardDataset.Args(urls=str(demo_dir / "train-*.tar")))
    pairs = list(val.iter_answers())
    assert len(pairs) == 360
    by_type: dict[str, Counter] = {}
    for qtype, answer in pairs:
        by_type.setdefault(qtype, Counter())[answer] += 1
    for qtype, counts in by_type.items():  # every possible answer equally often
        assert set(counts) == set(ANSWERS[qtype]), qtype
        assert max(counts.values()) - min(counts.values()) <= 1, (qtype, counts)
    train_counts: dict[str | None, Counter] = {}
    for qtype, answer in train.iter_answers():
        train_counts.setdefault(qtype, Counter())[answer] += 1
    assert set(QUESTION_TYPES) <= set(train_counts)
    majority = {t: c.most_common(1)[0][0] for t, c in train_counts.items()}
    hits = Counter(qtype for qtype, answer in pairs if majority[qtype] == answer)
    per_type = {t: hits[t] / 60 for t in QUESTION_TYPES}
    expected = {"color": 1 / 6, "shape": 1 / 4, "count": 1 / 3, "presence": 1 / 2, "position": 1 / 3,
                "digit": 1 / 10}
    assert per_type == pytest.approx(expected, abs=0.02)
    assert 0.25 <= sum(hits.values()) / len(pairs) <= 0.32


def test_val_digits_are_held_out(demo_dir: Path) -> None:
    def sources(pattern: str) -> set[str]:
        return {meta["source"] for p in sorted(demo_dir.glob(pattern)) for _, meta, _ in _samples(p)
                if meta.get("type") == "digit"}

    val, train = sources("val-*.tar"), sources("train-*.tar")
    assert len(val) == 60 and len(train) == 1797 - 60
    assert not val & train


def test_tokenizer_round_trip_and_templates(demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert tok.unk_token == "<unk>"
    vocab = tok.get_vocab()
    for special in ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        assert special in vocab
    assert {"system", "user", "assistant"} <= set(vocab)
    for answers in ANSWERS.values():
        for answer in answers:
            ids = tok.encode(answer, add_special_tokens=False)
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, answer
            assert tok.decode(ids) == answer
    text = "a red circle on the left, an orange square in the middle and a green cross on the right."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    messages = [Message("user", "<image>\nWhat color is the circle?"), Message("assistant", "red")]
    auto = get_template("auto", tok)
    assert isinstance(auto, TokenizerTemplate)
    ids_auto, labels, n = tokenize_conversation(messages, tok, auto, 4)
    ids_chatml, labels_chatml, _ = tokenize_conversation(messages, tok, get_template("chatml", tok), 4)
    assert (ids_auto, labels) == (ids_chatml, labels_chatml) and n == 1
    assert [i for i in labels if i != -100] == [vocab["red"], tok.eos_token_id]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_refuses_non_empty_out_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train-000009.tar").write_bytes(b"stale")
    kwargs = {"train_scenes": 10, "val_scenes": 10, "digit_repeats": 0, "shards": 2, "progress": False}
    with pytest.raises(DataError, match="overwrite"):
        build_demo(out, **kwargs)
    assert not (out / "index.json").exists()
    index = build_demo(out, overwrite=True, **kwargs)
    assert (out / "notes.txt").read_text() == "mine"  # only the old dataset's files are replaced
    assert not (out / "train-000009.tar").exists()
    assert index["splits"]["train"]["samples"] == 10 and index["splits"]["val"]["samples"] == 12
    again = build_demo(tmp_path / "again", **kwargs)  # same seed: the same data, byte for byte
    assert (tmp_path / "again" / "val-000000.tar").read_bytes() == (out / "val-000000.tar").read_bytes()
    assert again["splits"]["train"]["shard_samples"] == index["splits"]["train"]["shard_samples"]
