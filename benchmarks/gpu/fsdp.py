"""FSDP on GPUs (Lightning refuses FSDP without CUDA: ``ValueError: The strategy `fsdp` requires a GPU
accelerator``): train a small demo VLM with ``trainer.strategy: {name: fsdp}`` (every part's block class
wrapped, bf16-mixed, activation checkpointing on), interrupt it, resume it, export it, and check the export
reloads.

    python benchmarks/gpu/fsdp.py --demo data/demo [--devices 2] [--state-dict full|sharded]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RECIPE = """\
model:
  encoders:
    - {{name: clip, gradient_checkpointing: true, config: {{embed_dim: 256, vision_cfg: {{image_size: 64,
       patch_size: 8, width: 256, layers: 4, heads: 4}}}}}}
  fusion: {{name: mlp, projector: mlp2x_gelu}}
  llm: {{name: hf_causal, tokenizer: {demo}/tokenizer, gradient_checkpointing: true,
        config: {{model_type: llama, hidden_size: 256, intermediate_size: 512, num_hidden_layers: 4,
                 num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 1024}}}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: 2}}
  val: {{name: shards, urls: "{demo}/val-000000.tar", batch_size: 32, num_workers: 1}}
stages:
  - {{name: tune, trainable: [encoders, fusion, llm], lr: 1.0e-4, max_steps: {steps}}}
eval: {{max_samples: 64}}
trainer: {{accelerator: gpu, devices: {devices}, precision: bf16-mixed, progress_bar: false,
          checkpoint_every: 4, strategy: {{name: fsdp, state_dict_type: {state}}}}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--state-dict", default="full", choices=["full", "sharded"])
    args = parser.parse_args()
    import vlkit

    folder = Path(tempfile.mkdtemp())
    run = folder / "run"
    for steps in (4, 8):  # the 8-step run resumes the 4-step checkpoint (the recipes differ only in max_steps)
        path = folder / "fsdp.yaml"
        path.write_text(RECIPE.format(demo=Path(args.demo).resolve(), devices=args.devices, steps=steps,
                                      state=args.state_dict))
        recipe = vlkit.load_recipe(path)
        if steps == 8:  # same run folder: drop the finished marker and the saved recipe, keep the checkpoint
            (run / "stage0-tune" / "done.json").unlink()
            (run / "recipe.yaml").write_text(recipe.to_yaml())
        summary = vlkit.fit(recipe, run)
        print(f"{steps} steps:", json.dumps(summary["val"]))
    _, model = vlkit.load_run(run)
    out = model.save_pretrained(folder / "export")
    print("exported to", out, "- reloaded:", type(vlkit.from_pretrained(out)).__name__)


if __name__ == "__main__":
    main()
