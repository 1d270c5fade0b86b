"""Sequence packing vs padding on a LLaVA-like length distribution, measured side by side in one run.

The samples mix the demo's short VQA answers (one image, one question, a word or two) with synthetic long
conversations about one image (LLaVA-Instruct style: several turns, the demo's questions and answers about
that image's scene plus a long description), so lengths spread from ~90 to ~``--max-length`` tokens. The same
samples, in the same batches of ``--batch-size``, train the demo model (``recipes/demo/clip_mlp.yaml``, all
parts trainable) padded to each batch's longest sample and packed (``data.train.packing``) into rows of at
most ``--max-length`` tokens, each side on its own copy of the model and optimizer. The two alternate
batch by batch (which goes first alternates too) so that machine noise hits both alike.

Printed: the fraction of computed token positions that are real (not padding), padded vs packed, and the
training throughput in real tokens per second (forward, backward, optimizer step), packed / padded.

    python benchmarks/packing.py [--batches 8] [--rounds 2] [--demo data/demo]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch

import vlkit
from vlkit.data.conversation import Message, messages_from_llava
from vlkit.data.packing import collate_packed
from vlkit.data.reading import decode_image, iter_tar_samples, read_meta
from vlkit.errors import DataError
from vlkit.training.stages import apply_trainable, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def demo_samples(demo: Path, n: int) -> list[tuple[list[Message], object, dict]]:
    """``n`` demo samples: (messages, image, meta)."""
    out = []
    for url in sorted(demo.glob("train-*.tar")):
        for _, files in iter_tar_samples(str(url)):
            meta = read_meta(files)
            out.append((messages_from_llava(meta["conversations"]), decode_image(files), meta))
            if len(out) == n:
                return out
    return out


def long_conversation(rng: random.Random, pool: list, turns: int) -> tuple[list[Message], object]:
    """A multi-turn conversation about one image: a long description, then ``turns`` question-answer pairs
    taken from demo samples (their questions and answers, asked about this image as LLaVA-Instruct does)."""
    _, image, _ = rng.choice(pool)
    qa = [rng.choice(pool)[0] for _ in range(turns)]
    answers = [m.content for msgs in qa for m in msgs if m.role == "assistant"]
    description = " ".join(f"There is {a} in the picture, and next to it" for a in answers[: max(2, turns)])
    messages = [Message("user", "<image>\nDescribe the picture in detail."),
                Message("assistant", description + " nothing else.")]
    for msgs in qa:
        messages += [Message(m.role, m.content.replace("<image>", "").strip()) for m in msgs]
    return messages, image


def build_samples(proc, demo: Path, count: int, long_share: float, max_length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = demo_samples(demo, 4 * count)
    feats: list[dict] = []
    while len(feats) < count:
        if rng.random() < long_share:
            messages, image = long_conversation(rng, pool, rng.randint(2, 14))
        else:
            messages, image, _ = pool[len(feats) % len(pool)]
        try:
            feats.append(proc.train_features(messages, image))
        except DataError:  # over max_length: skipped as training would
            continue
    return feats


class Trainer:
    """One side's model copy and optimizer; :meth:`step` times one training step (forward, backward, gradient
    clipping, optimizer step)."""

    def __init__(self, model, stage) -> None:
        self.model = copy.deepcopy(model).train()
        self.optimizer, _ = build_optimizer(self.model, stage)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo/clip_mlp.yaml"))
    parser.add_argument("--demo", default="data/demo", help="demo dataset folder (built if missing)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512, help="max_length = packing.max_tokens")
    parser.add_argument("--long-share", type=float, default=0.35, help="share of long conversations")
    args = parser.parse_args()

    demo = Path(args.demo)
    if not (demo / "index.json").exists():
        from vlkit.data.demo import build_demo

        build_demo(demo, train_scenes=2000, val_scenes=300)
    recipe = vlkit.load_recipe(args.recipe, [f"model.llm.tokenizer={demo}/tokenizer",
                                             f"model.llm.config.max_position_embeddings={args.max_length}",
                                             f"data.train.urls={demo}/train-{{000000..000003}}.tar"])
    torch.manual_seed(0)
    model = vlkit.build_model(recipe)
    stage = recipe.stages[0]
    apply_trainable(model, stage)
    proc = model.processor(max_length=args.max_length)
    n = args.batch_size * (args.batches + 1)  # one warm-up batch per side and round
    feats = build_samples(proc, demo, n, args.long_share, args.max_length, seed=0)
    groups = [feats[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    padded = [proc.collate(g) for g in groups]
    packed = [collate_packed(proc, g, args.max_length) for g in groups]

    lengths = sorted(len(f["input_ids"]) for f in feats)
    real = sum(lengths)
    computed = {"padded": sum(b["input_ids"].numel() for b in padded),
                "packed": sum(b["input_ids"].numel() for b in packed)}
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {model.num_image_tokens} visual tokens per "
          f"image, {len(feats)} samples in batches of {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"sample length (tokens): min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}; max_length = packing.max_tokens = "
          f"{args.max_length}")
    print(f"rows per batch: padded {args.batch_size}, packed "
          f"{statistics.mean(b['input_ids'].shape[0] for b in packed):.2f} (mean)")
    for side in ("padded", "packed"):
        print(f"real-token fraction {side}: {real / computed[side]:.3f} ({real} real of {computed[side]} computed)")

    # Batch by batch, alternating which side goes first: machine noise (a shared machine) hits both alike.
    sides = {"padded": Trainer(model, stage), "packed": Trainer(model, stage)}
    batches = {"padded": padded, "packed": packed}
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(args.rounds):
        for i in range(len(groups)):
            for side in ("padded", "packed") if (i + r) % 2 == 0 else ("packed", "padded"):
                seconds = sides[side].step(batches[side][i])
                if i > 0:  # the first batch of a round warms up
                    times[side].append(seconds)
        tps = {s: real_tokens(batches[s][1:]) * (r + 1) / sum(times[s]) for s in times}
        print(f"round {r + 1}: padded {tps['padded']:.0f} real tokens/s, packed {tps['packed']:.0f} real tokens/s")
    tps = {s: real_tokens(batches[s][1:]) * args.rounds / sum(times[s]) for s in times}
    ratios = [a / b for a, b in zip(times["padded"], times["packed"])]
    print(f"\nthroughput (real tokens/s): padded {tps['padded']:.0f}, packed {tps['packed']:.0f}")
    print(f"throughput ratio packed / padded: {tps['packed'] / tps['padded']:.2f} (median of the per-batch step-time "
          f"ratios: {statistics.median(ratios):.2f})")


def real_tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


if __name__ == "__main__":
    main()
