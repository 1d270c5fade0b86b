"""SPHINX-style task mixing: the ``mix`` dataset (weights, task instructions, label masks, errors, fit) and the
demo's box task."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

import vlkit
from vlkit.data.conversation import IGNORE_INDEX, get_template
from vlkit.data.demo import build_demo
from vlkit.data.mix import INSTRUCTIONS, MixDataset
from vlkit.data.processor import VLMProcessor
from vlkit.data.scenes import COLORS, SHAPES, Scene, Shape, draw_scene, object_box
from vlkit.data.shards import iter_tar_samples
from vlkit.errors import DataError, RecipeError
from vlkit.registry import DATASETS
from vlkit.training.fit import _stage_data

FREE_TEXT = "Answer with the shape."  # free text in words the demo tokenizer knows


@pytest.fixture(scope="module")
def processor(demo_dir: Path) -> VLMProcessor:
    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    return VLMProcessor(tokenizer=tok, template=get_template("auto", tok), num_image_tokens=4, image_size=32)


def mix_section(demo_dir: Path, vqa: float = 0.8, box: float = 0.2, **kwargs) -> dict:
    return {"name": "mix", "batch_size": 8, "num_workers": 0, **kwargs, "datasets": [
        {"task": "vqa", "weight": vqa, "instruction": "vqa", "urls": f"{demo_dir}/train-{{000000..000003}}.tar"},
        {"task": "box", "weight": box, "instruction": "detection", "urls": f"{demo_dir}/box-000000.tar"},
    ]}


def flow(section: dict) -> str:
    """A recipe section as a one-line YAML value for a dotted override."""
    return json.dumps(section)


def find(seq: list[int], sub: list[int]) -> list[int]:
    """Start positions of ``sub`` in ``seq``."""
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def sources(demo_dir: Path) -> dict[str, list[dict]]:
    return {key: json.loads(files["json"])["conversations"] for p in sorted(demo_dir.glob("*.tar"))
            for key, files in iter_tar_samples(str(p)) if "json" in files}


# ------------------------------------------------------------------------------------------------ recipe


def test_mix_recipe_loads_completes_and_yields_batches(tiny_recipe: Path, demo_dir: Path,
                                                       processor: VLMProcessor) -> None:
    recipe = vlkit.load_recipe(tiny_recipe, [f"data.train={flow(mix_section(demo_dir))}"])
    train = recipe.data.train
    assert train["name"] == "mix" and train["batch_size"] == 8 and train["tasks"] is None
    # every member is completed with its own defaults, but none of the mix-level options
    assert [d["task"] for d in train["datasets"]] == ["vqa", "box"]
    assert all(d["name"] == "shards" and d["shuffle_buffer"] == 1000 and "batch_size" not in d
               for d in train["datasets"])
    # the resolved recipe (as saved in a run folder) loads again to the same thing
    resolved = Path(tiny_recipe).with_name("resolved.yaml")
    resolved.write_text(recipe.to_yaml())
    assert vlkit.load_recipe(resolved).data.train == train

    ds = DATASETS.build(train, "data.train")
    assert isinstance(ds, MixDataset) and ds.weights == pytest.approx([0.8, 0.2])
    assert [Path(s).name for s in ds.shards] == [*(f"train-{i:06d}.tar" for i in range(4)), "box-000000.tar"]
    index = json.loads((demo_dir / "index.json").read_text())["splits"]
    assert ds.num_samples() == index["train"]["samples"] + index["box"]["samples"]
    assert ds.batches_per_epoch() == ds.num_samples() // 8
    loader = ds.train_loader(processor, seed=0)
    batches = [b for b, _ in zip(loader, range(3))]
    for b in batches:
        assert {"input_ids", "attention_mask", "labels", "pixel_values", "skipped", "__url__", "__key__", "type",
                "task"} <= set(b)
        assert b["input_ids"].shape[0] == 8 and b["pixel_values"].shape == (8, 3, 32, 32)
        assert len(b["task"]) == len(b["__key__"]) == len(b["type"]) == 8 and b["skipped"] == 0
        for task, url, qtype in zip(b["task"], b["__url__"], b["type"]):
            assert (task == "box") == (Path(url).name == "box-000000.tar") == (qtype == "box")


def test_stage_override_selects_tasks(tiny_recipe: Path, demo_dir: Path, processor: VLMProcessor) -> None:
    recipe = vlkit.load_recipe(tiny_recipe, [f"data.train={flow(mix_section(demo_dir))}",
                                             'stages.1.data={tasks: [box], batch_size: 4}'])
    ds = _stage_data(recipe, 1, DATASETS.build(recipe.data.train, "data.train"))
    assert ds.tasks == ["box"] and ds.weights == [1.0] and ds.args.batch_size == 4
    batch = next(iter(ds.train_loader(processor)))
    assert batch["task"] == ["box"] * 4
    with pytest.raises(RecipeError, match="no dataset of this mix has task 'caption'"):
        vlkit.load_recipe(tiny_recipe, [f"data.train={flow(mix_section(demo_dir))}",
                                        "stages.1.data={tasks: [caption]}"])


# ---------------------------------------------------------------------------------- instructions + masks


def test_instructions_are_masked_prompt_and_answers_train(demo_dir: Path, processor: VLMProcessor) -> None:
    tok = processor.tokenizer
    section = mix_section(demo_dir, vqa=0.5, box=0.5, batch_size=24)
    section["datasets"].append({"task": "free", "weight": 0.3, "instruction": FREE_TEXT,
                                "urls": f"{demo_dir}/train-000000.tar"})
    section["datasets"].append({"task": "plain", "weight": 0.3, "instruction": None,
                                "urls": f"{demo_dir}/train-000001.tar"})
    ds = DATASETS.build(section, "data.train")
    texts = {"vqa": INSTRUCTIONS["vqa"], "box": INSTRUCTIONS["detection"], "free": FREE_TEXT}
    ids_of = {task: tok.encode(text, add_special_tokens=False) for task, text in texts.items()}
    assert all(tok.unk_token_id not in ids for ids in ids_of.values())  # the demo tokenizer knows them all
    assistant = tok.encode("<|im_start|>assistant", add_special_tokens=False)
    convs = sources(demo_dir)
    seen = Counter()
    for batch in (b for b, _ in zip(ds.train_loader(processor, seed=1), range(3))):
        for row, task in enumerate(batch["task"]):
            seen[task] += 1
            ids = batch["input_ids"][row].tolist()
            labels = batch["labels"][row].tolist()
            for other, sub in ids_of.items():  # its own instruction, once; never another task's
                assert len(find(ids, sub)) == (1 if other == task else 0), (task, other)
            if task in ids_of:
                start = find(ids, ids_of[task])[0]
                assert start < find(ids, assistant)[0]  # in the first user turn
                assert all(label == IGNORE_INDEX for label in labels[start:start + len(ids_of[task])])
                text = tok.decode([i for i in ids if i >= 0])
                assert texts[task].lower() in text
            # exactly the answers (+ end of turn) train, as without an instruction
            answers = [t["value"] for t in convs[batch["__key__"][row]] if t["from"] == "gpt"]
            expected = [i for a in answers for i in [*tok.encode(a, add_special_tokens=False), tok.eos_token_id]]
            assert [label for label in labels if label != IGNORE_INDEX] == expected
    assert set(seen) == {"vqa", "box", "free", "plain"}


def test_validation_prompts_carry_the_instruction(demo_dir: Path, processor: VLMProcessor) -> None:
    tok = processor.tokenizer
    val = {"name": "mix", "batch_size": 16, "num_workers": 0, "datasets": [
        {"task": "vqa", "weight": 3, "instruction": "vqa", "urls": f"{demo_dir}/val-000000.tar"},
        {"task": "box", "weight": 1, "instruction": "detection", "urls": f"{demo_dir}/box_val-000000.tar"}]}
    ds = DATASETS.build(val, "data.val")
    batches = list(ds.val_loader(processor, max_samples=40))
    tasks = [t for b in batches for t in b["task"]]
    assert Counter(tasks) == {"vqa": 30, "box": 10}  # max_samples split by weight
    for b in batches:
        for row, task in enumerate(b["task"]):
            prompt = tok.decode([i for i in b["input_ids"][row].tolist() if i >= 0 and i != tok.pad_token_id])
            instruction = INSTRUCTIONS["vqa" if task == "vqa" else "detection"].lower()
            assert prompt.endswith(f"{instruction} <|im_end|> <|im_start|> assistant")
            assert (b["type"][row] == "box") == (task == "box")
            if task == "box":
                assert b["answer"][row].startswith("[")
        loss = b["loss_batch"]
        assert (loss["labels"] != IGNORE_INDEX).any(1).all()
    pairs = list(ds.iter_answers(limit=20))
    assert Counter(qtype == "box" for qtype, _ in pairs)[True] == 5


# --------------------------------------------------------------------------------------------- sampling


def test_sampling_weights_are_honoured_and_deterministic(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = DATASETS.build(mix_section(demo_dir, batch_size=100, samples_per_epoch=2000), "data.train")
    loader = ds.train_loader(processor, seed=0)
    assert len(loader) == 20
    epoch = [(t, k) for b in loader for t, k in zip(b["task"], b["__key__"])]
    share = Counter(t for t, _ in epoch)["box"] / len(epoch)
    assert len(epoch) == 2000 and share == pytest.approx(0.2, abs=0.03)
    assert epoch == [(t, k) for b in ds.train_loader(processor, seed=0) for t, k in zip(b["task"], b["__key__"])]
    assert epoch[:100] != [(t, k) for b, _ in zip(ds.train_loader(processor, seed=1), range(1))
                           for t, k in zip(b["task"], b["__key__"])]
    # un-normalised weights: 1 : 3
    other = DATASETS.build(mix_section(demo_dir, vqa=1, box=3, batch_size=100, samples_per_epoch=2000), "x")
    tasks = Counter(t for b in other.train_loader(processor, seed=0) for t in b["task"])
    assert tasks["box"] / 2000 == pytest.approx(0.75, abs=0.03)


def test_loader_workers_and_ranks(demo_dir: Path, processor: VLMProcessor) -> None:
    ds = DATASETS.build({**mix_section(demo_dir, samples_per_epoch=32), "num_workers": 2}, "data.train")
    loader = ds.train_loader(processor)
    assert loader.num_workers == 1  # capped by the box dataset's single shard
    assert len(list(loader)) == 4
    with pytest.raises(DataError, match="mix dataset 'box'.*1 shard.*2 ranks"):
        ds.train_loader(processor, rank=1, world_size=2)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("override", "message"), [
    ("data.train.datasets.1.weight=0", r"datasets\[1\]\.weight must be > 0, got 0"),
    ("data.train.datasets.0.weight=-0.5", r"datasets\[0\]\.weight must be > 0"),
    ("data.train.datasets.0.weight=lots", r"datasets\[0\]\.weight must be a positive number"),
    ("data.train.datasets=[]", "datasets must list at least one dataset"),
    ("data.train.datasets.1.wieght=0.3", r"datasets\[1\]\.wieght: unknown key\. Did you mean 'weight'\?"),
    ("data.train.datasets.0.urlz=x", r"datasets\[0\]\.urlz: unknown key\. Did you mean 'urls'\?"),
    ("data.train.batchsize=4", r"data\.train\.batchsize: unknown key\. Did you mean 'batch_size'\?"),
    ("data.train.datasets.1.batch_size=4", r"datasets\[1\]\.batch_size: set batch_size once for the whole mix"),
    ("data.train.datasets.0.max_length=64", r"datasets\[0\]\.max_length: set max_length once"),
    ("data.train.datasets.1.instruction=detecton", r"unknown instruction 'detecton'\. Did you mean 'detection'\?"),
    ("data.train.datasets.1.instruction=' '", r"datasets\[1\]\.instruction is empty"),
    ("data.train.datasets.0.task=null", r"datasets\[0\]\.task is required"),
    ("data.train.datasets.0.name=distill_images", "cannot be part of a mix"),
    ("data.train.datasets.0.name=shardz", r"datasets\[0\]\.name: unknown dataset 'shardz'\. Did you mean 'shards'"),
    ("data.train.tasks=[caption]", "no dataset of this mix has task 'caption'"),
])
def test_bad_mix_sections_fail_clearly(tiny_recipe: Path, demo_dir: Path, override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        vlkit.load_recipe(tiny_recipe, [f"data.train={flow(mix_section(demo_dir))}", override])
    assert "data.train" in str(info.value)


def test_missing_datasets_and_urls(tiny_recipe: Path, demo_dir: Path) -> None:
    with pytest.raises(RecipeError, match=r"data\.train\.datasets: missing required key"):
        vlkit.load_recipe(tiny_recipe, ['data.train={name: mix, batch_size: 8}'])
    section = mix_section(demo_dir)
    del section["datasets"][0]["urls"]
    with pytest.raises(RecipeError, match=r"datasets\[0\]\.urls: missing required key"):
        vlkit.load_recipe(tiny_recipe, [f"data.train={flow(section)}"])
    section = mix_section(demo_dir)
    section["datasets"][1]["urls"] = f"{demo_dir}/nothing-*.tar"
    with pytest.raises(DataError, match="no shard files"):
        DATASETS.build(section, "data.train")


# ------------------------------------------------------------------------------------------------- fit


def test_fit_two_steps_on_a_mix(tiny_recipe: Path, demo_dir: Path, tmp_path: Path) -> None:
    val = {"name": "mix", "batch_size": 16, "num_workers": 0, "datasets": [
        {"task": "vqa", "weight": 0.5, "instruction": "vqa", "urls": f"{demo_dir}/val-000000.tar"},
        {"task": "box", "weight": 0.5, "instruction": "detection", "urls": f"{demo_dir}/box_val-000000.tar"}]}
    recipe = vlkit.load_recipe(tiny_recipe, [
        f"data.train={flow(mix_section(demo_dir, vqa=0.5, box=0.5))}", f"data.val={flow(val)}",
        "stages=[{name: tune, trainable: [fusion, llm], lr: 1.0e-3, max_steps: 2}]", "eval.max_samples=16",
        "eval.max_new_tokens=12"])
    summary = vlkit.fit(recipe, tmp_path / "run")
    assert summary["stages"][0]["steps"] == 2
    metrics = summary["val"]
    assert metrics["val/count"] == 16 and metrics["val/count/box"] == 8
    assert np.isfinite(metrics["val/loss"])
    seen = json.loads((tmp_path / "run" / "stage0-tune" / "data-rank0.json").read_text())
    assert seen["samples"] == 16 and any(Path(u).name == "box-000000.tar" for u in seen["samples_by_shard"])


# ------------------------------------------------------------------------------------------ demo: boxes


def test_demo_box_shards(demo_dir: Path) -> None:
    index = json.loads((demo_dir / "index.json").read_text())
    splits = index["splits"]
    assert splits["box"]["shards"] == ["box-000000.tar"] and splits["box_val"]["shards"] == ["box_val-000000.tar"]
    assert splits["box"]["samples"] == 60 and splits["box_val"]["samples"] == 60  # 300 // 5 each
    assert splits["box"]["shard_tasks"] == [{"box": 60}] and index["builder"]["box_scenes"] == 60
    for _, files in list(iter_tar_samples(str(demo_dir / "box-000000.tar")))[:20]:
        meta = json.loads(files["json"])
        assert meta["task"] == meta["type"] == "box"
        question, answer = (t["value"] for t in meta["conversations"])
        color, shape = question.removeprefix("<image>\nWhere is the ").removesuffix("?").split()
        assert color in COLORS and shape in SHAPES
        x0, y0, x1, y1 = json.loads(answer)
        assert answer == f"[{x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}]"
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # the box bounds the pixels drawn in the object's colour around it (within about a pixel)
        pixels = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB"), dtype=int)
        size = pixels.shape[0]
        mask = np.abs(pixels - np.array(COLORS[color])).sum(-1) < 30
        near = np.zeros_like(mask)
        lo, hi = (np.array([y0, x0]) * size - 3).astype(int).clip(0), (np.array([y1, x1]) * size + 3).astype(int)
        near[lo[0]:hi[0], lo[1]:hi[1]] = True
        ys, xs = np.nonzero(mask & near)
        found = (xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size)
        assert found == pytest.approx((x0, y0, x1, y1), abs=2.5 / size)


def test_box_task_leaves_the_other_shards_and_token_ids_alone(tmp_path: Path) -> None:
    kwargs = {"train_scenes": 20, "val_scenes": 10, "digit_repeats": 0, "shards": 2, "progress": False}
    without = build_demo(tmp_path / "without", box_scenes=0, **kwargs)
    with_box = build_demo(tmp_path / "with", box_scenes=7, **kwargs)
    assert set(without["splits"]) == {"train", "val"} and not list((tmp_path / "without").glob("box*"))
    assert with_box["splits"]["box"]["samples"] == 7 and with_box["splits"]["box_val"]["samples"] == 2
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        assert (tmp_path / "with" / name).read_bytes() == (tmp_path / "without" / name).read_bytes()
    old = AutoTokenizer.from_pretrained(tmp_path / "without" / "tokenizer")
    new = AutoTokenizer.from_pretrained(tmp_path / "with" / "tokenizer")
    assert all(new.get_vocab()[w] == i for w, i in old.get_vocab().items())  # extended, not renumbered
    answer = "[0.05, 0.31, 0.30, 1.00]"
    ids = new.encode(answer, add_special_tokens=False)
    assert new.unk_token_id not in ids and new.decode(ids) == answer  # box answers decode to themselves


def test_object_box_matches_drawing() -> None:
    scene = Scene([Shape("triangle", "blue", 0), Shape("square", "red", 2)],
                  [(0.0, 0.5, 0.3), (0.01, 0.4, 0.24)])
    image = np.asarray(draw_scene(scene, 128), dtype=int)
    for i, obj in enumerate(scene.objects):
        ys, xs = np.nonzero(np.abs(image - np.array(COLORS[obj.color])).sum(-1) < 30)
        found = (xs.min() / 128, ys.min() / 128, (xs.max() + 1) / 128, (ys.max() + 1) / 128)
        assert found == pytest.approx(object_box(scene, i), abs=2 / 128)
