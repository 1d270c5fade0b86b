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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlkit.data.scenes import (
    ANSWERS,
    BOX_TYPE,
    CAPTION_QUESTION,
    COLORS,
    DIGIT_QUESTION,
    SCENE_TYPES,
    SHAPES,
    Scene,
    box_answer,
    caption,
    draw_digit,
    draw_scene,
    load_digits,
    object_box,
    random_scene,
    scene_question,
    split_digits,
    val_scene,
    with_article,
)
from vlkit.data.shards import INDEX_FILE, SplitWriter, prepare_out_dir, write_index
from vlkit.errors import DataError

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""


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
            yield f"What shape is the {c} object? Is there {with_article(c)} {s}? Where is the {c} {s}?"
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
        scene = random_scene(rng, rng.randint(1, 3))
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
                qa = scene_question(kind, scene, rng)
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
            scene, question, answer = val_scene(kind, j, rng)
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
        scene = random_scene(rng, rng.randint(1, 3))
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
    images, targets = load_digits()
    per_type = val_scenes // 5
    val_digits, train_digits = split_digits(targets, min(per_type, 600), seed)
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
        scene, question, answer = val_scene(kind, rng.randrange(len(ANSWERS[kind])), rng)
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


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_demo", "build_tokenizer", "check_tokenizer", "existing_demo",
           "write_samples"]
