"""The demo's scenes and digits: what is drawn and what can be asked about it (no dataset building here:
:mod:`vlkit.data.demo` turns these into shards).

A scene is one to three non-overlapping shapes on white, each with a distinct (shape, colour) pair and one per
horizontal third of the image; digits are scikit-learn's 8x8 handwritten digits, upscaled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

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
def with_article(word: str) -> str:
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


def random_scene(rng: random.Random, n: int, required: tuple[str, str] | None = None,
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
    parts = [f"{with_article(o.color)} {o.shape} {_PLACE[o.position]}" for o in scene.objects]
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


def scene_question(kind: str, scene: Scene, rng: random.Random,
                   answer: str | None = None) -> tuple[str, str] | None:
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
            return f"Is there {with_article(o.color)} {o.shape}?", "yes"
        s, c = rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in scene.combos()])
        return f"Is there {with_article(c)} {s}?", "no"
    if kind == "position":
        o = rng.choice(objs)
        return f"Where is the {o.color} {o.shape}?", o.position
    raise ValueError(kind)


def val_scene(kind: str, j: int, rng: random.Random) -> tuple[Scene, str, str]:
    """The ``j``-th validation scene of type ``kind``; answers cycle so every answer is equally frequent."""
    answers = ANSWERS[kind]
    answer = answers[j % len(answers)]
    n = rng.randint(1, 3)
    if kind == "color":
        s = rng.choice(SHAPES)
        scene = random_scene(rng, n, (s, answer), allow=lambda s2, c2: s2 != s)
        return scene, f"What color is the {s}?", answer
    if kind == "shape":
        c = rng.choice(list(COLORS))
        scene = random_scene(rng, n, (answer, c), allow=lambda s2, c2: c2 != c)
        return scene, f"What shape is the {c} object?", answer
    if kind == "count":
        scene = random_scene(rng, COUNTS.index(answer) + 1)
        return scene, "How many shapes are there?", answer
    if kind == "presence":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        if answer == "yes":
            scene = random_scene(rng, n, (s, c))
        else:
            scene = random_scene(rng, n, allow=lambda s2, c2: (s2, c2) != (s, c))
        return scene, f"Is there {with_article(c)} {s}?", answer
    if kind == "position":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        scene = random_scene(rng, n, (s, c), required_slot=POSITIONS.index(answer))
        return scene, f"Where is the {c} {s}?", answer
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------- digits


def load_digits() -> tuple[Any, Any]:
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


def split_digits(targets: Any, n_val: int, seed: int) -> tuple[list[int], list[int]]:
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
