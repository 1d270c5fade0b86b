"""Training steps with the feature cache versus from pixels, measured side by side (Florence-VL demo, stage 2).

Stage 2 of ``recipes/demo/florence_dbfusion.yaml`` trains DBFusion + the LLM with Florence-2 frozen: from
pixels every step runs DaViT and the Florence-2 text encoder on three prompts; from the cache it reads
their four streams. Both sides train the same model, with the same optimizer, on the same samples (the
loader order does not depend on the cache). Two measurements, rounds alternating between the sides:

* compute: forward + backward + optimizer step on pre-loaded batches (data loading excluded);
* end to end: the same, pulling each batch from the real training loader (one worker, as the recipe).

The cache is built first over one training shard (its time is printed too).

    python benchmarks/feature_cache.py [--steps 20] [--rounds 3] [--demo data/demo] [overrides ...]

Dotted recipe overrides change the model, e.g. a heavier Florence-2 vision tower (the share of the step the
cache removes is the frozen encoders' forward, so the speed-up grows with the encoders' size):

    python benchmarks/feature_cache.py model.encoders.0.config.vision_config.depths=[2,4] \
        model.encoders.0.config.vision_config.embed_dim=[128,256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vlkit
from vlkit.data.feature_cache import build_cache
from vlkit.registry import DATASETS
from vlkit.training.stages import apply_trainable, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def train_steps(model: vlkit.VLM, stage, batches) -> list[float]:
    """Seconds per optimizer step over ``batches`` (an iterable; loading time counts when it is a loader)."""
    optimizer, scheduler = build_optimizer(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    times = []
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def take(loader, n: int):
    it = iter(loader)
    for _ in range(n):
        yield next(it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo/florence_dbfusion.yaml"))
    parser.add_argument("--stage", type=int, default=1, help="stage whose trainable set is used (encoders frozen)")
    parser.add_argument("--demo", default="data/demo", help="demo dataset folder (built if missing)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. model.fusion.mode=mean")
    args = parser.parse_args()

    demo = Path(args.demo)
    if not (demo / "index.json").exists():
        from vlkit.data.demo import build_demo

        build_demo(demo)
    shard = f"{demo}/train-000000.tar"
    recipe = vlkit.load_recipe(args.recipe, [f"model.llm.tokenizer={demo}/tokenizer", f"data.train.urls={shard}",
                                             *args.overrides])
    torch.manual_seed(0)
    model = vlkit.build_model(recipe)
    stage = recipe.stages[args.stage]
    apply_trainable(model, stage)
    if any(p.requires_grad for p in model.encoders.parameters()):
        raise SystemExit(f"stage {args.stage} ({stage.name}) trains the encoders: the cache does not apply")
    data = DATASETS.build(recipe.data.train, "data.train")
    processor = model.processor(max_length=data.args.max_length)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        reader = build_cache(recipe, model, data.shards, tmp, batch_size=64)
        built = time.perf_counter() - start
        cached = data.with_feature_cache(reader)
        n = args.warmup + args.steps
        print(f"cache of {data.num_samples()} samples built in {built:.1f} s; "
              f"{sum(p.numel() for p in model.parameters()):,} parameters "
              f"({sum(p.numel() for p in model.encoders.parameters()):,} in the frozen encoders), "
              f"batch {data.args.batch_size}, {n} steps per round x {args.rounds} rounds, "
              f"torch threads {torch.get_num_threads()}")
        pre_pixels = list(take(data.train_loader(processor, seed=0), n))
        pre_cached = list(take(cached.train_loader(processor, seed=0), n))
        assert "image_streams" in pre_cached[0] and pre_cached[0]["pixel_values"] is None

        res: dict[str, list[float]] = {k: [] for k in ("pixels", "cache", "pixels_e2e", "cache_e2e")}
        for r in range(args.rounds):
            res["pixels"] += train_steps(model, stage, pre_pixels)[args.warmup:]
            res["cache"] += train_steps(model, stage, pre_cached)[args.warmup:]
            res["pixels_e2e"] += train_steps(model, stage, take(data.train_loader(processor, seed=r), n))[args.warmup:]
            res["cache_e2e"] += train_steps(model, stage, take(cached.train_loader(processor, seed=r), n))[args.warmup:]
            print(f"round {r + 1}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in res.items()))

    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nmedian step, compute only: pixels {med['pixels'] * 1e3:.0f} ms, cache {med['cache'] * 1e3:.0f} ms "
          f"-> speed-up {med['pixels'] / med['cache']:.2f}x")
    print(f"median step, end to end:   pixels {med['pixels_e2e'] * 1e3:.0f} ms, cache {med['cache_e2e'] * 1e3:.0f} "
          f"ms -> speed-up {med['pixels_e2e'] / med['cache_e2e']:.2f}x")


if __name__ == "__main__":
    main()
