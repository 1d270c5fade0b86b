"""How many tokens validation generates: enough for the longest reference answer of the validation set.

``eval.max_new_tokens`` left unset in a recipe becomes the number of tokens the model is trained to emit
for the longest validation answer: the answer and the chat template's end of turn, tokenized with the
model's tokenizer inside a rendered conversation (the label span of :func:`tokenize_conversation`), so no
reference answer is cut. An explicit recipe value wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vlkit.constants import IGNORE_INDEX
from vlkit.data.conversation import Message, tokenize_conversation

if TYPE_CHECKING:
    from vlkit.config import EvalConfig

FALLBACK = 32
"""``max_new_tokens`` when the validation set yields no answer to size it by."""


def answer_tokens(answer: str, tokenizer: Any, template: Any) -> int:
    """Trained tokens of ``answer`` as the last assistant turn: its tokens plus the end of turn."""
    _, labels, _ = tokenize_conversation([Message("user", "?"), Message("assistant", answer)], tokenizer,
                                         template, num_image_tokens=0)
    return sum(label != IGNORE_INDEX for label in labels)


def answer_budget(answers: Iterable[str], tokenizer: Any, template: Any) -> int | None:
    """The most :func:`answer_tokens` over ``answers`` (None for no answer). Answers are ranked by their
    tokens alone first; only those within 2 tokens of the longest are rendered in a conversation."""
    unique = sorted(set(answers))
    if not unique:
        return None
    alone = [len(ids) for ids in tokenizer(unique, add_special_tokens=False)["input_ids"]]
    longest = max(alone)
    return max(answer_tokens(a, tokenizer, template) for a, n in zip(unique, alone) if n >= longest - 2)


def with_answer_budget(eval_cfg: EvalConfig, model: Any, dataset: Any | None) -> EvalConfig:
    """``eval_cfg`` with ``max_new_tokens`` set: the recipe's value, else :func:`answer_budget` of the
    answers of ``dataset`` (the validation set; :data:`FALLBACK` without one)."""
    if eval_cfg.max_new_tokens is not None:
        return eval_cfg
    budget = None
    if dataset is not None:
        budget = answer_budget((a for _, a in dataset.iter_answers()), model.llm.tokenizer, model.llm.template)
    return dataclasses.replace(eval_cfg, max_new_tokens=budget or FALLBACK)
