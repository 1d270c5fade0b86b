"""The third-party plugin example (examples/plugin_encoder): installed as a package it shows up in
``vlkit list`` and trains by its entry-point names; without packaging its classes work by import path."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit.errors import CheckpointError, RecipeError

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "plugin_encoder"
DEMO_RECIPE = PLUGIN / "demo.yaml"
ENCODER_PATH = "vlkit_plugin_example.patch_cnn:PatchCNNEncoder"
FUSION_PATH = "vlkit_plugin_example.attn_pool:AttentionPoolFusion"


def _tiny_overrides(demo: Path) -> list[str]:
    """Point the example recipe at the test's demo data and shrink it to a few seconds of training."""
    return [
        f"data.train.urls={demo}/train-{{000000..000003}}.tar",
        f"data.val.urls={demo}/val-000000.tar",
        f"model.llm.tokenizer={demo}/tokenizer",
        "data.train.batch_size=8", "data.train.num_workers=0", "data.val.batch_size=16", "data.val.num_workers=0",
        "model.encoders.0.width=32", "model.fusion.num_queries=4", "model.fusion.depth=1",
        "stages.0.max_steps=3", "eval.max_samples=16", "eval.max_new_tokens=3", "eval.baseline_samples=200",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin installed (non-editable, no dependencies) into a private folder for PYTHONPATH.

    The source is copied first so the build leaves nothing in the checkout, and the test environment's
    site-packages is never touched. Without build isolation pip uses this environment's setuptools and
    needs no network; if that is not possible it falls back to an isolated build.
    """
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([*base, "--no-build-isolation", "--no-index", str(source)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        res = subprocess.run([*base, str(source)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"pip could not install the plugin example:\n{res.stdout}\n{res.stderr}"
    dist = list(target.glob("vlkit_plugin_example-*.dist-info"))
    assert dist and (dist[0] / "entry_points.txt").is_file()
    return target


def _env(site: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


@pytest.mark.slow
def test_installed_plugin_is_listed_and_trains_by_name(plugin_site: Path, demo_dir: Path, tmp_path: Path):
    env = _env(plugin_site)
    listed = subprocess.run([sys.executable, "-m", "vlkit.cli", "list"], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    sections: dict[str, list[str]] = {}
    for line in listed.stdout.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line.strip(), [])
        elif line.strip():
            current.append(line.split()[0])
    assert "patch_cnn" in sections["encoders"] and "clip" in sections["encoders"]
    assert "attn_pool" in sections["fusions"] and "mlp" in sections["fusions"]
    assert "failed to import" not in listed.stderr

    run = tmp_path / "run"
    fit = subprocess.run([sys.executable, "-m", "vlkit.cli", "fit", str(DEMO_RECIPE), *_tiny_overrides(demo_dir),
                          "--run-dir", str(run)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["val"]["val/loss"])
    assert summary["stages"][0]["steps"] == 3
    with open(run / "stage0-train" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    weights = vlkit.training.checkpoint.read_weights(run / "stage0-train" / "last")
    assert any(k.startswith("model.encoders.cnn.body.") for k in weights)
    assert "model.fusion.queries" in weights and weights["model.fusion.queries"].shape == (4, 128)
    resolved = (run / "recipe.yaml").read_text()
    assert "name: patch_cnn" in resolved and "name: attn_pool" in resolved


def test_import_path_works_without_packaging(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    recipe = vlkit.load_recipe(DEMO_RECIPE, [*_tiny_overrides(demo_dir), f"model.encoders.0.name={ENCODER_PATH}",
                                             f"model.fusion.name={FUSION_PATH}", "stages.0.max_steps=2"])
    from vlkit_plugin_example import AttentionPoolFusion, PatchCNNEncoder

    assert vlkit.ENCODERS.get(ENCODER_PATH) is PatchCNNEncoder
    assert vlkit.FUSIONS.get(FUSION_PATH) is AttentionPoolFusion
    assert recipe.model.encoders[0]["patch_size"] == 8  # defaults filled in from the plugin's Args
    model = vlkit.build_model(recipe)
    assert isinstance(model.encoders["cnn"], PatchCNNEncoder)
    visual = model.encode_images(torch.rand(2, 3, 80, 80))
    assert visual.shape == (2, 4, 128)  # num_queries x LLM hidden size
    summary = vlkit.fit(recipe, tmp_path / "run")
    assert math.isfinite(summary["val"]["val/loss"]) and summary["stages"][0]["steps"] == 2
    with pytest.raises(RecipeError, match="cannot import encoder 'vlkit_plugin_example.patch_cnn:Nope'"):
        vlkit.load_recipe(DEMO_RECIPE, ["model.encoders.0.name=vlkit_plugin_example.patch_cnn:Nope"])


def test_plugin_parts_shapes_validation_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    from safetensors.torch import save_file
    from vlkit_plugin_example import AttentionPoolFusion, PatchCNNEncoder

    torch.manual_seed(0)
    enc = PatchCNNEncoder(PatchCNNEncoder.Args(image_size=32, patch_size=4, width=24, blocks=2))
    assert enc.num_tokens == 64 and enc.stream_dims == {"tokens": 24} and enc.image_size == 32
    tokens = enc.encode(torch.rand(3, 3, 50, 40))["tokens"]  # any input size: resized by preprocess
    assert tokens.shape == (3, 64, 24)
    for bad, match in (({"patch_size": 6}, "power of two"), ({"image_size": 60, "patch_size": 8}, "multiple"),
                       ({"std": [0.2, 0.0, 0.2]}, "positive"), ({"mean": [0.5]}, "3 values")):
        with pytest.raises(RecipeError, match=match):
            PatchCNNEncoder.Args(**bad)

    # weights: a saved state_dict loads back exactly; a mismatching or missing file is a CheckpointError
    path = tmp_path / "cnn.safetensors"
    save_file(enc.state_dict(), str(path))
    again = PatchCNNEncoder(PatchCNNEncoder.Args(image_size=32, patch_size=4, width=24, blocks=2, weights=str(path)))
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(enc.eval().encode(pixels)["tokens"], again.eval().encode(pixels)["tokens"])
    with pytest.raises(CheckpointError, match="does not match"):
        PatchCNNEncoder(PatchCNNEncoder.Args(image_size=32, patch_size=4, width=16, weights=str(path)))
    with pytest.raises(CheckpointError, match="not found"):
        PatchCNNEncoder(PatchCNNEncoder.Args(weights=str(tmp_path / "missing.safetensors")))

    # the fusion takes streams of different token counts and widths and always yields num_queries tokens
    streams = {"cnn.tokens": (64, 24), "other.depth": (5, 7)}
    fusion = AttentionPoolFusion(AttentionPoolFusion.Args(num_queries=6, heads=2, depth=2), streams, hidden_size=16)
    assert fusion.num_tokens == 6
    out = fusion({"cnn.tokens": tokens[:2], "other.depth": torch.randn(2, 5, 7)})
    assert out.shape == (2, 6, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    only = AttentionPoolFusion(AttentionPoolFusion.Args(streams=["other.depth"], width=8), streams, hidden_size=16)
    assert only.stream_names == ["other.depth"]
    with pytest.raises(RecipeError, match="heads") as err:
        AttentionPoolFusion(AttentionPoolFusion.Args(heads=3), streams, hidden_size=16)
    assert err.value.key == "model.fusion.heads"
    with pytest.raises(RecipeError, match="unknown stream"):
        AttentionPoolFusion(AttentionPoolFusion.Args(streams=["cnn.nope"]), streams, hidden_size=16)
    with pytest.raises(RecipeError, match="num_queries must be positive"):
        AttentionPoolFusion.Args(num_queries=0)
