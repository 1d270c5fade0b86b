"""Generation options shared by ``predict``, ``chat``, ``serve`` and Python: one dataclass, one ``generate``.

``temperature: 0`` (the default) decodes greedily (beam search with ``num_beams > 1``); a positive
temperature samples, with ``top_p`` nucleus filtering and a ``seed`` that makes the draw repeatable without
touching the global random state. ``stop`` strings end an answer and are cut from it (as OpenAI's API does).
Prompts of mixed lengths are batched with left padding and give the answers they give one at a time.

This module imports no torch at import time (the command line builds its options from it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from vlkit.data.conversation import Message
    from vlkit.model import VLM


class GenerationError(VlkitError, ValueError):
    """Generation options that cannot be used (out of range, or not supported by this model)."""


@dataclass
class GenerationOptions:
    """How to decode an answer."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    """0: greedy (or beam search); > 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (sampling only)."""
    top_k: int | None = None
    num_beams: int = 1
    seed: int | None = None
    """Seed of the sampling draw (None: the current global random state)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer; the answer is cut before the first one."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be at least 1, got {self.top_k}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be at least 1, got {self.num_beams}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def hf_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Keyword arguments of transformers' ``generate`` (through ``VLM.generate``)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        if self.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(tokenizer, self.stop)])
        return kwargs

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (stripped)."""
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(ends)] if ends else text).strip()


class _StopStrings:
    """A transformers stopping criterion: a row is done once its decoded new tokens contain a stop string.

    transformers' own ``StopStringCriteria`` maps tokens back to byte strings and fails on word-level
    tokenizers (such as the demo's), so this decode-and-search one is kept.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation options as command-line flags (``--max-new-tokens``, ``--temperature`` ...)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=GenerationOptions.max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (greedy decoding)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling draw")
    g.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")


def from_arguments(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             num_beams=args.num_beams, seed=args.seed, stop=list(args.stop))


def generate(model: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
             options: GenerationOptions | None = None, streamer: Any = None) -> list[str]:
    """Answers to a left-padded prompt batch (``VLMProcessor.collate(..., padding_side="left")``)."""
    import torch

    options = options or GenerationOptions()
    kwargs = options.hf_kwargs(model.llm.tokenizer)
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise GenerationError("streaming generates one prompt at a time")
        kwargs["streamer"] = streamer
    with torch.random.fork_rng(devices=[input_ids.device] if input_ids.is_cuda else []):
        if options.seed is not None:
            torch.manual_seed(options.seed)
        try:
            texts = model.generate(input_ids, attention_mask, pixel_values, **kwargs)
        except ValueError as exc:  # options this model's generation refuses (e.g. sampling a holistic model)
            raise GenerationError(f"cannot generate with {options}: {exc}") from exc
    return [options.cut(t) for t in texts]


def prompt_batch(model: VLM, conversations: Sequence[Sequence[Message]],
                 images: Sequence[Image.Image | None]) -> dict[str, Any]:
    """Left-padded prompt batch (generation prompt appended) of conversations with at most one image each."""
    processor = model.processor(max_length=1 << 20)
    features = [processor.prompt_features(list(c), image) for c, image in zip(conversations, images)]
    batch = processor.collate(features, padding_side="left")
    device = next(model.parameters()).device
    pixels = batch["pixel_values"]
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": None if pixels is None else pixels.to(device)}


def answer(model: VLM, images: Sequence[Image.Image | None], questions: Sequence[str],
           options: GenerationOptions | None = None, batch_size: int = 16) -> list[str]:
    """One answer per (image or None, question), ``batch_size`` prompts per generate call."""
    from vlkit.data.conversation import Message

    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        batch = prompt_batch(model, [[Message("user", q)] for q in questions[chunk]], list(images[chunk]))
        answers += generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], options)
    return answers
