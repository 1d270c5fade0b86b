"""Feature cache: frozen encoders' streams computed once, read instead of pixels, never stale."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vlkit import build_model, load_recipe
from vlkit.cli import main
from vlkit.data.feature_cache import CacheReader, build_cache, fingerprint, shard_folder
from vlkit.data.shards import expand_urls
from vlkit.errors import DataError, RecipeError
from vlkit.training.fit import fit


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    out = {}
    for path in sorted(run_dir.glob("stage*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[(path.parent.name, int(row["step"]))] = float(row["train/loss"])
    return out


DINO = ("{model: vit_small_patch14_dinov2, img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
        "drop_path_rate: 0.3, proj_drop_rate: 0.3, attn_drop_rate: 0.3}")
DROPOUT = [f"model.encoders=[{{name: dinov2, config: {DINO}}}]", "model.llm.config.attention_dropout=0.2"]
"""An encoder with dropout and drop-path (frozen in both stages), an LLM with attention dropout (trained in
the second): from pixels the frozen encoder must run as the cache encoded, in eval mode."""


@pytest.mark.parametrize("overrides", [[], DROPOUT, pytest.param(["trainer.precision=bf16-mixed"],
                                                                  marks=pytest.mark.slow)],
                         ids=["no-dropout", "dropout", "bf16-mixed"])
def test_training_from_the_cache_matches_training_from_pixels(tiny_recipe: Path, tmp_path: Path, capsys,
                                                              overrides: list[str]):
    cache = tmp_path / "cache"
    plain = fit(load_recipe(tiny_recipe, overrides), tmp_path / "pixels")
    cached = fit(load_recipe(tiny_recipe, [*overrides, f"data.feature_cache={cache}"]), tmp_path / "cached")
    a, b = _losses(tmp_path / "pixels"), _losses(tmp_path / "cached")
    assert len(a) == 7 and a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    assert cached["val"]["val/accuracy"] == pytest.approx(plain["val"]["val/accuracy"])
    assert "training reads cached streams" in capsys.readouterr().out
    # one fingerprint folder (the encoder never trains), one cache folder per training shard
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 4


def test_cached_streams_equal_the_encoders_output(tiny_recipe: Path, tmp_path: Path):
    recipe = load_recipe(tiny_recipe)
    model = build_model(recipe).eval()
    shard = recipe.data.train["urls"].replace("{000000..000003}", "000000")
    reader = build_cache(recipe, model, [shard], tmp_path / "cache", show_progress=False)
    from vlkit.data.shards import _decode_image, _image_bytes, iter_tar_samples

    processor = model.processor()
    checked = 0
    for key, files in iter_tar_samples(shard):
        if _image_bytes(files) is None:
            continue
        cached = reader.lookup(shard, key, _image_bytes(files))
        with torch.no_grad():
            fresh = model.image_streams(processor.pixels(_decode_image(files))[None])
        assert cached.streams.keys() == fresh.keys() == {"clip.tokens"}
        torch.testing.assert_close(cached.streams["clip.tokens"], fresh["clip.tokens"], atol=1e-6, rtol=1e-5)
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_a_changed_image_or_encoder_never_gets_stale_features(tiny_recipe: Path, tmp_path: Path):
    recipe = load_recipe(tiny_recipe)
    model = build_model(recipe)
    shard = tmp_path / "train-000000.tar"
    src = Path(recipe.data.train["urls"].replace("{000000..000003}", "000000"))
    shutil.copy(src, shard)
    reader = build_cache(recipe, model, [str(shard)], tmp_path / "cache", show_progress=False)

    # a different image under the same key is refused by name, never served
    from vlkit.data.shards import _image_bytes, iter_tar_samples

    key, files = next((k, f) for k, f in iter_tar_samples(str(shard)) if _image_bytes(f) is not None)
    with pytest.raises(DataError, match=f"sample {key}: the image differs"):
        CacheReader(reader.folder).lookup(str(shard), key, _image_bytes(files) + b"x")
    with pytest.raises(DataError, match="not in the feature cache"):
        reader.lookup(str(shard), "no-such-key", b"img")

    # rewriting the shard (new mtime/size) re-encodes it when the cache is built again
    index_before = (shard_folder(reader.folder, str(shard)) / "index.json").stat().st_mtime_ns
    _rewrite_with_one_corrupt_image(shard, key)
    reader2 = build_cache(recipe, model, [str(shard)], tmp_path / "cache", show_progress=False)
    assert reader2.folder == reader.folder
    assert (shard_folder(reader.folder, str(shard)) / "index.json").stat().st_mtime_ns != index_before
    # the corrupt image is reported as a bad sample (skipped like a corrupt image read from pixels)
    assert "cannot decode image" in reader2.lookup(str(shard), key, b"not a png")

    # other encoder weights or config -> another fingerprint (another folder)
    with torch.no_grad():
        next(model.encoders.parameters()).add_(1.0)
    assert fingerprint(recipe, model) != reader.folder.name
    other = load_recipe(tiny_recipe, ["model.encoders.0.keep_cls=true"])
    assert fingerprint(other, build_model(other)) != reader.folder.name


def _rewrite_with_one_corrupt_image(shard: Path, bad_key: str) -> None:
    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name.startswith(bad_key + ".") and not m.name.endswith(".json"):
                data = b"not a png"
            members.append((m, data))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_stages_that_train_encoders_read_pixels(tiny_recipe: Path, tmp_path: Path, capsys):
    recipe = load_recipe(tiny_recipe, [f"data.feature_cache={tmp_path / 'cache'}", "stages.0.trainable=[encoders, fusion]",
                                       "stages.1.max_steps=2"])
    fit(recipe, tmp_path / "run")
    out = capsys.readouterr().out
    assert "trains encoders: reading pixels" in out
    assert "stage 1 'tune': encoders frozen, training reads cached streams" in out


def test_a_resumed_stage_caches_the_trained_encoder_not_a_fresh_one(tiny_recipe: Path, tmp_path: Path):
    from lightning.pytorch.callbacks import Callback

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pl_module.stage.name == "tune" and trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    cache = tmp_path / "cache"
    recipe = load_recipe(tiny_recipe, [f"data.feature_cache={cache}", "stages.0.trainable=[encoders, fusion]"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(recipe, tmp_path / "run", callbacks=[Crash()])
    before = sorted(p.name for p in cache.iterdir())
    fit(recipe, tmp_path / "run")  # resumes stage 1 at its step-2 checkpoint
    assert sorted(p.name for p in cache.iterdir()) == before and len(before) == 1


def test_cache_features_cli(tiny_recipe: Path, tmp_path: Path, capsys):
    assert main(["cache-features", str(tiny_recipe), "--out", str(tmp_path / "cache")]) == 0
    assert "cached the streams of 4 training shard(s)" in capsys.readouterr().out
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "fingerprint.json").is_file()
    # fit finds the same cache (same fingerprint) and does not rebuild it
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("index.json")}
    fit(load_recipe(tiny_recipe, [f"data.feature_cache={tmp_path / 'cache'}", "stages.1.max_steps=1"]),
        tmp_path / "run")
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("index.json")} == stamp
    assert main(["cache-features", str(tiny_recipe)]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_cached_batches_give_the_same_loss_with_views(tiny_recipe: Path, tmp_path: Path):
    """Sub-image views: the cache stores every view's streams per image; the loss is the pixel path's."""
    from vlkit.registry import DATASETS

    recipe = load_recipe(tiny_recipe, ["model.views={grid: 2, size: 16}"])
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    data = DATASETS.build({**recipe.data.train, "urls": recipe.data.train["urls"].replace("{000000..000003}", "000001")},
                          "data.train")
    cached = data.with_feature_cache(build_cache(recipe, model, data.shards, tmp_path / "c", show_progress=False))
    proc = model.processor()
    a = next(iter(data.train_loader(proc, seed=3)))
    b = next(iter(cached.train_loader(proc, seed=3)))
    assert b["pixel_values"] is None and b["image_streams"]["clip.tokens"].shape[1] == 5  # global + 2x2 views
    assert a["__key__"] == b["__key__"]
    with torch.no_grad():
        torch.testing.assert_close(model(**b).loss, model(**a).loss, atol=1e-5, rtol=0)


_BUILDER = """
import sys, time
from pathlib import Path
import torch
import vlkit.data.feature_cache as fc
from vlkit import build_model, load_recipe
from vlkit.data.shards import expand_urls

recipe_path, root, name = sys.argv[1:]
recipe = load_recipe(recipe_path)
torch.manual_seed(0)
model = build_model(recipe)
encoded = []
encode = fc._encode_shard
fc._encode_shard = lambda model, url, *a: encoded.append(url) or encode(model, url, *a)
Path(root, name + ".ready").touch()
while not Path(root, "go").exists():  # start both builds together
    time.sleep(0.01)
shards = expand_urls(recipe.data.train["urls"])
reader = fc.build_cache(recipe, model, shards, root, show_progress=False)
print("encoded", len(encoded), "folder", reader.folder.name)
"""


@pytest.mark.slow
def test_processes_building_one_cache_at_once_encode_each_shard_once(tiny_recipe: Path, tmp_path: Path):
    """DDP ranks and parallel sweep cells share a cache folder: one process encodes a shard, the others wait
    for it and read it."""
    root = tmp_path / "cache"
    root.mkdir()
    shards = expand_urls(load_recipe(tiny_recipe).data.train["urls"])
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(tiny_recipe), str(root), f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for i in range(2)]
    deadline = time.time() + 120
    while not all((root / f"p{i}.ready").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (root / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [int(out.split()[1]) for out, _ in outs]
    assert sum(counts) == len(shards) == 4, outs
    assert len({out.split()[3] for out, _ in outs}) == 1  # the same fingerprint folder
    reader = CacheReader(root / outs[0][0].split()[3])
    from vlkit.data.shards import _image_bytes, iter_tar_samples

    for url in shards:
        key, files = next((k, f) for k, f in iter_tar_samples(url) if _image_bytes(f) is not None)
        assert reader.lookup(url, key, _image_bytes(files)).streams.keys() == {"clip.tokens"}


def _one_shard(recipe_path: Path) -> list[str]:
    return [f"data.train.urls={load_recipe(recipe_path).data.train['urls'].replace('{000000..000003}', '000000')}"]


def test_the_fingerprint_covers_precision_format_and_library_versions(tiny_recipe: Path, tmp_path: Path,
                                                                      monkeypatch, capsys):
    recipe = load_recipe(tiny_recipe, _one_shard(tiny_recipe))
    model = build_model(recipe)
    fp32 = fingerprint(recipe, model)
    assert fingerprint(recipe, model, "32-true") == fp32
    assert fingerprint(recipe, model, "bf16-mixed") == fingerprint(recipe, model, "bf16") != fp32
    with pytest.raises(RecipeError, match="the feature cache encodes in 32-true, bf16-mixed, 16-mixed, not "
                                          "'transformer-engine'"):
        fingerprint(recipe, model, "transformer-engine")
    from vlkit.data.feature_cache import FORMAT, describe

    desc = describe(recipe, model)
    assert desc["format"] == FORMAT and desc["precision"] == "32-true"
    assert desc["libraries"] == {n: importlib.metadata.version(n) for n in ("torch", "vlkit", "open_clip_torch")}
    shards = recipe.data.train["urls"]
    first = build_cache(recipe, model, [shards], tmp_path / "cache", show_progress=False)
    real = importlib.metadata.version
    for library in ("open_clip_torch", "torch"):  # the encoder's library, torch: an upgrade -> a new cache
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name, lib=library: "99.0" if name == lib else real(name))
        assert fingerprint(recipe, model) != fp32
        reader = build_cache(recipe, model, [shards], tmp_path / "cache")  # rebuilt, saying why
        assert reader.folder != first.folder and (reader.folder / "fingerprint.json").is_file()
        err = capsys.readouterr().err
        assert f"libraries.{library}: {real(library)} -> 99.0" in " ".join(err.split()), err
        monkeypatch.setattr(importlib.metadata, "version", real)
    assert fingerprint(recipe, model) == fp32


def test_a_bf16_mixed_cache_holds_what_the_encoders_compute_under_bf16_autocast(tiny_recipe: Path,
                                                                               tmp_path: Path):
    recipe = load_recipe(tiny_recipe, _one_shard(tiny_recipe))
    model = build_model(recipe).eval()
    shard = recipe.data.train["urls"]
    fp32 = build_cache(recipe, model, [shard], tmp_path / "cache", show_progress=False)
    bf16 = build_cache(recipe, model, [shard], tmp_path / "cache", show_progress=False, precision="bf16-mixed")
    assert fp32.folder != bf16.folder
    index = json.loads((shard_folder(bf16.folder, shard) / "index.json").read_text())
    assert index["precision"] == "bf16-mixed" and index["device"] == "cpu"
    from vlkit.data.shards import _decode_image, _image_bytes, iter_tar_samples

    processor = model.processor()
    checked = 0
    for key, files in iter_tar_samples(shard):
        if _image_bytes(files) is None:
            continue
        a = fp32.lookup(shard, key, _image_bytes(files)).streams["clip.tokens"]
        b = bf16.lookup(shard, key, _image_bytes(files)).streams["clip.tokens"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fresh = model.image_streams(processor.pixels(_decode_image(files))[None])["clip.tokens"]
        assert a.dtype == torch.float32 and b.dtype == fresh.dtype == torch.bfloat16
        assert torch.equal(b, fresh)  # exactly what the training step computes from pixels under bf16-mixed
        assert not torch.equal(b.float(), a)
        torch.testing.assert_close(b.float(), a, rtol=0.03, atol=0.03)  # close to the fp32 features
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_cache_features_on_a_device(tiny_recipe: Path, tmp_path: Path, capsys):
    one = _one_shard(tiny_recipe)
    assert main(["cache-features", str(tiny_recipe), *one, "--out", str(tmp_path / "c"), "--device", "cpu",
                 "trainer.precision=bf16-mixed"]) == 0
    assert "(on cpu, precision bf16-mixed)" in " ".join(capsys.readouterr().out.split())
    (index,) = (tmp_path / "c").glob("*/*/index.json")
    assert json.loads(index.read_text())["device"] == "cpu"
    if torch.cuda.is_available():
        return
    assert main(["cache-features", str(tiny_recipe), *one, "--out", str(tmp_path / "c"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err
    assert main(["cache-features", str(tiny_recipe), *one, "--out", str(tmp_path / "c"),
                 "trainer.accelerator=gpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trainer.accelerator: the recipe trains on gpu but no CUDA GPU is available here" in err
    assert "--device cpu" in err
