"""Conversations, chat templates and label masks built from message structure (never string lengths).

A conversation is a list of :class:`Message`. A :class:`ChatTemplate` renders it as text *segments*, each
flagged trainable or not; segments are tokenized one by one, so labels follow message boundaries exactly.
Each ``<image>`` in a message becomes ``num_image_tokens`` copies of :data:`IMAGE_TOKEN_ID`, whose labels
are always -100; the model later replaces those positions with visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from vlkit.errors import DataError, RecipeError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200
"""Placeholder id for visual-token positions in ``input_ids`` (never looked up in an embedding table)."""
IGNORE_INDEX = -100

Role = Literal["system", "user", "assistant"]
TrainOn = Literal["assistant", "last", "all"]
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


@dataclass
class Message:
    """One turn. ``trainable`` overrides the masking policy for this message when not None."""

    role: Role
    content: str
    trainable: bool | None = None


def messages_from_llava(conversations: Sequence[dict]) -> list[Message]:
    """Convert LLaVA-style ``[{"from": "human", "value": ...}, {"from": "gpt", ...}]`` to messages."""
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "value" not in turn or ("from" not in turn and "role" not in turn):
            raise DataError(f"conversations[{i}] must be an object with 'from' and 'value', got {turn!r}")
        speaker = turn.get("from", turn.get("role"))
        role = _LLAVA_ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"conversations[{i}]: unknown speaker {speaker!r} "
                            f"(expected one of {sorted(_LLAVA_ROLES)})")
        if not isinstance(turn["value"], str):
            raise DataError(f"conversations[{i}].value must be a string, got {type(turn['value']).__name__}")
        out.append(Message(role, turn["value"]))
    return out


class ChatTemplate:
    """Renders messages as ``(text, trainable)`` segments; assistant content and end-of-turn train."""

    name: str

    def segments(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase,
                 add_generation_prompt: bool = False) -> list[tuple[str, bool, int]]:
        """``(text, is_assistant_body, message_index)`` for each segment, in order."""
        raise NotImplementedError

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids that end an assistant turn (generation stops at any of them)."""
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        vocab = tokenizer.get_vocab()
        for tok in self.stop_strings(tokenizer):
            if tok in vocab:
                ids.add(vocab[tok])
        return sorted(ids)

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"]


@dataclass
class FormatTemplate(ChatTemplate):
    """A chat format given by per-role format strings (``{content}``, ``{bos}``, ``{eos}`` substituted)."""

    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant_suffix: str
    bos: str = ""
    default_system: str | None = None
    stop: tuple[str, ...] = ()

    def _fmt(self, text: str, tokenizer: PreTrainedTokenizerBase, content: str = "") -> str:
        return text.format(content=content, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")

    def segments(self, messages, tokenizer, add_generation_prompt=False):
        segs: list[tuple[str, bool, int]] = []
        if self.bos:
            segs.append((self._fmt(self.bos, tokenizer), False, -1))
        if self.default_system is not None and (not messages or messages[0].role != "system"):
            segs.append((self._fmt(self.system, tokenizer, self.default_system), False, -1))
        for i, m in enumerate(messages):
            if m.role == "assistant":
                segs.append((self._fmt(self.assistant_prefix, tokenizer), False, i))
                segs.append((m.content + self._fmt(self.assistant_suffix, tokenizer), True, i))
            else:
                segs.append((self._fmt(getattr(self, m.role), tokenizer, m.content), False, i))
        if add_generation_prompt:
            segs.append((self._fmt(self.assistant_prefix, tokenizer), False, len(messages)))
        return [s for s in segs if s[0]]

    def stop_strings(self, tokenizer):
        return list(self.stop) or super().stop_strings(tokenizer)


_SENTINEL = "\uE000vlkit-content\uE000"  # private-use characters: never in a real message


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template, split into per-message segments.

    Segment boundaries come from rendering growing prefixes of the conversation, which requires the
    template to be prefix-stable (true of Llama 3, Qwen 2, Phi-3, SmolLM, ChatML templates). Templates that
    rewrite earlier turns are rejected with a pointer to the built-in templates.
    """

    name = "auto"

    def segments(self, messages, tokenizer, add_generation_prompt=False):
        def render(msgs: Sequence[Message], gen: bool) -> str:
            if not msgs:
                return ""
            return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                                 tokenize=False, add_generation_prompt=gen)

        def suffix(full: str, prefix: str) -> str:
            if not full.startswith(prefix):
                raise RecipeError(
                    "the tokenizer's chat template is not prefix-stable (rendering more messages changes "
                    f"earlier text), so labels cannot be masked per message; set model.llm.chat_template to "
                    f"one of {sorted(BUILTIN_TEMPLATES)}"
                )
            return full[len(prefix):]

        def opening_header(m: Message) -> str:
            # Templates refuse an empty conversation, so the header of an opening assistant turn is the
            # text before its content in a one-message render.
            text = render([Message(m.role, _SENTINEL)], False)
            return text[: text.index(_SENTINEL)] if _SENTINEL in text else ""

        segs: list[tuple[str, bool, int]] = []
        prev = ""
        for i, m in enumerate(messages):
            if m.role == "assistant":
                header = render(messages[:i], True) if i else opening_header(m)
                segs.append((suffix(header, prev), False, i))
                prev = header
            full = render(messages[: i + 1], False)
            segs.append((suffix(full, prev), m.role == "assistant", i))
            prev = full
        if add_generation_prompt:
            segs.append((suffix(render(messages, True), prev), False, len(messages)))
        return [s for s in segs if s[0]]


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        FormatTemplate("chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                       user="<|im_start|>user\n{content}<|im_end|>\n",
                       assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
                       stop=("<|im_end|>",)),
        FormatTemplate("llama3", bos="<|begin_of_text|>",
                       system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                       user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                       assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
                       assistant_suffix="<|eot_id|>", stop=("<|eot_id|>", "<|end_of_text|>")),
        FormatTemplate("phi3", system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
                       assistant_prefix="<|assistant|>\n", assistant_suffix="<|end|>\n",
                       stop=("<|end|>", "<|endoftext|>")),
        FormatTemplate("vicuna", bos="{bos}", system="{content} ", user="USER: {content} ",
                       assistant_prefix="ASSISTANT: ", assistant_suffix="{eos}",
                       default_system="A chat between a curious human and an artificial intelligence "
                       "assistant. The assistant gives helpful, detailed, and polite answers to the "
                       "human's questions."),
        FormatTemplate("plain", system="", user="{content}", assistant_prefix="", assistant_suffix="\n{eos}"),
    ]
}


def get_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """A built-in template by name, or ``auto``: the tokenizer's own template."""
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(f"chat_template 'auto' needs a tokenizer with its own chat template, and this one "
                              f"has none; pick one of {sorted(BUILTIN_TEMPLATES)}", "model.llm.chat_template")
        return TokenizerTemplate()
    if name not in BUILTIN_TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN_TEMPLATES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown chat template {name!r}.{hint} Choose 'auto' (the tokenizer's own) or one of "
                          f"{sorted(BUILTIN_TEMPLATES)}", "model.llm.chat_template")
    return BUILTIN_TEMPLATES[name]


def _tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> tuple[list[int], int]:
    ids: list[int] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for j, piece in enumerate(pieces):
        if j > 0:
            ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids, len(pieces) - 1


def tokenize_conversation(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    num_image_tokens: int,
    train_on: TrainOn = "assistant",
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int], int]:
    """Token ids, labels (-100 where masked) and number of images of a conversation.

    ``train_on``: ``assistant`` (every assistant turn), ``last`` (only the last assistant turn) or ``all``
    (every text token). A message's own ``trainable`` flag takes precedence. Image tokens never train.
    """
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    input_ids: list[int] = []
    labels: list[int] = []
    n_images = 0
    for text, is_body, idx in template.segments(messages, tokenizer, add_generation_prompt):
        ids, n = _tokenize_text(text, tokenizer, num_image_tokens)
        n_images += n
        msg = messages[idx] if 0 <= idx < len(messages) else None
        if msg is not None and msg.trainable is not None:
            train = msg.trainable and (is_body or msg.role != "assistant")
        elif train_on == "all":
            train = True
        elif train_on == "last":
            train = is_body and idx == last_assistant
        else:
            train = is_body
        input_ids.extend(ids)
        labels.extend(i if train and i != IMAGE_TOKEN_ID else IGNORE_INDEX for i in ids)
    return input_ids, labels, n_images
