"""Cost of Florence-VL's breadth streams: depth + 3 prompts vs depth + 1 prompt vs 3 separate full passes.

The ``florence2`` encoder runs DaViT once per image and all prompts through the text encoder as one
batched call. This script times, side by side in one run on the same random-init weights and images:

* ``depth only``          DaViT + projection (V)
* ``depth + 1 prompt``    V, then the text encoder for one prompt
* ``depth + 3 prompts``   V once, then the text encoder for three prompts in one batched call (vlkit)
* ``3 separate passes``   per prompt, DaViT + projection + text encoder again (Florence-2 run once per prompt)

and prints the ratios. Modes are interleaved round by round so machine noise hits them alike; each time is
the median over rounds. The default ``davit`` preset is a size where DaViT dominates (Florence-2-base's
DaViT with a 2-layer text encoder; 384 px by default, which keeps a CPU run to a few minutes); ``base``
and ``large`` keep Florence-2's own text encoders (6 and 12 layers), where the text encoder's share, and
so the cost of each extra prompt, is larger.

    python benchmarks/florence_streams.py [--preset davit|base|large] [--image-size 384] [--batch 1]
                                          [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from vlkit.encoders.florence2 import Florence2Encoder
from vlkit.registry import ENCODERS

PROMPTS = ["detailed_caption", "ocr", "dense_region_caption"]

_DAVIT_BASE = {"depths": [1, 1, 9, 1], "embed_dim": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32],
               "num_groups": [4, 8, 16, 32], "window_size": 12, "projection_dim": 768, "drop_path_rate": 0.0}
_DAVIT_LARGE = {**_DAVIT_BASE, "embed_dim": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64],
                "num_groups": [8, 16, 32, 64], "projection_dim": 1024}


def _text(d_model: int, layers: int, heads: int) -> dict[str, Any]:
    return {"vocab_size": 128, "d_model": d_model, "encoder_layers": layers, "encoder_attention_heads": heads,
            "encoder_ffn_dim": 4 * d_model, "decoder_layers": 1, "decoder_attention_heads": heads,
            "decoder_ffn_dim": 4 * d_model, "max_position_embeddings": 1024, "dropout": 0.0}


PRESETS: dict[str, dict[str, Any]] = {
    "davit": {"vision_config": _DAVIT_BASE, "text_config": _text(768, 2, 12)},
    "base": {"vision_config": _DAVIT_BASE, "text_config": _text(768, 6, 12)},
    "large": {"vision_config": _DAVIT_LARGE, "text_config": _text(1024, 12, 16)},
}
"""Random-init Florence-2 configs: Florence-2-base/large DaViT and text-encoder shapes."""


def build(preset: str, image_size: int, device: str, dtype: torch.dtype) -> Florence2Encoder:
    enc = ENCODERS.build({"name": "florence2", "config": PRESETS[preset], "image_size": image_size,
                          "prompts": PROMPTS})
    return enc.to(device=device, dtype=dtype).eval()


def modes(enc: Florence2Encoder) -> dict[str, Callable[[torch.Tensor], Any]]:
    def depth_only(x: torch.Tensor) -> Any:
        return enc.image_features(x)[0]

    def one_prompt(x: torch.Tensor) -> Any:
        visual = enc.image_features(x)[0]
        return visual, enc.encode_prompts(visual, [0])

    def three_prompts(x: torch.Tensor) -> Any:
        return enc(x)  # the encoder's own forward: DaViT once, one batched text-encoder call

    def separate(x: torch.Tensor) -> Any:
        out = []
        for i in range(len(PROMPTS)):
            visual = enc.image_features(x)[0]  # recomputed for every prompt
            out.append(enc.encode_prompts(visual, [i]))
        return out

    return {"depth only": depth_only, "depth + 1 prompt": one_prompt, "depth + 3 prompts": three_prompts,
            "3 separate passes": separate}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(enc: Florence2Encoder, x: torch.Tensor, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each mode, modes interleaved within every round (after one warm-up)."""
    fns = modes(enc)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn(x)
        for _ in range(rounds):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn(x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="davit")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    enc = build(args.preset, args.image_size, args.device, dtype)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    vision = sum(p.numel() for p in enc.vision_tower.parameters()) + sum(p.numel() for p in enc.projector.parameters())
    assert enc.text_encoder is not None
    text = sum(p.numel() for p in enc.text_encoder.parameters())
    print(f"preset {args.preset}: DaViT+projection {vision / 1e6:.1f}M params, text encoder {text / 1e6:.1f}M "
          f"params; {args.image_size} px -> {enc.grid}x{enc.grid} grid ({enc.grid ** 2 + 1} image tokens), "
          f"prompt lengths {enc.prompt_mask.sum(1).tolist()}; batch {args.batch}, {args.device} {args.dtype}, "
          f"median of {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    t = measure(enc, x, args.rounds, args.device)
    width = max(map(len, t))
    for name, seconds in t.items():
        print(f"  {name:<{width}}  {seconds * 1000:9.1f} ms   {seconds / t['depth + 1 prompt']:5.2f}x depth + 1 prompt")
    r1 = t["depth + 3 prompts"] / t["depth + 1 prompt"]
    r2 = t["3 separate passes"] / t["depth + 3 prompts"]
    share = t["depth only"] / t["depth + 1 prompt"]
    print(f"DaViT share of depth + 1 prompt: {share:.0%}")
    print(f"depth + 3 prompts / depth + 1 prompt = {r1:.2f}x  (target <= 1.6x: {'ok' if r1 <= 1.6 else 'MISSED'})")
    print(f"3 separate passes / depth + 3 prompts = {r2:.2f}x  (target >= 2x: {'ok' if r2 >= 2 else 'MISSED'})")
    return {"depth3_over_depth1": r1, "separate_over_depth3": r2, **t}


if __name__ == "__main__":
    main()
