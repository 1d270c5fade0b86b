"""bf16 MFU of a 1-2B-class VLM training step on one GPU (random init: CLIP-L/14-336-sized encoder + a 1B
Llama-shaped LLM), with and without packing, as vlkit's metrics.csv reports it (vlkit.training.throughput).

    python benchmarks/gpu/mfu.py --demo data/demo [--steps 30] [--packing 2048]

Runs ``vlkit.fit`` twice on the demo shards (padded batches; then ``data.train.packing.max_tokens`` when
``--packing`` is given and the recipe key exists) and prints the median tokens/s, TFLOP/s and MFU per run.
Not run in CI: it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

RECIPE = """\
model:
  encoders:
    - {{name: clip, gradient_checkpointing: {ckpt}, config: {{embed_dim: 768, vision_cfg: {{image_size: 336,
       patch_size: 14, width: 1024, layers: 24, heads: 16}}}}}}
  fusion: {{name: mlp, projector: mlp2x_gelu}}
  llm: {{name: hf_causal, tokenizer: {demo}/tokenizer, attn_implementation: sdpa, gradient_checkpointing: {ckpt},
        config: {{model_type: llama, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16,
                 num_attention_heads: 32, num_key_value_heads: 8, max_position_embeddings: 4096}}}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: {batch}, num_workers: 4}}
stages:
  - {{name: tune, trainable: [encoders, fusion, llm], lr: 1.0e-5, max_steps: {steps}}}
trainer: {{accelerator: gpu, precision: bf16-mixed, progress_bar: false, log_every_n_steps: 1,
          checkpoint_every: 100000}}
"""


def run(demo: str, steps: int, batch: int, ckpt: bool, packing: int | None) -> dict[str, float]:
    import vlkit

    folder = Path(tempfile.mkdtemp())
    path = folder / "mfu.yaml"
    path.write_text(RECIPE.format(demo=Path(demo).resolve(), steps=steps, batch=batch, ckpt=str(ckpt).lower()))
    overrides = [f"data.train.packing={{max_tokens: {packing}}}"] if packing else []
    vlkit.fit(vlkit.load_recipe(path, overrides), folder / "run")
    with open(folder / "run" / "stage0-tune" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("throughput/mfu")][3:]  # warm-up steps dropped
    return {k: statistics.median(float(r[f"throughput/{k}"]) for r in rows)
            for k in ("tokens_per_sec", "tflops_per_sec", "mfu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="folder written by `vlkit data demo`")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--packing", type=int, default=None, help="max_tokens of a packed row (needs packing)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing on every part")
    args = parser.parse_args()
    results = {"padded": run(args.demo, args.steps, args.batch, args.checkpointing, None)}
    if args.packing:
        results["packed"] = run(args.demo, args.steps, args.batch, args.checkpointing, args.packing)
    for name, r in results.items():
        print(f"{name:>7}: {r['tokens_per_sec']:>10,.0f} tokens/s  {r['tflops_per_sec']:7.1f} TFLOP/s  "
              f"MFU {100 * r['mfu']:5.1f}%")
    if "packed" in results:
        print(f"packed / padded tokens/s: {results['packed']['tokens_per_sec'] / results['padded']['tokens_per_sec']:.2f}")


if __name__ == "__main__":
    main()
