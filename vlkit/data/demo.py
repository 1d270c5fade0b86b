"""The offline demo dataset: procedurally drawn shape scenes and handwritten digits, plus its tokenizer.

Small enough that a tiny VLM trained from scratch on a laptop CPU learns it in minutes, and built
without any download (digits come with scikit-learn). Every scene is drawn on white: one to three
non-overlapping shapes, each with a distinct (shape, colour) pair and one per horizontal third of the
image. Questions have one-word, lower-case answers:

==========  ==================================  =================================
type        question                            answers
==========  ==================================  =================================
color       What color is the circle?           red, green, blue, yellow, ...
shape       What shape is the red object?       circle, square, triangle, cross
count       How many shapes are there?          one, two, three
presence    Is there a blue square?             yes, no
position    Where is the green triangle?        left, middle, right
digit       What digit is this?                 0 ... 9
==========  ==================================  =================================

Training samples are multi-turn (3-5 questions about one scene, task ``vqa``), captions ("Describe the
image." -> "a red circle on the left and a blue square on the right.", task ``caption``) and single-turn
digits (held-out digit images never appear in training). Validation samples ask one question each, with
the answers of every type exactly balanced, so a model that ignores the image scores about 0.28.

A second task, in shards of its own (``box-000000.tar`` for training, ``box_val-000000.tar``), asks for
the bounding box of a named shape: "Where is the red circle?" -> "[0.05, 0.31, 0.30, 0.58]" (``[x0, y0,
x1, y1]`` normalised to [0, 1], 2 decimals; task and type ``box``). Its question is the one the
``position`` type answers with a word, so a model can only tell the two apart by a task instruction (see
:mod:`vlkit.data.mix`). The box samples come from an RNG stream of their own: the other shards are the
same with or without them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlkit.data.shards import INDEX_FILE, SplitWriter, prepare_out_dir, write_index
from vlkit.errors import DataError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 195, 0),
    "purple": (140, 50, 190),
    "orange": (255, 125, 0),
}
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
COUNTS: tuple[str, ...] = ("one", "two", "three")
SCENE_TYPES: tuple[str, ...] = ("color", "shape", "count", "presence", "position")
QUESTION_TYPES: tuple[str, ...] = (*SCENE_TYPES, "digit")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "presence": ("yes", "no"),
    "position": POSITIONS,
    "digit": tuple(str(d) for d in range(10)),
}
"""Every possible answer of each question type."""
BOX_TYPE = "box"
"""Task and question type of the box samples."""
DIGIT_QUESTION = "What digit is this?"
CAPTION_QUESTION = "Describe the image."
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""
def _a(word: str) -> str:
    """``word`` with its indefinite article: ``a red``, ``an orange``."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


_PLACE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_SUPERSAMPLE = 2


# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Shape:
    """One object of a scene: its shape, colour and horizontal third (0 left, 1 middle, 2 right)."""

    shape: str
    color: str
    slot: int

    @property
    def position(self) -> str:
        return POSITIONS[self.slot]


@dataclass
class Scene:
    """1-3 shapes with distinct (shape, colour) pairs, one per third; ``geometry`` jitters the drawing."""

    objects: list[Shape]
    geometry: list[tuple[float, float, float]] = field(default_factory=list)
    """Per object: (x jitter, vertical centre, size), as fractions of the image size."""

    def combos(self) -> set[tuple[str, str]]:
        return {(o.shape, o.color) for o in self.objects}


def _scene(rng: random.Random, n: int, required: tuple[str, str] | None = None,
           required_slot: int | None = None, allow: Any = None) -> Scene:
    """A random scene of ``n`` objects, containing ``required`` (at ``required_slot`` if given); every
    other object satisfies ``allow(shape, color)``."""
    combos = [(s, c) for s in SHAPES for c in COLORS
              if (s, c) != required and (allow is None or allow(s, c))]
    picked = ([required] if required else []) + rng.sample(combos, n - (1 if required else 0))
    if required is not None and required_slot is not None:
        slots = [required_slot, *rng.sample([s for s in range(3) if s != required_slot], n - 1)]
    else:
        slots = rng.sample(range(3), n)
    objects = [Shape(s, c, slot) for (s, c), slot in zip(picked, slots)]
    geometry = [(rng.uniform(-0.02, 0.02), rng.uniform(0.3, 0.7), rng.uniform(0.24, 0.3)) for _ in objects]
    order = sorted(range(n), key=lambda i: objects[i].slot)
    return Scene([objects[i] for i in order], [geometry[i] for i in order])


def draw_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene (drawn at 2x and downsampled, so edges are smooth)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj, (dx, cy, s) in zip(scene.objects, scene.geometry):
        x = ((obj.slot + 0.5) / 3 + dx) * big
        y = cy * big
        r = s * big / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            q = r * 0.86
            draw.rectangle((x - q, y - q, x + q, y + q), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        elif obj.shape == "cross":
            t = r * 0.36
            draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
        else:  # pragma: no cover - SHAPES is fixed
            raise ValueError(obj.shape)
    return image.resize((size, size), Image.Resampling.BOX)


def caption(scene: Scene) -> str:
    """``a red circle on the left, an orange square in the middle and a green cross on the right.``"""
    parts = [f"{_a(o.color)} {o.shape} {_PLACE[o.position]}" for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def object_box(scene: Scene, index: int) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of object ``index`` as :func:`draw_scene` draws it, normalised to [0, 1]."""
    obj = scene.objects[index]
    dx, cy, s = scene.geometry[index]
    x, y, r = (obj.slot + 0.5) / 3 + dx, cy, s / 2
    if obj.shape == "square":
        box = (x - 0.86 * r, y - 0.86 * r, x + 0.86 * r, y + 0.86 * r)
    elif obj.shape == "triangle":
        box = (x - r, y - r, x + r, y + 0.8 * r)
    else:  # circle, cross
        box = (x - r, y - r, x + r, y + r)
    return tuple(min(1.0, max(0.0, v)) for v in box)  # type: ignore[return-value]


def box_answer(box: tuple[float, float, float, float]) -> str:
    """``[0.05, 0.31, 0.30, 0.58]``: the answer format of the box task."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def _question(kind: str, scene: Scene, rng: random.Random, answer: str | None = None) -> tuple[str, str] | None:
    """A (question, answer) of type ``kind`` about ``scene`` (None if the scene cannot support one).
    ``answer`` forces the presence answer (``yes``/``no``)."""
    objs = scene.objects
    if kind == "color":
        shapes = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not shapes:
            return None
        o = rng.choice(shapes)
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        colors = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not colors:
            return None
        o = rng.choice(colors)
        return f"What shape is the {o.color} object?", o.shape
    if kind == "count":
        return "How many shapes are there?", COUNTS[len(objs) - 1]
    if kind == "presence":
        yes = (rng.random() < 0.5) if answer is None else answer == "yes"
        if yes:
            o = rng.choice(objs)
            return f"Is there {_a(o.color)} {o.shape}?", "yes"
        s, c = rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in scene.combos()])
        return f"Is there {_a(c)} {s}?", "no"
    if kind == "position":
        o = rng.choice(objs)
        return f"Where is the {o.color} {o.shape}?", o.position
    raise ValueError(kind)


def _val_scene(kind: str, j: int, rng: random.Random) -> tuple[Scene, str, str]:
    """The ``j``-th validation scene of type ``kind``; answers cycle so every answer is equally frequent."""
    answers = ANSWERS[kind]
    answer = answers[j % len(answers)]
    n = rng.randint(1, 3)
    if kind == "color":
        s = rng.choice(SHAPES)
        scene = _scene(rng, n, (s, answer), allow=lambda s2, c2: s2 != s)
        return scene, f"What color is the {s}?", answer
    if kind == "shape":
        c = rng.choice(list(COLORS))
        scene = _scene(rng, n, (answer, c), allow=lambda s2, c2: c2 != c)
        return scene, f"What shape is the {c} object?", answer
    if kind == "count":
        scene = _scene(rng, COUNTS.index(answer) + 1)
        return scene, "How many shapes are there?", answer
    if kind == "presence":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        if answer == "yes":
            scene = _scene(rng, n, (s, c))
        else:
            scene = _scene(rng, n, allow=lambda s2, c2: (s2, c2) != (s, c))
        return scene, f"Is there {_a(c)} {s}?", answer
    if kind == "position":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        scene = _scene(rng, n, (s, c), required_slot=POSITIONS.index(answer))
        return scene, f"Where is the {c} {s}?", answer
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------- digits


def _digits() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def draw_digit(pixels: Any, size: int = 64, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """An 8x8 scikit-learn digit (0..16 ink) as a dark digit on white, greyscale, upscaled to ``size``
    with nearest-neighbour (crisp blocks: every original pixel kept), optionally shifted by ``shift``."""
    import numpy as np

    grey = (255 - np.clip(np.asarray(pixels, dtype=np.float64), 0, 16) * (255 / 16)).round().astype(np.uint8)
    up = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
    if shift != (0, 0):
        canvas = Image.new("L", (size, size), 255)
        canvas.paste(up, shift)
        up = canvas
    return up


def _split_digits(targets: Any, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Held-out digit indices (``n_val``, balanced over the 10 classes) and the training indices."""
    order = list(range(len(targets)))
    random.Random(f"vlkit-digits:{seed}").shuffle(order)
    val: list[int] = []
    by_class: dict[int, list[int]] = {d: [i for i in order if int(targets[i]) == d] for d in range(10)}
    for j in range(n_val):
        d = j % 10
        if by_class[d]:
            val.append(by_class[d].pop(0))
    held = set(val)
    return val, [i for i in order if i not in held]


# ------------------------------------------------------------------------------------------- tokenizer


def _grammar_texts() -> Iterable[str]:
    """Every word the questions, answers and captions can use (so a small build has a full vocabulary)."""
    yield "system user assistant"
    yield DIGIT_QUESTION
    yield CAPTION_QUESTION
    yield "How many shapes are there?"
    for kind, answers in ANSWERS.items():
        yield kind + " " + " ".join(answers)
    for s in SHAPES:
        yield f"What color is the {s}?"
        for c in COLORS:
            yield f"What shape is the {c} object? Is there {_a(c)} {s}? Where is the {c} {s}?"
    yield "a red circle on the left, a blue square in the middle and a green cross on the right."


def _box_grammar_texts() -> Iterable[str]:
    """Every word of the box task and of the built-in task instructions (the tokenizer's extension)."""
    from vlkit.data.mix import INSTRUCTIONS

    yield "[" + ", ".join(f"0.{i:02d}" for i in range(100)) + ", 1.00], [0, 1]"
    yield from INSTRUCTIONS.values()


def build_tokenizer(texts: Iterable[str], out: Path, extra_texts: Iterable[str] = ()) -> Any:
    """Train a word-level tokenizer on ``texts`` and save it (transformers format, ChatML chat template).

    Lower-cases; splits on whitespace and punctuation; special tokens ``<pad> <unk> <s> </s> <|im_start|>
    <|im_end|>`` (end of turn = eos). Decoding joins words with spaces (no space before punctuation).
    The new words of ``extra_texts`` get ids after the trained vocabulary (in order of appearance), so
    extending the texts this way leaves every id of the ``texts`` vocabulary as it was. With extra texts,
    decimals (``0.05``) are single words and brackets decode without inner spaces, so a box answer
    ``[0.05, 0.31, 0.30, 0.58]`` decodes back to itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = list(extra_texts)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if extra:  # Whitespace's split (words, punctuation runs) with decimals kept whole
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+\.\d+|\w+|[^\w\s]+"), behavior="removed", invert=True)
        tok.decoder = decoders.Sequence([tok.decoder, decoders.Fuse(), decoders.Replace("[ ", "["),
                                         decoders.Replace(" ]", "]")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=1 << 20, min_frequency=1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(texts, trainer)
    if extra:
        vocab = tok.get_vocab()
        for text in extra:
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
                vocab.setdefault(word, len(vocab))
        tok.model = models.WordLevel(vocab, unk_token="<unk>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["</s>", "<|im_start|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=512,
    )
    fast.save_pretrained(str(out))
    return fast


def check_tokenizer(tokenizer: Any) -> None:
    """Raise :class:`DataError` unless the demo tokenizer works with vlkit's chat templates and keeps every
    answer a single token that decodes back to itself."""
    from vlkit.data.conversation import Message, get_template, tokenize_conversation

    messages = [Message("user", "<image>\nWhat color is the circle?"), Message("assistant", "red")]
    rendered = [tokenize_conversation(messages, tokenizer, get_template(name, tokenizer), 2)
                for name in ("auto", "chatml")]
    if rendered[0] != rendered[1]:
        raise DataError("demo tokenizer: its chat template and the built-in chatml template disagree")
    for answers in ANSWERS.values():
        for answer in answers:
            ids = tokenizer.encode(answer, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id or tokenizer.decode(ids) != answer:
                raise DataError(f"demo tokenizer: answer {answer!r} is not one known token ({ids})")


# ----------------------------------------------------------------------------------------------- build


@dataclass
class _Sample:
    key: str
    meta: dict[str, Any]
    scene: Scene | None = None
    digit: int | None = None
    shift: tuple[int, int] = (0, 0)


def _conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _train_samples(rng: random.Random, scenes: int, digit_ids: list[int], targets: Any, digit_repeats: int,
                   caption_every: int, image_size: int) -> list[_Sample]:
    samples: list[_Sample] = []
    for i in range(scenes):
        scene = _scene(rng, rng.randint(1, 3))
        if caption_every and i % caption_every == 0:
            meta = {"conversations": _conversation([(CAPTION_QUESTION, caption(scene))]), "type": "caption",
                    "task": "caption"}
        else:
            kinds = list(SCENE_TYPES)
            rng.shuffle(kinds)
            k = rng.randint(3, 5)
            turns: list[tuple[str, str]] = []
            types: list[str] = []
            for kind in kinds:
                qa = _question(kind, scene, rng)
                if qa is not None and len(turns) < k:
                    turns.append(qa)
                    types.append(kind)
            meta = {"conversations": _conversation(turns), "types": types, "task": "vqa"}
        samples.append(_Sample(f"scene{i:07d}", meta, scene=scene))
    max_shift = max(1, round(2 * image_size / 64))
    for r in range(digit_repeats):
        for idx in digit_ids:
            shift = (0, 0) if r == 0 else (rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift))
            meta = {"conversations": _conversation([(DIGIT_QUESTION, str(int(targets[idx])))]), "type": "digit",
                    "task": "vqa", "source": f"sklearn-digits/{idx}"}
            samples.append(_Sample(f"digit{idx:04d}r{r}", meta, digit=idx, shift=shift))
    rng.shuffle(samples)
    return samples


def _val_samples(rng: random.Random, per_type: int, digit_ids: list[int], targets: Any) -> list[_Sample]:
    samples: list[_Sample] = []
    for kind in SCENE_TYPES:
        for j in range(per_type):
            scene, question, answer = _val_scene(kind, j, rng)
            meta = {"conversations": _conversation([(question, answer)]), "type": kind, "task": "vqa"}
            samples.append(_Sample(f"{kind}{j:06d}", meta, scene=scene))
    for idx in digit_ids:
        meta = {"conversations": _conversation([(DIGIT_QUESTION, str(int(targets[idx])))]), "type": "digit",
                "task": "vqa", "source": f"sklearn-digits/{idx}"}
        samples.append(_Sample(f"digit{idx:04d}", meta, digit=idx))
    rng.shuffle(samples)
    return samples


def _box_samples(rng: random.Random, n: int, prefix: str) -> list[_Sample]:
    """``n`` box-task samples: a scene and "Where is the {colour} {shape}?" -> its normalised box."""
    samples: list[_Sample] = []
    for i in range(n):
        scene = _scene(rng, rng.randint(1, 3))
        j = rng.randrange(len(scene.objects))
        o = scene.objects[j]
        turns = [(f"Where is the {o.color} {o.shape}?", box_answer(object_box(scene, j)))]
        meta = {"conversations": _conversation(turns), "type": BOX_TYPE, "task": BOX_TYPE}
        samples.append(_Sample(f"{prefix}{i:07d}", meta, scene=scene))
    return samples


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _box_counts(train_scenes: int, val_scenes: int, box_scenes: int | None) -> tuple[int, int]:
    """(training, validation) box samples: ``box_scenes`` (default a fifth of ``train_scenes``) and, unless
    that is 0, ``val_scenes // 5``."""
    train = train_scenes // 5 if box_scenes is None else box_scenes
    return train, (val_scenes // 5 if train > 0 else 0)


def existing_demo(out: str | Path, train_scenes: int = 20000, val_scenes: int = 1500, seed: int = 0,
                  image_size: int = 64, digit_repeats: int = 4, caption_fraction: float = 0.2,
                  box_scenes: int | None = None) -> dict[str, Any] | None:
    """The index of a complete demo dataset in ``out`` built with these arguments, or None."""
    try:
        index = json.loads((Path(out) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    wanted = {"name": "vlkit data demo", "seed": seed, "image_size": image_size, "train_scenes": train_scenes,
              "val_scenes": val_scenes, "digit_repeats": digit_repeats, "caption_fraction": caption_fraction,
              "box_scenes": _box_counts(train_scenes, val_scenes, box_scenes)[0]}
    builder = index.get("builder") if isinstance(index, dict) else None
    if not isinstance(builder, dict) or any(builder.get(k) != v for k, v in wanted.items()):
        return None
    shards = [name for split in index.get("splits", {}).values() for name in split.get("shards", [])]
    if not shards or not all((Path(out) / name).is_file() for name in shards):
        return None
    return index


def build_demo(out: str | Path, train_scenes: int = 20000, val_scenes: int = 1500, seed: int = 0,
               image_size: int = 64, shards: int = 4, overwrite: bool = False, digit_repeats: int = 4,
               caption_fraction: float = 0.2, progress: bool = True, box_scenes: int | None = None
               ) -> dict[str, Any]:
    """Write the demo dataset to ``out`` and return its index (also written as ``out/index.json``).

    ``out`` receives ``train-000000.tar`` ... (``shards`` of them), ``val-000000.tar``, ``box-000000.tar``,
    ``box_val-000000.tar``, ``tokenizer/`` and, last, ``index.json`` (splits ``train``, ``val``, ``box``,
    ``box_val``).

    - ``train_scenes`` scenes, of which ``caption_fraction`` become caption samples and the rest
      3-5-question conversations; plus every training digit ``digit_repeats`` times (copies after the
      first are shifted by up to 2 px).
    - ``val_scenes`` single-question samples, ``val_scenes // 5`` of each scene question type, plus as many
      held-out digits (up to 600), all with exactly balanced answers.
    - ``box_scenes`` box-task samples for training (default ``train_scenes // 5``; 0: no box shards) and
      ``val_scenes // 5`` for validation, drawn from an RNG stream of their own, so the train and val
      shards are the same whatever ``box_scenes`` is. The tokenizer then also knows the box answers' and
      the built-in task instructions' words (after the other words: their ids do not change).

    Refuses a non-empty ``out`` unless ``overwrite``.
    """
    if train_scenes < 1 or val_scenes < 5:
        raise DataError(f"need train_scenes >= 1 and val_scenes >= 5, got {train_scenes} and {val_scenes}")
    if box_scenes is not None and box_scenes < 0:
        raise DataError(f"box_scenes must be 0 (no box task) or more, got {box_scenes}")
    if shards < 1:
        raise DataError(f"shards must be at least 1, got {shards}")
    if image_size < 16:
        raise DataError(f"image_size must be at least 16, got {image_size}")
    if not 0 <= caption_fraction <= 1:
        raise DataError(f"caption_fraction must be in [0, 1], got {caption_fraction}")
    start = time.time()
    out = prepare_out_dir(out, overwrite)
    rng = random.Random(f"vlkit-demo:{seed}")
    images, targets = _digits()
    per_type = val_scenes // 5
    val_digits, train_digits = _split_digits(targets, min(per_type, 600), seed)
    caption_every = round(1 / caption_fraction) if caption_fraction > 0 else 0
    train = _train_samples(rng, train_scenes, train_digits, targets, digit_repeats, caption_every, image_size)
    val = _val_samples(rng, per_type, val_digits, targets)
    n_box, n_box_val = _box_counts(train_scenes, val_scenes, box_scenes)
    box_rng = random.Random(f"vlkit-demo-box:{seed}")
    box = _box_samples(box_rng, n_box, "box")
    box_val = _box_samples(box_rng, n_box_val, "boxval")

    def texts(samples: Iterable[_Sample]) -> Iterable[str]:
        for s in samples:
            for turn in s.meta["conversations"]:
                yield turn["value"].replace("<image>", " ")

    extra = [*_box_grammar_texts(), *texts(box + box_val)] if n_box else []
    tokenizer = build_tokenizer(itertools.chain(_grammar_texts(), texts(train + val)), out / ".tokenizer.tmp",
                                extra)
    check_tokenizer(tokenizer)

    splits: dict[str, Any] = {}
    plan = [("train", train, -(-len(train) // shards)), ("val", val, len(val))]
    if n_box:
        plan += [("box", box, len(box)), ("box_val", box_val, max(1, len(box_val)))]
    with _progress(progress) as bar:
        for split, samples, shard_size in plan:
            task = bar.add_task(f"writing {split}", total=len(samples)) if bar is not None else None
            writer = SplitWriter(out, split, shard_size)
            try:
                for s in samples:
                    if s.scene is not None:
                        image = draw_scene(s.scene, image_size)
                    else:
                        image = draw_digit(images[s.digit], image_size, s.shift)
                    writer.write(s.key, s.meta, _png(image), "png")
                    if bar is not None:
                        bar.advance(task)
            except BaseException:
                writer.abort()
                raise
            splits[split] = writer.close()
    (out / ".tokenizer.tmp").replace(out / "tokenizer")
    write_samples(out / SAMPLES_DIR, random.Random(f"vlkit-demo-samples:{seed}"), image_size)
    index = {
        "splits": splits,
        "tokenizer": "tokenizer",
        "samples": f"{SAMPLES_DIR}/{SAMPLES_FILE}",
        "builder": {"name": "vlkit data demo", "seed": seed, "image_size": image_size,
                    "train_scenes": train_scenes, "val_scenes": val_scenes, "digit_repeats": digit_repeats,
                    "caption_fraction": caption_fraction, "box_scenes": n_box,
                    "seconds": round(time.time() - start, 1)},
        "answers": {k: list(v) for k, v in ANSWERS.items()},
    }
    write_index(out, index)
    return index


SAMPLES_DIR = "samples"
SAMPLES_FILE = "questions.jsonl"


def write_samples(folder: Path, rng: random.Random, image_size: int = 64) -> Path:
    """A few images with questions for ``vlkit predict`` (one per scene question type): ``folder/*.png`` and
    ``folder/questions.jsonl`` of ``{"image", "question", "expected"}`` (image names relative to the file).
    Drawn from an RNG stream of their own, so the shards do not depend on them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for kind in SCENE_TYPES:
        scene, question, answer = _val_scene(kind, rng.randrange(len(ANSWERS[kind])), rng)
        name = f"{kind}.png"
        draw_scene(scene, image_size).save(folder / name)
        lines.append(json.dumps({"image": name, "question": question, "expected": answer}))
    path = folder / SAMPLES_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _progress(enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


__all__ = ["ANSWERS", "BOX_TYPE", "CHAT_TEMPLATE", "COLORS", "POSITIONS", "QUESTION_TYPES", "SHAPES", "Scene",
           "Shape", "box_answer", "build_demo", "build_tokenizer", "caption", "check_tokenizer", "draw_digit",
           "draw_scene", "object_box"]
