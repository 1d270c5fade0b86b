"""Peak memory of one training step with activation checkpointing off and on, side by side.

A mid-size random-init VLM (CLIP ViT encoder + Llama-shaped LLM, both trained) runs one forward + backward
step in a fresh subprocess per setting (``gradient_checkpointing`` on the encoder and the LLM). Memory is
CUDA's max allocated bytes when a GPU is there, else the process's peak RSS above what it held before the
step (model, inputs and optimizer-free weights already loaded).

    python benchmarks/memory.py [--batch 8] [--length 512] [--width 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from vlkit.registry import ENCODERS, LLMS
a = json.loads(sys.argv[1]); on = a["on"]
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
enc = ENCODERS.build({"name": "clip", "gradient_checkpointing": on, "config": {"embed_dim": a["width"],
      "vision_cfg": {"image_size": 224, "patch_size": 16, "width": a["width"], "layers": a["layers"],
      "heads": a["width"] // 64}}}, "model.encoders[0]").to(dev).train()
llm = LLMS.build({"name": "hf_causal", "tokenizer": a["tokenizer"], "gradient_checkpointing": on,
      "config": {"model_type": "llama", "hidden_size": a["width"], "intermediate_size": 4 * a["width"],
      "num_hidden_layers": a["layers"], "num_attention_heads": a["width"] // 64, "num_key_value_heads":
      a["width"] // 64, "max_position_embeddings": 4096}}, "model.llm").to(dev).train()
proj = torch.nn.Linear(a["width"], a["width"]).to(dev)
pixels = torch.rand(a["batch"], 3, 224, 224, device=dev)
ids = torch.randint(0, 100, (a["batch"], a["length"]), device=dev)
def kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = kib() * 1024
visual = proj(enc(enc.prepare(pixels))["tokens"])
embeds = torch.cat([visual, llm.embed(ids)], 1)
mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
labels = torch.cat([torch.full(visual.shape[:2], -100, device=dev), ids], 1)
llm(embeds, mask, labels=labels).loss.backward()
peak = torch.cuda.max_memory_allocated() if dev == "cuda" else kib() * 1024
print(json.dumps({"peak_bytes": peak - base, "device": dev}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a demo one built in /tmp)")
    args = parser.parse_args()
    tokenizer = args.tokenizer
    if tokenizer is None:
        import tempfile
        from pathlib import Path

        from vlkit.data.demo import build_demo

        out = Path(tempfile.mkdtemp()) / "demo"
        build_demo(out, train_scenes=10, val_scenes=10, seed=0, shards=1, digit_repeats=1, progress=False)
        tokenizer = str(out / "tokenizer")
    results = {}
    for on in (False, True):
        payload = json.dumps({**vars(args), "tokenizer": tokenizer, "on": on})
        done = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True)
        results[on] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = results[False]["peak_bytes"], results[True]["peak_bytes"]
    what = "CUDA max allocated" if results[False]["device"] == "cuda" else "peak RSS growth"
    print(f"one training step, batch {args.batch} x ({196} visual + {args.length} text) tokens, width {args.width}, "
          f"{args.layers}+{args.layers} layers; {what}")
    print(f"{'checkpointing off':>20}: {off / 2**20:9.1f} MiB")
    print(f"{'checkpointing on':>20}: {on / 2**20:9.1f} MiB")
    print(f"{'ratio on/off':>20}: {on / off:9.3f}")


if __name__ == "__main__":
    main()
