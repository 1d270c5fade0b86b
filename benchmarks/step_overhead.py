"""Overhead of a vlkit training step over a hand-written PyTorch loop, measured side by side.

Both train the same demo model (``recipes/demo/clip_mlp.yaml``) on the same pre-loaded batches (data
loading is excluded from both) with the same optimizer, schedule and gradient clipping; the vlkit side
runs the real :class:`vlkit.module.VLMModule` inside a Lightning ``Trainer`` (logging included, progress
bar off). Rounds alternate between the two so that machine noise hits both alike.

    python benchmarks/step_overhead.py [--steps 30] [--rounds 3] [--demo data/demo]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import vlkit
from vlkit.module import VLMModule
from vlkit.registry import DATASETS
from vlkit.training.stages import apply_trainable, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)


class InMemoryModule(VLMModule):
    """The vlkit module, fed pre-loaded batches instead of shards."""

    def __init__(self, *args, batches: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_memory = batches

    def train_dataloader(self):
        return DataLoader(self.in_memory, batch_size=None, collate_fn=lambda batch: batch)


def hand_written(model: vlkit.VLM, stage, batches: list[dict]) -> list[float]:
    optimizer, scheduler = build_optimizer(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def with_vlkit(model: vlkit.VLM, recipe, batches: list[dict], log_dir: str) -> list[float]:
    stage = recipe.stages[0]
    timer = StepTimer()
    module = InMemoryModule(model, stage, recipe.eval, train_data=None, batches=batches)
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, precision="32-true",
                        gradient_clip_val=stage.grad_clip, logger=L.pytorch.loggers.CSVLogger(log_dir),
                        log_every_n_steps=recipe.trainer.log_every_n_steps, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo/clip_mlp.yaml"))
    parser.add_argument("--demo", default="data/demo", help="demo dataset folder (built if missing)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round and side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    demo = Path(args.demo)
    if not (demo / "index.json").exists():
        from vlkit.data.demo import build_demo

        build_demo(demo, train_scenes=2000, val_scenes=300)
    recipe = vlkit.load_recipe(args.recipe, [f"model.llm.tokenizer={demo}/tokenizer",
                                             f"data.train.urls={demo}/train-{{000000..000003}}.tar",
                                             "eval.max_new_tokens=8"])  # no validation runs here
    torch.manual_seed(0)
    model = vlkit.build_model(recipe)
    stage = recipe.stages[0]
    apply_trainable(model, stage)
    data = DATASETS.build({**recipe.data.train, "num_workers": 0}, "data.train")
    loader = iter(data.train_loader(model.processor(max_length=data.args.max_length), seed=0))
    n = args.warmup + args.steps
    batches = [next(loader) for _ in range(n)]
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, batch {data.args.batch_size}, "
          f"{n} steps per round x {args.rounds} rounds, torch threads {torch.get_num_threads()}")

    hand, ours = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(args.rounds):
            hand += hand_written(model, stage, batches)[args.warmup:]
            ours += with_vlkit(model, recipe, batches, log_dir)[args.warmup:]
            print(f"round {r + 1}: hand-written {statistics.median(hand) * 1e3:.1f} ms/step, "
                  f"vlkit {statistics.median(ours) * 1e3:.1f} ms/step")
    h, v = statistics.median(hand), statistics.median(ours)
    print(f"\nmedian step: hand-written loop {h * 1e3:.1f} ms, vlkit (Lightning) {v * 1e3:.1f} ms")
    print(f"overhead ratio vlkit / hand-written: {v / h:.3f}")


if __name__ == "__main__":
    main()
