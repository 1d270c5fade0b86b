"""Time per new token of a HoVLE (holistic) model at prompt 64 vs 512 tokens, with and without the module's cache.

``uncached`` is the loop vlkit had before issue 16: the LLM keeps its key/value cache, but every new token
re-embeds the whole grown sequence (image + prompt + answer so far) with the holistic module. ``cached`` is
:meth:`vlkit.strategies.holistic.HolisticStrategy.generate`: the module keeps its own key/value cache and
runs only the new token. Both decode greedily with end-of-turn tokens switched off (every run makes exactly
``--new-tokens`` tokens); the time per new token is ``(t(N new tokens) - t(1 new token)) / (N - 1)``, so the
prompt's own embedding and prefill are left out. Rounds alternate between the two so that machine noise hits
both alike; the medians are printed with the 512/64 ratio per mode and the uncached/cached ratio per length.

    python benchmarks/holistic_generation.py [--recipe recipes/demo/hovle.yaml] [--demo data/demo]
        [--new-tokens 16] [--rounds 3] [--batch 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import vlkit
from vlkit.constants import IMAGE_TOKEN_ID

ROOT = Path(__file__).resolve().parents[1]


def uncached_generate(model: vlkit.VLM, input_ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                      max_new_tokens: int) -> torch.Tensor:
    """The pre-issue-16 loop: greedy, LLM cache, the whole sequence re-embedded by the module every step."""
    llm, strategy = model.llm, model.strategy
    stop = torch.tensor(llm.template.stop_token_ids(llm.tokenizer), dtype=torch.long, device=input_ids.device)
    pad = llm.tokenizer.pad_token_id or 0
    new = strategy.embed(model, input_ids, pixels, mask)
    past, tokens = None, []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        out = llm.model(inputs_embeds=new, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1).masked_fill(finished, pad)
        tokens.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        new = strategy.embed(model, input_ids, pixels, mask)[:, -1:]
    return torch.stack(tokens, dim=1)


def cached_generate(model: vlkit.VLM, input_ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                    max_new_tokens: int) -> torch.Tensor:
    return model.strategy.generate(model, input_ids, mask, pixels, max_new_tokens)


def prompt(model: vlkit.VLM, length: int, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    """``batch`` prompts of ``length`` positions: one image's tokens, then random text ids."""
    g = torch.Generator().manual_seed(length)
    n_image = model.num_image_tokens
    vocab = len(model.llm.tokenizer)
    text = torch.randint(5, vocab, (batch, length - n_image), generator=g)
    ids = torch.cat([torch.full((batch, n_image), IMAGE_TOKEN_ID), text], dim=1)
    size = model.encoders["holistic"].args.image_size
    pixels = torch.rand(batch, 3, size, size, generator=g)
    return ids.to(device), torch.ones_like(ids), pixels.to(device)


class ModuleTimer:
    """Wall time spent inside the holistic module's ``embed_sequence`` (wraps it on the instance)."""

    def __init__(self, encoder: torch.nn.Module, device: str) -> None:
        self.total, self.device, inner = 0.0, device, encoder.embed_sequence

        def embed_sequence(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(device)
            self.total += time.perf_counter() - start
            return out

        encoder.embed_sequence = embed_sequence


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, model, inputs, n: int, device: str, module: ModuleTimer) -> tuple[float, float]:
    """(whole generation, inside the module) seconds for ``n`` new tokens."""
    sync(device)
    module.total = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(model, *inputs, n)
    sync(device)
    assert out.shape[1] == n, out.shape
    return time.perf_counter() - start, module.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo/hovle.yaml"))
    parser.add_argument("--demo", default="data/demo", help="demo dataset folder, for its tokenizer (built if missing)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512], help="prompt lengths (positions)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    if not (demo / "tokenizer").exists():
        from vlkit.data.demo import build_demo

        build_demo(demo, train_scenes=200, val_scenes=100, shards=1, progress=False)
    torch.manual_seed(0)
    recipe = vlkit.load_recipe(args.recipe, [f"model.llm.tokenizer={demo}/tokenizer",
                                             f"model.llm.config.max_position_embeddings={max(args.lengths) * 2}"])
    model = vlkit.build_model(recipe).to(args.device).eval()
    model.llm.template.stop_token_ids = lambda tokenizer: []  # type: ignore[method-assign]  # exactly N tokens
    sides = {"uncached": uncached_generate, "cached": cached_generate}
    inputs = {n: prompt(model, n, args.batch, args.device) for n in args.lengths}
    for n in args.lengths:  # warm-up, and the two loops agree
        a, b = (fn(model, *inputs[n], 4) for fn in sides.values())
        assert torch.equal(a, b), "cached and uncached generation disagree"
    module = ModuleTimer(model.encoders["holistic"], args.device)
    keys = [(part, side, n) for part in ("total", "module") for side in sides for n in args.lengths]
    per_token: dict[tuple[str, str, int], list[float]] = {k: [] for k in keys}
    for _ in range(args.rounds):
        for n in args.lengths:
            for side, fn in sides.items():
                full = timed(fn, model, inputs[n], args.new_tokens, args.device, module)
                first = timed(fn, model, inputs[n], 1, args.device, module)
                for i, part in enumerate(("total", "module")):
                    per_token[part, side, n].append((full[i] - first[i]) / (args.new_tokens - 1))
    med = {k: statistics.median(v) * 1e3 for k, v in per_token.items()}
    lo, hi = min(args.lengths), max(args.lengths)
    print(f"holistic generation, {recipe.model.encoders[0]['depth']} module blocks of width "
          f"{recipe.model.encoders[0]['width']}, batch {args.batch}, {args.new_tokens} new tokens, device "
          f"{args.device}, {torch.get_num_threads()} threads; median ms per new token over {args.rounds} rounds")
    print(f"{'':>8} {'whole step (module + LLM)':^40} {'module only':^40}")
    header = f"{'uncached':>10} {'cached':>10} {'uncached/cached':>18}"
    print(f"{'prompt':>8} {header} {header}")
    for n in args.lengths:
        print(f"{n:>8}" + "".join(f" {med[p, 'uncached', n]:>10.2f} {med[p, 'cached', n]:>10.2f} "
                                  f"{med[p, 'uncached', n] / med[p, 'cached', n]:>18.2f}" for p in ("total", "module")))
    print(f"{f'{hi}/{lo}':>8}" + "".join(f" {med[p, 'uncached', hi] / med[p, 'uncached', lo]:>10.2f} "
                                         f"{med[p, 'cached', hi] / med[p, 'cached', lo]:>10.2f} {'':>18}"
                                         for p in ("total", "module")))


if __name__ == "__main__":
    main()
