"""Florence-2 tokenization without a download: a word-level tokenizer and processor built offline for
random-init encoders, and the prompt token ids a (real or offline) Florence-2 processor gives."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vlkit.encoders._florence2.prompts import TASKS, TASKS_WITH_INPUT, error, expand_prompt
from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
"""Special tokens of the offline tokenizer, at BART's ids (bos 0, pad 1, eos 2, unk 3) plus ``<image>``."""


def build_tokenizer(texts: Iterable[str] = ()) -> Any:
    """A word-level Florence-2-compatible tokenizer built offline (no download).

    Its vocabulary is :data:`SPECIAL_TOKENS` (BART ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then
    ``<image>``), the words of every Florence-2 task prompt (fixed order, so ids do not depend on the
    recipe), then the new words of ``texts`` in sorted order. ``image_token`` is ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()

    def words(text: str) -> list[str]:
        return [w for w, _ in splitter.pre_tokenize_str(text)]

    base: list[str] = []
    for sentence in [*TASKS.values(), *(t.format(input="") for t in TASKS_WITH_INPUT.values())]:
        base += [w for w in words(sentence) if w not in base]
    extra = sorted({w for text in texts for w in words(expand_prompt(text))} - set(base) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *base, *extra])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer: Any, image_size: int, num_image_tokens: int,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """A ``Florence2Processor`` (CLIP image processor: resize to ``image_size``, normalise) around ``tokenizer``.

    ``num_image_tokens`` is the number of ``<image>`` placeholders the processor writes per image (the
    projected DaViT features, pooled token included: ``grid**2 + 1``).
    """
    from transformers import CLIPImageProcessor, Florence2Processor

    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                         image_mean=list(mean), image_std=list(std))
    image_processor.image_seq_length = num_image_tokens
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


def tokenize_prompts(processor: Any, texts: Sequence[str], strict_vocab: bool = False) -> list[list[int]]:
    """Token ids of ``<s> prompt </s>`` for each prompt, as the Florence-2 processor builds them for an image
    (task tokens expanded, image placeholders removed). ``strict_vocab``: an unknown word is an error."""
    from PIL import Image

    if not texts:
        return []
    tokenizer = processor.tokenizer
    image_id = getattr(tokenizer, "image_token_id", None)
    blank = Image.new("RGB", (32, 32))
    out = []
    for text in texts:
        try:
            ids = processor(text=[text], images=[blank])["input_ids"][0]
        except ValueError as exc:
            raise error(f"the Florence-2 processor rejects the prompt {text!r}: {exc}",
                         "prompts") from exc
        ids = [int(i) for i in ids if int(i) != image_id]
        if strict_vocab and tokenizer.unk_token_id in ids:
            raise error(f"the offline tokenizer does not cover the prompt {text!r}",
                         "prompts")
        out.append(ids)
    return out
