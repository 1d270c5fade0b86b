"""Florence-2's prompt grammar: task names, task tokens, tasks with input, free text and named prompt streams
(the ``prompts:`` argument of the ``florence2`` encoder)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from vlkit.errors import RecipeError

TASKS: dict[str, str] = {
    "ocr": "What is the text in the image?",
    "ocr_with_region": "What is the text in the image, with regions?",
    "caption": "What does the image describe?",
    "detailed_caption": "Describe in detail what is shown in the image.",
    "more_detailed_caption": "Describe with a paragraph what is shown in the image.",
    "od": "Locate the objects with category name in the image.",
    "dense_region_caption": "Locate the objects in the image, with their descriptions.",
    "region_proposal": "Locate the region proposals in the image.",
}
"""Florence-2 tasks without input: recipe name -> the text the processor expands ``<NAME>`` to."""

TASKS_WITH_INPUT: dict[str, str] = {
    "caption_to_phrase_grounding": "Locate the phrases in the caption: {input}",
    "referring_expression_segmentation": "Locate {input} in the image with mask",
    "region_to_segmentation": "What is the polygon mask of region {input}",
    "open_vocabulary_detection": "Locate {input} in the image.",
    "region_to_category": "What is the region {input}?",
    "region_to_description": "What does the region {input} describe?",
    "region_to_ocr": "What text is in the region {input}?",
}
"""Florence-2 tasks that take an input, written in a prompt as ``"<TASK_TOKEN> input"``."""

DEFAULT_PROMPTS: tuple[str, ...] = ("detailed_caption", "ocr", "dense_region_caption")
"""Florence-VL's breadth prompts."""

_TASK_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TASK_TOKEN = re.compile(r"<([A-Z][A-Z0-9_]*)>")
_STREAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PromptSpec:
    """One breadth prompt: the stream it produces and the text handed to the Florence-2 processor."""

    name: str
    """Stream name (``detailed_caption``, or the name given in ``{name: text}``, or ``prompt<i>``)."""
    text: str
    """Processor input: a task token (``<DETAILED_CAPTION>``), ``<TASK> input``, or free text."""


def error(message: str, arg: str | None = None) -> RecipeError:
    """A RecipeError whose message names the encoder and its argument (the registry adds the encoder's key)."""
    return RecipeError(f"florence2 encoder: `{arg}`: {message}" if arg else f"florence2 encoder: {message}")


def _task_hint(word: str) -> str:
    close = difflib.get_close_matches(word, [*TASKS, *TASKS_WITH_INPUT], n=2, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def parse_prompt(entry: str | dict[str, str], index: int) -> PromptSpec:
    """Turn one ``prompts:`` entry into a :class:`PromptSpec`; RecipeError naming ``prompts[index]`` if invalid.

    Entries: a task name (``detailed_caption``), a task token (``<OCR>``), a task with input
    (``"<OPEN_VOCABULARY_DETECTION> red car"``), free text with spaces (stream ``prompt<index>``), or a
    one-key mapping ``{stream_name: any of those}``.
    """
    key = f"prompts[{index}]"
    name: str | None = None
    if isinstance(entry, dict):
        if len(entry) != 1:
            raise error(f"a named prompt is a one-key mapping {{stream_name: text}}, got "
                         f"{entry!r}", key)
        ((name, text),) = entry.items()
        if not isinstance(name, str) or not _STREAM_NAME.fullmatch(name):
            raise error(f"prompt stream name {name!r} must be an identifier "
                         f"(letters, digits, _)", key)
        if not isinstance(text, str):
            raise error(f"prompt {name!r} must be text, got {text!r}", key)
    else:
        text = entry
    text = text.strip()
    if not text:
        raise error("empty prompt", key)
    token = _TASK_TOKEN.match(text)
    if _TASK_NAME.fullmatch(text):  # a bare lower-case word is a task name, never free text
        if text not in TASKS:
            extra = (f" '{text}' needs an input: write \"<{text.upper()}> your input\"" if text in TASKS_WITH_INPUT
                     else "")
            raise error(
                f"unknown Florence-2 task {text!r}.{_task_hint(text)}{extra} Tasks: "
                f"{', '.join(TASKS)}. Free-text prompts are sentences (e.g. 'What is in the image?') or "
                f"{{name: text}} mappings", key)
        return PromptSpec(name or text, f"<{text.upper()}>")
    if token is not None:
        task = token.group(1).lower()
        rest = text[token.end():].strip()
        if task in TASKS:
            if rest:
                raise error(f"task token <{task.upper()}> takes no input; got {text!r}",
                             key)
            return PromptSpec(name or task, f"<{task.upper()}>")
        if task in TASKS_WITH_INPUT:
            if not rest:
                raise error(f"task <{task.upper()}> needs an input after the token, "
                             f"e.g. \"<{task.upper()}> a red car\"", key)
            return PromptSpec(name or f"prompt{index}", f"<{task.upper()}> {rest}")
        raise error(f"unknown Florence-2 task token <{task.upper()}>.{_task_hint(task)}",
                     key)
    return PromptSpec(name or f"prompt{index}", text)


def expand_prompt(text: str) -> str:
    """The text Florence2Processor makes of a prompt (task token -> its sentence); for vocabulary building."""
    token = _TASK_TOKEN.match(text)
    if token is None:
        return text
    task = token.group(1).lower()
    if task in TASKS:
        return TASKS[task]
    if task in TASKS_WITH_INPUT:
        return TASKS_WITH_INPUT[task].format(input=text[token.end():].strip())
    return text
