"""The ``shards`` dataset: batches, padding, label masks, rank split, corrupt samples, task filter."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from vlkit.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, get_template
from vlkit.data.processor import VLMProcessor
from vlkit.data.shards import ShardDataset, iter_tar_samples, split_shards
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS


@pytest.fixture(scope="module")
def processor(demo_dir: Path) -> VLMProcessor:
    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    return VLMProcessor(tokenizer=tok, template=get_template("auto", tok), num_image_tokens=4, image_size=32)


def dataset(urls: str | Path, **kwargs) -> ShardDataset:
    return DATASETS.build({"name": "shards", "urls": str(urls), "num_workers": 0, **kwargs})


def conversations(paths: list[Path]) -> dict[str, list[dict]]:
    return {key: json.loads(files["json"])["conversations"]
            for p in paths for key, files in iter_tar_samples(str(p))}


def png(color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for s in samples:
            writer.write(s)


def good(key: str, answer: str = "red", task: str = "vqa") -> dict:
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": answer}]
    return {"__key__": key, "json": json.dumps({"conversations": conv, "type": "color", "task": task}).encode(),
            "png": png()}


@pytest.fixture
def corrupt_shard(tmp_path: Path) -> Path:
    """Eight samples: ``bad_png`` (position 2) has a corrupt image, ``bad_json`` (position 5) broken JSON."""
    samples = [good("s0"), good("s1"), good("bad_png"), good("s3"), good("s4"), good("bad_json"), good("s6"),
               good("s7")]
    samples[2]["png"] = b"\x89PNG\r\n\x1a\n this is not a png"
    samples[5]["json"] = b'{"conversations": [ oops'
    path = tmp_path / "mixed-000000.tar"
    write_shard(path, samples)
    return path


# ------------------------------------------------------------------------------------------------ train


def test_train_batches_right_padded_with_assistant_labels(demo_dir: Path, processor: VLMProcessor) -> None:
    shards = sorted(demo_dir.glob("train-*.tar"))
    ds = dataset(demo_dir / "train-{000000..000003}.tar", batch_size=8, samples_per_epoch=64)
    assert ds.num_samples() == json.loads((demo_dir / "index.json").read_text())["splits"]["train"]["samples"]
    convs = conversations(shards)
    tok = processor.tokenizer
    loader = ds.train_loader(processor, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 8
        assert batch["pixel_values"].shape == (8, 3, 32, 32)
        assert mask[:, 0].all()  # right padding: every row starts with real tokens
        lengths = mask.sum(1)
        for row in range(8):
            n = int(lengths[row])
            assert mask[row, :n].all() and not mask[row, n:].any()
            assert (ids[row, n:] == tok.pad_token_id).all()
            assert int((ids[row] == IMAGE_TOKEN_ID).sum()) == 4
            answers = [t["value"] for t in convs[batch["__key__"][row]] if t["from"] == "gpt"]
            expected = [i for a in answers for i in [*tok.encode(a, add_special_tokens=False), tok.eos_token_id]]
            assert labels[row][labels[row] != IGNORE_INDEX].tolist() == expected
            assert (labels[row][labels[row] != IGNORE_INDEX] == ids[row][labels[row] != IGNORE_INDEX]).all()
        assert len(batch["__url__"]) == 8 and all(u.endswith(".tar") for u in batch["__url__"])
        assert len(batch["type"]) == 8 and batch["skipped"] == 0


def test_train_epochs_continue_the_stream_reproducibly(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = dataset(demo_dir / "train-*.tar", batch_size=8, samples_per_epoch=40, shuffle_buffer=20)
    loader = ds.train_loader(processor, seed=3)
    epochs = [[k for b in loader for k in b["__key__"]] for _ in range(3)]
    assert [len(e) for e in epochs] == [40, 40, 40]  # 40 // 8 batches each
    flat = [k for e in epochs for k in e]
    assert len(set(flat)) == len(flat)  # the next epoch continues, it does not restart
    again = [k for b in ds.train_loader(processor, seed=3) for k in b["__key__"]]
    assert again == epochs[0]
    other = [k for b in ds.train_loader(processor, seed=4) for k in b["__key__"]]
    assert other != epochs[0]


def test_train_with_a_worker_process(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = dataset(demo_dir / "train-*.tar", batch_size=4, samples_per_epoch=16, num_workers=2)
    loader = ds.train_loader(processor, seed=0)
    assert loader.num_workers == 2 and loader.persistent_workers
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 4 and all(b["input_ids"].shape[0] == 4 for b in batches)


def test_rank_split_gives_disjoint_shards(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = dataset(demo_dir / "train-*.tar", batch_size=8, samples_per_epoch=64)
    seen = []
    for rank in range(2):
        loader = ds.train_loader(processor, seed=0, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == 64 // (2 * 8)
        seen.append({u for b in batches for u in b["__url__"]})
    assert not seen[0] & seen[1]
    names = [{Path(u).name for u in s} for s in seen]
    assert names[0] <= {"train-000000.tar", "train-000002.tar"}
    assert names[1] <= {"train-000001.tar", "train-000003.tar"}
    assert split_shards(["a", "b", "c", "d", "e"], 1, 2) == ["b", "d"]
    with pytest.raises(DataError, match="ranks"):
        ds.train_loader(processor, rank=0, world_size=5)


# -------------------------------------------------------------------------------------------------- val


def test_val_batches_left_padded_with_answers(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = dataset(demo_dir / "val-000000.tar", batch_size=50)
    batches = list(ds.val_loader(processor))
    assert sum(len(b["answer"]) for b in batches) == 360
    assert [b["input_ids"].shape[0] for b in batches] == [50] * 7 + [10]
    tok = processor.tokenizer
    assistant_prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for batch in batches:
        mask = batch["attention_mask"]
        assert mask[:, -1].all()  # left padding: every row ends with real tokens
        for row in range(mask.shape[0]):
            n = int(mask[row].sum())
            assert not mask[row, : mask.shape[1] - n].any()
            assert batch["input_ids"][row, -len(assistant_prompt):].tolist() == assistant_prompt
        assert "labels" not in batch and batch["skipped"] == 0
        assert all(isinstance(a, str) and a for a in batch["answer"]) and None not in batch["type"]
        loss = batch["loss_batch"]
        for row, answer in enumerate(batch["answer"]):
            labelled = loss["labels"][row][loss["labels"][row] != IGNORE_INDEX].tolist()
            assert labelled == [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
        assert loss["pixel_values"] is batch["pixel_values"]
    # one pass: iterating again gives the same batches
    again = list(ds.val_loader(processor))
    assert [b["__key__"] for b in again] == [b["__key__"] for b in batches]
    # the answers-only reader (majority baselines, max_new_tokens) sees what the loader yields
    pairs = [(t, a) for b in batches for t, a in zip(b["type"], b["answer"])]
    assert sorted(pairs) == sorted(ds.iter_answers())


@pytest.mark.parametrize("workers", [0, 2])
def test_one_val_shard_is_split_across_ranks_by_sample(demo_dir: Path, processor: VLMProcessor,
                                                        workers: int) -> None:
    ds = dataset(demo_dir / "val-000000.tar", batch_size=16, num_workers=workers)
    keys = [[k for b in ds.val_loader(processor, rank=r, world_size=2, max_samples=40) for k in b["__key__"]]
            for r in (0, 1)]
    assert [len(k) for k in keys] == [20, 20] and not set(keys[0]) & set(keys[1])
    whole = [k for b in ds.val_loader(processor) for k in b["__key__"]]
    split = [k for b in (ds.val_loader(processor, rank=r, world_size=2) for r in (0, 1)) for x in b
             for k in x["__key__"]]
    assert sorted(split) == sorted(whole)  # every sample exactly once


# -------------------------------------------------------------------------------------- corrupt samples


def test_corrupt_samples_are_skipped_and_counted(corrupt_shard: Path, processor: VLMProcessor) -> None:
    ds = dataset(corrupt_shard, batch_size=3, shuffle_buffer=0, samples_per_epoch=6)
    with pytest.warns(RuntimeWarning) as record:
        batches = list(ds.train_loader(processor))
    assert [b["__key__"] for b in batches] == [["s0", "s1", "s3"], ["s4", "s6", "s7"]]
    assert [b["skipped"] for b in batches] == [1, 1]
    messages = [str(w.message) for w in record]
    assert any("sample bad_png: cannot decode image" in m for m in messages)
    assert any("sample bad_json: malformed JSON" in m for m in messages)
    with pytest.warns(RuntimeWarning) as record:
        val = list(ds.val_loader(processor))
    assert len(record) == 2
    assert sum(b["skipped"] for b in val) == 2 and sum(len(b["answer"]) for b in val) == 6


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_raises_naming_shard_and_key(corrupt_shard: Path, processor: VLMProcessor, workers: int) -> None:
    ds = dataset(corrupt_shard, batch_size=3, shuffle_buffer=0, strict=True, num_workers=workers)
    with pytest.raises(DataError, match=r"mixed-000000\.tar: sample bad_png: cannot decode image") as info:
        list(ds.train_loader(processor))
    assert "strict: false" in str(info.value)
    with pytest.raises(DataError, match="sample bad_png"):
        list(ds.val_loader(processor))


def test_bad_json_strict(tmp_path: Path, processor: VLMProcessor) -> None:
    path = tmp_path / "j.tar"
    write_shard(path, [{"__key__": "k1", "json": b"[1, 2]", "png": png()}])
    with pytest.raises(DataError, match=r"j\.tar: sample k1: JSON must be an object"):
        list(dataset(path, strict=True).val_loader(processor))
    write_shard(path, [{"__key__": "k2", "json": b'{"task": "vqa"}', "png": png()}])
    with pytest.raises(DataError, match="sample k2: missing or empty 'conversations'"):
        list(dataset(path, strict=True).val_loader(processor))


def test_all_samples_unusable_is_an_error(corrupt_shard: Path, processor: VLMProcessor) -> None:
    ds = dataset(corrupt_shard, batch_size=2, max_length=8)  # every sample is too long
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="no usable training sample"):
        next(iter(ds.train_loader(processor)))


# ------------------------------------------------------------------------------------ filters and counts


def test_task_filter(demo_dir: Path, processor: VLMProcessor) -> None:
    index = json.loads((demo_dir / "index.json").read_text())
    captions = sum(t.get("caption", 0) for t in index["splits"]["train"]["shard_tasks"])
    ds = dataset(demo_dir / "train-*.tar", batch_size=8, tasks=["caption"])
    assert ds.num_samples() == captions == 60
    batches = list(ds.train_loader(processor))
    assert len(batches) == captions // 8
    assert {t for b in batches for t in b["type"]} == {"caption"}
    assert {q for q, _ in ds.iter_answers()} == {"caption"}
    both = dataset(demo_dir / "train-*.tar", tasks=["caption", "vqa"])
    assert both.num_samples() == index["splits"]["train"]["samples"]


def test_counts_without_index(demo_dir: Path, tmp_path: Path) -> None:
    for name in ("train-000001.tar", "train-000002.tar"):
        shutil.copy(demo_dir / name, tmp_path / name)
    index = json.loads((demo_dir / "index.json").read_text())
    expected = sum(index["splits"]["train"]["shard_samples"][1:3])
    assert dataset(tmp_path / "train-*.tar").num_samples() == expected
    assert dataset(demo_dir / "train-{000001..000002}.tar").num_samples() == expected
    assert dataset(tmp_path / "train-*.tar", tasks=["caption"]).num_samples() == sum(
        t.get("caption", 0) for t in index["splits"]["train"]["shard_tasks"][1:3])


def test_iter_answers(demo_dir: Path) -> None:
    val = dataset(demo_dir / "val-*.tar")
    pairs = list(val.iter_answers())
    assert len(pairs) == 360
    assert len(list(val.iter_answers(limit=25))) == 25
    train = dataset(demo_dir / "train-000000.tar")
    pairs = list(train.iter_answers(limit=50))
    assert len(pairs) > 50  # multi-turn samples give one pair per assistant turn
    assert {q for q, _ in pairs} <= {"color", "shape", "count", "presence", "position", "digit", "caption"}


def test_missing_shards(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"vlkit data demo --out DIR.*vlkit data from-llava") as info:
        dataset(tmp_path / "train-{000000..000003}.tar")
    assert "train-000000.tar" in str(info.value)
    with pytest.raises(DataError, match=r"train-\*\.tar"):
        dataset(tmp_path / "train-*.tar")
    with pytest.raises(DataError, match="names a folder"):
        dataset(tmp_path)


def test_recipe_args_are_validated(demo_dir: Path) -> None:
    with pytest.raises(RecipeError, match="train_on"):
        DATASETS.build({"name": "shards", "urls": str(demo_dir / "val-*.tar"), "train_on": "everything"})
    with pytest.raises(RecipeError, match="batch_size"):
        DATASETS.build({"name": "shards", "urls": str(demo_dir / "val-*.tar"), "batch_size": "big"})
    with pytest.raises(RecipeError, match=r"data\.train: batch_size must be at least 1"):
        DATASETS.parse_args({"name": "shards", "urls": "x.tar", "batch_size": 0}, "data.train")
    assert isinstance(dataset(demo_dir / "val-*.tar", tasks=["vqa"]), ShardDataset)


# ------------------------------------------------------------------------------ corrupt shards at scale


def _ten_sample_shard(folder: Path) -> Path:
    """``folder/part-000000.tar`` with samples s0..s9 and an ``index.json`` listing its 10 samples."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-000000.tar"
    write_shard(path, [good(f"s{i}") for i in range(10)])
    (folder / "index.json").write_text(json.dumps({"splits": {"part": {
        "shards": [path.name], "samples": 10, "shard_samples": [10]}}}))
    return path


def _member_offset(path: Path, name: str) -> tuple[int, int]:
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.getmember(name)
        return member.offset, member.offset_data


@pytest.mark.parametrize("cut", ["inside_image", "between_samples"])
def test_truncated_shard_keeps_samples_before_the_break(tmp_path: Path, processor: VLMProcessor,
                                                         cut: str) -> None:
    path = _ten_sample_shard(tmp_path / "data")
    header, data = _member_offset(path, "s6.png" if cut == "inside_image" else "s8.json")
    size = data + 20 if cut == "inside_image" else header  # mid-way through s6's image, or right after s7
    path.write_bytes(path.read_bytes()[:size])
    kept = 6 if cut == "inside_image" else 8
    ds = dataset(tmp_path / "data" / "part-*.tar", batch_size=4, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match=r"part-000000\.tar: (unreadable tar shard|shard ends after)") as record:
        batches = list(ds.val_loader(processor))
    assert [k for b in batches for k in b["__key__"]] == [f"s{i}" for i in range(kept)]
    assert sum(b["skipped"] for b in batches) == 10 - kept  # what the index says was lost
    assert len([w for w in record if "part-000000.tar" in str(w.message)]) == 1

    # training: a truncated shard among good ones does not end the stream; the loss is counted per pass
    _ten_sample_shard(tmp_path / "good")
    mixed = dataset(f"{tmp_path}/data/part-*.tar::{tmp_path}/good/part-*.tar", batch_size=4, shuffle_buffer=0,
                    samples_per_epoch=20)
    with pytest.warns(RuntimeWarning):
        loader = mixed.train_loader(processor)
        epochs = [list(loader) for _ in range(3)]
    assert all(len(e) == 5 for e in epochs)
    keys = [k for e in epochs for b in e for k in b["__key__"]]
    assert sum(b["skipped"] for e in epochs for b in e) >= (10 - kept) * 2  # 60 samples read: 3+ passes
    assert not {k for k in keys} - {f"s{i}" for i in range(10)}

    strict = dataset(tmp_path / "data" / "part-*.tar", batch_size=4, shuffle_buffer=0, strict=True)
    with pytest.raises(DataError, match=r"part-000000\.tar: (unreadable tar shard|shard ends after).*strict: false"):
        list(strict.val_loader(processor))


@pytest.mark.parametrize("split", ["train", "val"])
def test_worker_error_reaches_the_user_as_one_line(corrupt_shard: Path, processor: VLMProcessor,
                                                    split: str) -> None:
    ds = dataset(corrupt_shard, batch_size=3, shuffle_buffer=0, strict=True, num_workers=1)
    loader = ds.train_loader(processor) if split == "train" else ds.val_loader(processor)
    assert loader.num_workers == 1
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker" not in message
    assert message.startswith(f"{corrupt_shard}: sample bad_png: cannot decode image")
    assert info.value.__cause__ is None


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_a_script_exiting_with_a_live_loader_iterator_prints_no_error(tiny_recipe: Path):
    """Interpreter shutdown closes the loader's generators after module globals are torn down; closing
    must not evaluate ``except VlkitError`` (then None) and print "Exception ignored ... TypeError"."""
    import subprocess
    import sys

    script = (
        "import sys, vlkit\n"
        "from vlkit.registry import DATASETS\n"
        "recipe = vlkit.load_recipe(sys.argv[1])\n"
        "model = vlkit.build_model(recipe)\n"
        "data = DATASETS.build(recipe.data.train, 'data.train')\n"
        "loader = iter(data.train_loader(model.processor(max_length=data.args.max_length), seed=0))\n"
        "batch = next(loader)\n"
        "print(tuple(batch['input_ids'].shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_recipe)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("(8, ")
    assert "Exception ignored" not in done.stderr and "TypeError" not in done.stderr, done.stderr
