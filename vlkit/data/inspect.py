"""``vlkit data inspect``: samples as the model sees them, through the recipe's own data path.

The samples come from the dataset's loader (shuffle, task filters, instructions, ``max_length``,
``train_on`` and ``overflow`` as in training) and are shown as tokens: the text that trains highlighted,
every image as its block of visual tokens, and the truncation applied. Nothing trains and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from vlkit.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vlkit.errors import RecipeError

if TYPE_CHECKING:
    from vlkit.config import Recipe

TRAINED_STYLE = "bold black on green"
IMAGE_STYLE = "bold magenta"


@dataclass
class Shown:
    """One sample as the model sees it: its runs of ``(kind, ids)`` with ``kind`` in ``text``, ``trained``,
    ``image``, in order; plus where it came from and what the processor did to it."""

    key: str
    url: str | None
    runs: list[tuple[str, list[int]]]
    truncated: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_tokens(self) -> list[int]:
        """Visual tokens of each image, in order."""
        return [len(ids) for kind, ids in self.runs if kind == "image"]

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.runs)

    @property
    def num_trained(self) -> int:
        return sum(len(ids) for kind, ids in self.runs if kind == "trained")


def _runs(ids: list[int], labels: list[int]) -> list[tuple[str, list[int]]]:
    runs: list[tuple[str, list[int]]] = []
    for token, label in zip(ids, labels):
        kind = "image" if token == IMAGE_TOKEN_ID else ("text" if label == IGNORE_INDEX else "trained")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return runs


def _dataset_section(recipe: Recipe, split: str, stage: str | None) -> tuple[dict[str, Any], str]:
    """The recipe section of the dataset to read and its key path (a stage's ``data`` merges into train's)."""
    if split == "val":
        if recipe.data.val is None:
            raise RecipeError("the recipe has no validation data; use --split train", "data.val")
        return dict(recipe.data.val), "data.val"
    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise RecipeError(f"no stage named {stage!r}; stages: {', '.join(names)}", "stages")
    index = names.index(stage) if stage is not None else 0
    overrides = recipe.stages[index].data
    if not overrides:
        return dict(recipe.data.train), "data.train"
    if overrides.get("name", recipe.data.train["name"]) != recipe.data.train["name"]:
        return dict(overrides), f"stages[{index}].data"
    return {**recipe.data.train, **overrides}, f"stages[{index}].data"


def iter_samples(recipe: Recipe, model: Any, split: str = "train", stage: str | None = None
                 ) -> Iterator[Shown]:
    """The samples of a split in the order the model gets them (training: the stage's data seed)."""
    from vlkit.data.base import stage_data_seed
    from vlkit.data.packing import sample_spans
    from vlkit.registry import DATASETS

    section, where = _dataset_section(recipe, split, stage)
    dataset = DATASETS.build(section, where)
    processor = model.processor()
    if split == "val":
        loader = dataset.val_loader(processor)
    else:
        stage_name = stage or recipe.stages[0].name
        loader = dataset.train_loader(processor, seed=stage_data_seed(recipe.seed, stage_name))
    for batch in loader:
        tokens = batch["loss_batch"] if split == "val" else batch  # validation: the whole conversations
        keys = batch.get("__key__") or [f"#{i}" for i in range(len(tokens["input_ids"]))]
        urls = batch.get("__url__") or [None] * len(keys)
        truncated = tokens.get("truncated") or [0] * len(keys)
        types = batch.get("type") or [None] * len(keys)
        spans = sample_spans(tokens)  # a packed batch (data.train.packing) holds several samples per row
        for i, key in enumerate(keys):
            row, at = spans[i]
            ids = tokens["input_ids"][row][at].tolist()
            labels = tokens["labels"][row][at].tolist()
            yield Shown(str(key), urls[i], _runs(ids, labels), int(truncated[i] or 0), {"type": types[i]})


def render(shown: Shown, tokenizer: Any, number: int, max_length: int, overflow: str) -> list[Any]:
    """Rich renderables of one sample: a header, the token stream (trained text highlighted, images as
    their visual-token blocks, newlines shown as ``↵``) and the trained text on its own."""
    images = shown.image_tokens
    image_desc = (f"{len(images)} image(s): " + ", ".join(f"image {j + 1}: {n} visual tokens"
                                                           for j, n in enumerate(images))) if images else "no image"
    cut = (f"truncated: {shown.truncated} tokens cut (overflow: {overflow}, max_length {max_length})"
           if shown.truncated else f"not truncated (max_length {max_length})")
    where = f" in {shown.url}" if shown.url else ""
    qtype = f" type {shown.extra['type']}" if shown.extra.get("type") else ""
    header = Text(f"sample {number}: {shown.key}{where}{qtype}\n", style="bold")
    header.append(f"{shown.num_tokens} tokens, {shown.num_trained} trained; {image_desc}; {cut}")
    body = Text()
    trained: list[str] = []
    image_no = 0
    for kind, ids in shown.runs:
        if kind == "image":
            image_no += 1
            body.append(f"[image {image_no}: {len(ids)} tokens]", style=IMAGE_STYLE)
            continue
        text = tokenizer.decode(ids)
        if kind == "trained":
            trained.append(text)
        body.append(text.replace("\n", "↵\n"), style=TRAINED_STYLE if kind == "trained" else None)
    tail = Text("trained: ", style="bold")
    tail.append(" | ".join(repr(t) for t in trained) or "(nothing)")
    return [header, body, tail, Text("")]


def inspect_recipe(recipe: Recipe, model: Any, split: str = "train", n: int = 3, stage: str | None = None,
                   console: Console | None = None) -> list[Shown]:
    """Print the first ``n`` samples of ``split`` as ``model`` (the recipe's, built by the caller) sees them;
    return them."""
    from vlkit.registry import DATASETS

    if n < 1:
        raise RecipeError(f"-n must be at least 1, got {n}")
    console = console or Console()
    section, where = _dataset_section(recipe, split, stage)
    args = DATASETS.build(section, where).processor_args
    legend = Text("legend: ")
    legend.append("trained text", style=TRAINED_STYLE)
    legend.append(", masked text (-100), ")
    legend.append("[image k: N tokens]", style=IMAGE_STYLE)
    legend.append(f"; chat template {getattr(model.llm.template, 'name', '?')}, train_on: {args.train_on}")
    console.print(legend, soft_wrap=True)
    out = []
    for shown in iter_samples(recipe, model, split, stage):
        out.append(shown)
        for part in render(shown, model.llm.tokenizer, len(out), args.max_length, args.overflow):
            console.print(part, soft_wrap=True)
        if len(out) >= n:
            break
    return out
