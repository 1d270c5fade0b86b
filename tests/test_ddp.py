"""Data-parallel training on CPU: two gloo processes launched by ``vlkit fit``, as a user would run it; and the
distributed robustness pieces: text-only batches still reach the vision path, unused trainable parameters are
named before training, and every rank runs the same number of validation steps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file

import vlkit
from vlkit.data.conversation import Message
from vlkit.data.writing import SplitWriter
from vlkit.training.stages import apply_trainable

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
CLIP = "{embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}}"
HOLISTIC_ENCODER = "    - {name: holistic, width: 32, depth: 1, heads: 2, mlp_hidden: 64, patch_size: 8, image_size: 32}\n"


@pytest.mark.slow
def test_ddp_two_ranks_train_on_different_shards_and_the_checkpoint_loads(tiny_recipe: Path, tmp_path: Path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlkit.cli", "fit", str(tiny_recipe), "--run-dir", str(run), *DDP]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    for stage in ("stage0-align", "stage1-tune"):
        ranks = [json.loads((run / stage / f"data-rank{r}.json").read_text()) for r in (0, 1)]
        shards = [set(r["samples_by_shard"]) for r in ranks]
        assert all(shards) and not shards[0] & shards[1], shards  # each rank read its own shards
        assert all(r["samples"] > 0 for r in ranks)
        assert json.loads((run / stage / "done.json").read_text())["steps"] == (3 if stage == "stage0-align" else 4)

    # one checkpoint for the run (rank 0 writes), loadable through the public path
    recipe, model = vlkit.load_run(run)
    assert recipe.trainer.strategy == "ddp"
    state = vlkit.training.checkpoint.read_weights(run / "stage1-tune" / "last")
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in state.items()
               if k.removeprefix("model.") in loaded)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["val/count"] == 32  # validation samples of both ranks gathered


# ------------------------------------------------------------------------------- text-only batches


def _text_only_batch(model: vlkit.VLM) -> dict:
    proc = model.processor()
    feats = [proc.train_features([Message("user", "What digit is this?"), Message("assistant", str(i))], None)
             for i in range(2)]
    return proc.collate(feats)


@pytest.mark.parametrize("encoder", ["clip", "holistic"])
def test_a_text_only_training_batch_gives_every_trainable_vision_parameter_a_zero_gradient(
        demo_dir: Path, tmp_path: Path, encoder: str):
    text = TINY_RECIPE.format(demo=demo_dir)
    if encoder == "holistic":  # HoVLE: the encoder embeds the text too; text leaves its image path out
        start, end = text.index("  encoders:\n") + len("  encoders:\n"), text.index("  llm:\n")
        text = text[:start] + HOLISTIC_ENCODER + text[end:]
    text = text.replace("trainable: [fusion]", "trainable: [encoders]" if encoder == "holistic"
                        else "trainable: [encoders, fusion]")
    (tmp_path / "r.yaml").write_text(text)
    recipe = vlkit.load_recipe(tmp_path / "r.yaml")
    torch.manual_seed(0)
    model = vlkit.build_model(recipe)
    apply_trainable(model, recipe.stages[0])
    vision = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]
    assert vision
    batch = _text_only_batch(model)
    assert batch["pixel_values"] is None
    blank_passes: list[int] = []  # the fusion (splice) / the holistic encoder's image forward runs only for it
    (model.encoders["holistic"] if encoder == "holistic" else model.fusion).register_forward_hook(
        lambda *_: blank_passes.append(1))

    with torch.no_grad():
        expected = model.eval()(**batch).loss
    assert not blank_passes  # evaluation: no blank pass

    loss = model.train()(**batch).loss
    loss.backward()
    assert len(blank_passes) == 1
    assert torch.equal(loss.detach(), expected)  # the blank image has weight 0: the loss is unchanged ...
    assert all(p.grad is not None for p in vision)  # ... and DDP sees every trainable parameter used
    image_only = [p for n, p in model.named_parameters() if n.startswith(("fusion.", "encoders.clip."))
                  or n.split(".")[2] in ("patch_embed", "pos_embed", "mlp")]  # holistic: its image path
    assert image_only and all(not p.grad.any() for p in image_only)

    model.zero_grad()
    apply_trainable(model, dataclasses.replace(recipe.stages[0], trainable=["llm"]))
    model.train()(**batch).loss.backward()
    assert len(blank_passes) == 1  # the vision path frozen: text-only batches skip it


# ----------------------------------------------------------------------------- unused parameters


def _two_encoder_recipe(demo_dir: Path, tmp_path: Path, stages: str) -> Path:
    """The tiny recipe with a second encoder ``aux`` whose stream the fusion does not read."""
    text = TINY_RECIPE.format(demo=demo_dir)
    text = text.replace("  fusion: {name: mlp, projector: mlp2x_gelu}",
                        f"    - {{name: clip, key: aux, config: {CLIP}}}\n"
                        "  fusion: {name: mlp, projector: mlp2x_gelu, streams: [clip.tokens]}")
    start, end = text.index("stages:\n"), text.index("eval:")
    text = text[:start] + "stages:\n" + stages + text[end:]
    path = tmp_path / "two.yaml"
    path.write_text(text)
    return path


UNUSED_STAGES = "  - {name: align, trainable: [fusion, encoders.aux], lr: 1.0e-3, max_steps: 1}\n"


@pytest.mark.slow
def test_a_trainable_parameter_without_gradient_is_named_at_the_first_step(demo_dir: Path, tmp_path: Path):
    recipe = vlkit.load_recipe(_two_encoder_recipe(demo_dir, tmp_path, UNUSED_STAGES),
                               ["data.val=null", "data.train.batch_size=2"])
    with pytest.warns(RuntimeWarning, match=r"got no gradient in stage 'align'.*encoders\.aux\.visual"
                                            r".*freeze them .*ddp_find_unused_parameters_true") as record:
        vlkit.fit(recipe, tmp_path / "run")
    message = next(str(w.message) for w in record if "no gradient" in str(w.message))
    assert "fusion" not in message and "encoders.clip" not in message  # only the unused ones


@pytest.mark.slow
def test_ddp_unused_trainable_parameter_fails_fast_naming_it(demo_dir: Path, tmp_path: Path):
    recipe = _two_encoder_recipe(demo_dir, tmp_path, UNUSED_STAGES)
    cmd = [sys.executable, "-m", "vlkit.cli", "fit", str(recipe), "--run-dir", str(tmp_path / "run"), *DDP]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "stages[0].trainable" in out and "encoders.aux.visual.conv1.weight" in out, out[-3000:]
    assert "ddp_find_unused_parameters_true" in out
    assert not (tmp_path / "run" / "stage0-align" / "last").exists()  # no step was taken


# ------------------------------------------------- a rank of text-only batches; an odd validation set


def _copy_samples(src: Path, out: Path, split: str, n: int, text_only: bool = False) -> None:
    """The first ``n`` samples of shard ``src`` as one shard ``out/{split}-000000.tar`` (``text_only``: without
    their images and ``<image>`` tags)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = SplitWriter(out, split, shard_size=n)
    with tarfile.open(src) as tar:
        members: dict[str, dict[str, bytes]] = {}
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key, files in list(members.items())[:n]:
        meta = json.loads(files["json"])
        if text_only:
            for turn in meta["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
            writer.write(key, meta)
        else:
            writer.write(key, meta, files["png"])
    writer.close()


ODD_RECIPE_STAGES = "  - {name: tune, trainable: [encoders, fusion], lr: 1.0e-2, max_steps: 3}\n"


@pytest.fixture(scope="module")
def text_only_rank_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DDP fit (2 ranks) whose rank 1 reads only text-only training samples (shard 1 of 2), training the
    encoder and the fusion, validated on 5 samples with batch size 2; each rank saves its final weights."""
    root = tmp_path_factory.mktemp("text_only_rank")
    data = root / "data"
    _copy_samples(demo_dir / "train-000000.tar", data / "a", "train", 16)
    _copy_samples(demo_dir / "train-000001.tar", data / "b", "train", 16, text_only=True)
    _copy_samples(demo_dir / "val-000000.tar", data, "val", 5)
    text = TINY_RECIPE.format(demo=demo_dir)
    text = text.replace(f'"{demo_dir}/train-{{000000..000003}}.tar", batch_size: 8',
                        f'"{data}/a/train-000000.tar::{data}/b/train-000000.tar", batch_size: 4')
    text = text.replace(f'"{demo_dir}/val-000000.tar", batch_size: 32', f'"{data}/val-000000.tar", batch_size: 2')
    start, end = text.index("stages:\n"), text.index("eval:")
    text = text[:start] + "stages:\n" + ODD_RECIPE_STAGES + text[end:]
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    script = root / "fit_ddp.py"  # Lightning reruns this script for rank 1
    script.write_text(textwrap.dedent(f"""
        import lightning as L
        from safetensors.torch import save_file
        import vlkit

        class SaveWeights(L.Callback):
            def on_train_end(self, trainer, module):
                state = {{k: v.detach().clone().contiguous() for k, v in module.model.state_dict().items()}}
                save_file(state, {str(root)!r} + f"/rank{{trainer.global_rank}}.safetensors")

        recipe = vlkit.load_recipe({str(recipe)!r}, {DDP!r})
        vlkit.fit(recipe, {str(root / "run")!r}, callbacks=[SaveWeights()])
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=420,
                         cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, root / "run" / "stage0-tune"


@pytest.mark.slow
def test_ddp_rank_with_text_only_batches_trains_the_encoder_in_step(text_only_rank_run):
    root, stage = text_only_rank_run
    ranks = [json.loads((stage / f"data-rank{r}.json").read_text()) for r in (0, 1)]
    assert [set(r["samples_by_shard"]) for r in ranks] == [{str(root / "data/a/train-000000.tar")},
                                                            {str(root / "data/b/train-000000.tar")}]
    weights = [load_file(root / f"rank{r}.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the ranks stayed in step
    start = vlkit.build_model(vlkit.load_recipe(root / "recipe.yaml"))  # same seed: the initial weights
    initial = start.state_dict()
    assert not torch.equal(weights[0]["encoders.clip.visual.conv1.weight"], initial["encoders.clip.visual.conv1.weight"])


@pytest.mark.slow
def test_ddp_validation_runs_as_many_batches_on_each_rank_and_counts_each_sample_once(text_only_rank_run):
    _, stage = text_only_rank_run
    ranks = [json.loads((stage / f"data-rank{r}.json").read_text()) for r in (0, 1)]
    # 5 samples, batch size 2, one shard: rank 0 has 3 samples (2 batches), rank 1 has 2 (1 batch + 1 padding)
    assert [r["val_batches"] for r in ranks] == [2, 2]
    assert [r["val_padding_batches"] for r in ranks] == [0, 1]
    assert json.loads((stage / "done.json").read_text())["val"]["val/count"] == 5
