"""``vlkit chat`` (issue 13, item 4): multi-turn, /image, /reset, /exit, streamed tokens, the model's template."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.chat import ChatSession, chat_loop
from vlkit.data.conversation import Message
from vlkit.generation import GenerationOptions, answer, generate, prompt_batch
from vlkit.model import build_model


@pytest.fixture(scope="module")
def saved(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("chat")
    (folder / "tiny.yaml").write_text(TINY_RECIPE.format(demo=demo_dir))
    torch.manual_seed(0)  # the same model whatever ran before
    model = build_model(vlkit.load_recipe(folder / "tiny.yaml"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "a.png")
    return model.save_pretrained(folder / "model")


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_chat_loop_multi_turn_with_image_and_reset(saved: Path):
    model = vlkit.from_pretrained(saved)
    img = str(saved.parent / "a.png")
    options = GenerationOptions(max_new_tokens=6)
    stdin = io.StringIO(f"/image {img}\nWhat is this?\nAnd the colour?\n/reset\nHello\n/bogus\n/exit\nnever read\n")
    out = Recorder()
    assert chat_loop(model, stdin, out, options=options) == 0
    text = out.getvalue()

    # what the turns must be: the same conversation through the model directly
    image = Image.open(img).convert("RGB")
    first = answer(model, [image], ["What is this?"], options)[0]
    conversation = [Message("user", "What is this?"), Message("assistant", first), Message("user", "And the colour?")]
    batch = prompt_batch(model, [conversation], [image])
    second = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], options)[0]
    third = answer(model, [None], ["Hello"], options)[0]
    assert first and second and third
    assert f"> {first}\n> {second}\n> [conversation cleared]\n> {third}\n> [unknown command /bogus" in text
    assert f"[image attached: {img}; new conversation]" in text
    assert "never read" not in text
    assert any(0 < len(w) < len(first) and first.startswith(w) for w in out.writes)  # streamed, not at once


def test_streaming_holds_back_stop_strings(saved: Path):
    model = vlkit.from_pretrained(saved)
    img = saved.parent / "a.png"
    full = answer(model, [Image.open(img).convert("RGB")], ["Tell me"], GenerationOptions(max_new_tokens=10))[0]
    words = full.split()
    assert len(words) >= 2
    session = ChatSession(model, GenerationOptions(max_new_tokens=10, stop=[words[1]]))
    session.attach(img)
    shown: list[str] = []
    reply = session.reply("Tell me", shown.append)
    assert reply == full[: full.find(words[1])].strip() and reply
    assert "".join(shown) == reply and words[1] not in "".join(shown)
    assert session.messages[-1] == Message("assistant", reply)


def test_bad_image_keeps_the_chat_going(saved: Path):
    model = vlkit.from_pretrained(saved)
    out = io.StringIO()
    chat_loop(model, io.StringIO("/image /no/such.png\n/image\nHi\n"), out, options=GenerationOptions(max_new_tokens=3))
    text = out.getvalue()
    assert "[error: cannot read image /no/such.png" in text and "[usage: /image PATH]" in text
    assert text.endswith(f"> {answer(model, [None], ['Hi'], GenerationOptions(max_new_tokens=3))[0]}\n> \n")


@pytest.mark.slow
def test_vlkit_chat_command(saved: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    img = saved.parent / "a.png"
    proc = subprocess.run([sys.executable, "-m", "vlkit.cli", "chat", str(saved), "--image", str(img),
                           "--max-new-tokens", "4"], input="What is this?\n/exit\n", capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = vlkit.from_pretrained(saved)
    expected = answer(model, [Image.open(img).convert("RGB")], ["What is this?"], GenerationOptions(max_new_tokens=4))
    assert f"[image attached: {img}]\n> {expected[0]}\n" in proc.stdout
