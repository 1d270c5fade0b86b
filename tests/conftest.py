"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (``vlkit data demo``), built once per test session: 4 train shards, 1 val
    shard (60 questions of each of the 6 types), ``tokenizer/`` and ``index.json``."""
    from vlkit.data.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, train_scenes=300, val_scenes=300, seed=0, shards=4, digit_repeats=1, progress=False)
    return out


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_RECIPE = """\
seed: 0
model:
  encoders:
    - name: clip
      config:
        embed_dim: 32
        vision_cfg: {{image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}}
  fusion: {{name: mlp, projector: mlp2x_gelu}}
  llm:
    name: hf_causal
    tokenizer: {demo}/tokenizer
    chat_template: auto
    config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: 0}}
  val: {{name: shards, urls: "{demo}/val-000000.tar", batch_size: 32, num_workers: 0}}
stages:
  - {{name: align, trainable: [fusion], lr: 1.0e-3, max_steps: 3}}
  - {{name: tune, trainable: [fusion, llm], lr: 1.0e-3, max_steps: 4}}
eval: {{max_samples: 32, max_new_tokens: 3}}
trainer: {{accelerator: cpu, progress_bar: false, checkpoint_every: 2, log_every_n_steps: 1}}
"""


@pytest.fixture()
def tiny_recipe(demo_dir: Path, tmp_path: Path) -> Path:
    """A two-stage recipe of tiny random-init parts on the demo data (seconds per stage on CPU)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(demo=demo_dir))
    return path


@pytest.fixture()
def crash_at():
    """``crash_at(stage, step)``: a Lightning callback that raises ``RuntimeError("simulated crash")`` (a lost
    machine) when the named stage is about to run its ``step``-th optimizer step."""
    from lightning.pytorch.callbacks import Callback

    class Crash(Callback):
        def __init__(self, stage: str, step: int) -> None:
            self.stage, self.step = stage, step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pl_module.stage.name == self.stage and trainer.global_step == self.step:
                raise RuntimeError("simulated crash")

    return Crash
