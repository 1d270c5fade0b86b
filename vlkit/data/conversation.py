"""Conversations, chat templates and label masks built from message structure (never string lengths).

A conversation is a list of :class:`Message`. A :class:`ChatTemplate` renders it as text *segments*, each
flagged trainable or not. The ids are the tokenization of the whole rendered string (what
``apply_chat_template``, vLLM or an exported model see: tokenizing segment by segment differs under
SentencePiece and merge-based BPE, e.g. ``"ASSISTANT: "`` + ``"Paris"``), and a token trains when its
characters (the tokenizer's offset mapping) overlap a trainable segment, so labels still follow message
boundaries. Each ``<image>`` becomes ``num_image_tokens`` copies of :data:`IMAGE_TOKEN_ID` (labels always
-100), tokenized like a special token: the text on either side never merges across it. The model later
replaces those positions with visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from vlkit.constants import IGNORE_INDEX, IMAGE_TOKEN_ID  # re-exported: their home is vlkit.constants
from vlkit.errors import DataError, RecipeError

IMAGE_PLACEHOLDER = "<image>"

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


def _image_stand_in(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A special token of ``tokenizer`` that stands in for each ``<image>`` while the whole string is tokenized
    (added tokens are split out before pre-tokenization, as an exported model's ``<image>`` token is), or
    None when it has none that matches its text exactly (no stripping, no normalization)."""
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if (getattr(token, "special", False) and not token.lstrip and not token.rstrip and not token.single_word
                and not token.normalized and token.content):
            return str(token.content)
    return None


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text`` tokenized as one string (no added bos/eos)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise RecipeError("label masks are computed from the tokenizer's character offsets, which this "
                          f"({type(tokenizer).__name__}) tokenizer cannot give; load a fast tokenizer "
                          "(tokenizer.json)", "model.llm.tokenizer") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


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
    The ids are the whole rendered conversation's tokenization; a token trains when its characters overlap
    a trainable segment (a token merging an assistant header's space with the answer trains).
    """
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    stand_in = _image_stand_in(tokenizer)
    marker = stand_in if stand_in is not None else IMAGE_PLACEHOLDER
    parts: list[str] = []
    train_spans: list[tuple[int, int]] = []
    image_starts: list[int] = []
    pos = 0
    for text, is_body, idx in template.segments(messages, tokenizer, add_generation_prompt):
        seg_start = pos
        for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                image_starts.append(pos)
                parts.append(marker)
                pos += len(marker)
            parts.append(piece)
            pos += len(piece)
        msg = messages[idx] if 0 <= idx < len(messages) else None
        if msg is not None and msg.trainable is not None:
            train = msg.trainable and (is_body or msg.role != "assistant")
        elif train_on == "all":
            train = True
        elif train_on == "last":
            train = is_body and idx == last_assistant
        else:
            train = is_body
        if train:
            train_spans.append((seg_start, pos))
    full = "".join(parts)
    trains = bytearray(len(full) + 1)
    for start, end in train_spans:
        trains[start:end] = b"\x01" * (end - start)
    for start in image_starts:
        trains[start:start + len(marker)] = b"\x00" * len(marker)

    # runs of text between images; with a stand-in token the whole string is one run
    runs = [(0, len(full))]
    if stand_in is None:
        bounds = [0, *[b for s in image_starts for b in (s, s + len(marker))], len(full)]
        runs = [(bounds[k], bounds[k + 1]) for k in range(0, len(bounds), 2)]
    images = set(image_starts)
    input_ids: list[int] = []
    labels: list[int] = []
    found = 0
    for k, (run_start, run_end) in enumerate(runs):
        if stand_in is None and k > 0:
            input_ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            found += 1
        if run_end <= run_start:
            continue
        ids, offsets = _encode(full[run_start:run_end], tokenizer)
        for token, (s, e) in zip(ids, offsets):
            s, e = s + run_start, e + run_start
            if stand_in is not None and s in images and e - s == len(marker):
                input_ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                found += 1
                continue
            input_ids.append(token)
            labels.append(token if (1 in trains[s:e] if e > s else trains[s]) else IGNORE_INDEX)
    if found != len(image_starts):
        raise RecipeError(f"the tokenizer split its special token {marker!r} (standing in for {IMAGE_PLACEHOLDER}) "
                          "into several tokens; use a tokenizer whose special tokens tokenize whole",
                          "model.llm.tokenizer")
    return input_ids, labels, len(image_starts)
