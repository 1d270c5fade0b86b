"""Is data loading ever the bottleneck? Loader throughput vs the training step's consumption, side by side.

Measures, on the same recipe (default: the README's main job, ``recipes/demo/florence_dbfusion.yaml``) and in
one run:

* the loader: samples/s of ``data.train``'s real loader (shard reading, decoding, preprocessing, tokenizing,
  collating) with the recipe's ``num_workers``, iterated with no training attached;
* the step: samples/s that one training step (forward, backward, optimizer step) of the recipe's first stage
  consumes, on pre-loaded batches.

The ratio loader / step is how much headroom the loader has (>= 3 means the step never waits for data,
even with the other processes of a busy machine slowing the workers). With ``num_workers >= 1`` the loader
runs in worker processes next to training, so in a real run both compete for the same cores.

    python benchmarks/loader.py [--recipe R] [--demo data/demo] [--batches 40] [--steps 15] [--workers N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import vlkit
from vlkit.registry import DATASETS
from vlkit.training.stages import apply_trainable, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(data, processor, batches: int, seed: int = 0) -> tuple[float, list[dict]]:
    """Samples/s over ``batches`` batches after the first (worker start-up excluded), and the batches."""
    it = iter(data.train_loader(processor, seed=seed))
    kept = [next(it)]
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        samples += int(batch["input_ids"].shape[0])
        kept.append(batch)
    return samples / (time.perf_counter() - start), kept


def step_rate(model: vlkit.VLM, stage, batches: list[dict], steps: int, warmup: int = 3) -> float:
    """Samples/s of full training steps on pre-loaded ``batches`` (cycled)."""
    optimizer, scheduler = build_optimizer(model, stage)
    model.train()
    samples, start = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "labels")}
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            samples += int(batch["input_ids"].shape[0])
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo/florence_dbfusion.yaml"))
    parser.add_argument("--demo", default="data/demo", help="demo dataset folder (built if missing)")
    parser.add_argument("--batches", type=int, default=40, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps")
    parser.add_argument("--workers", type=int, default=None, help="override data.train.num_workers")
    args = parser.parse_args()

    demo = Path(args.demo)
    if not (demo / "index.json").exists():
        from vlkit.data.demo import build_demo

        build_demo(demo)
    overrides = [f"model.llm.tokenizer={demo}/tokenizer", f"data.train.urls={demo}/train-{{000000..000003}}.tar"]
    if args.workers is not None:
        overrides.append(f"data.train.num_workers={args.workers}")
    recipe = vlkit.load_recipe(args.recipe, overrides)
    torch.manual_seed(0)
    model = vlkit.build_model(recipe)
    stage = recipe.stages[0]
    apply_trainable(model, stage)
    data = DATASETS.build(recipe.data.train, "data.train")
    processor = model.processor(max_length=data.args.max_length, train_on=data.args.train_on)

    load, batches = loader_rate(data, processor, args.batches)
    step = step_rate(model, stage, batches, args.steps)
    print(f"recipe {Path(args.recipe).name}, stage {stage.name!r}, batch {data.args.batch_size}, "
          f"num_workers {data.args.num_workers}, torch threads {torch.get_num_threads()}")
    print(f"loader: {load:8.1f} samples/s   (reading, decoding, preprocessing, tokenizing, collating)")
    print(f"step:   {step:8.1f} samples/s   (forward + backward + optimizer step)")
    print(f"loader / step ratio: {load / step:.2f}  (>= 3: the step never waits for data)")


if __name__ == "__main__":
    main()
