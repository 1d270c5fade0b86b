"""``vlkit serve`` (issue 13, item 5): an OpenAI-compatible server, tested with the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversation import Message
from vlkit.generation import GenerationOptions, answer, generate, prompt_batch
from vlkit.model import build_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(client, model, folder): a saved tiny model served on 127.0.0.1 in this process."""
    from conftest import TINY_RECIPE

    from vlkit.serve import make_server

    folder = tmp_path_factory.mktemp("serve")
    (folder / "tiny.yaml").write_text(TINY_RECIPE.format(demo=demo_dir))
    torch.manual_seed(0)  # the same model whatever ran before
    model = build_model(vlkit.load_recipe(folder / "tiny.yaml"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    saved = model.save_pretrained(folder / "tiny-vlm")
    port = _free_port()
    server = make_server(str(saved), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    yield client, vlkit.from_pretrained(saved), folder
    server.should_exit = True
    thread.join(timeout=10)


def png(seed: int = 0, size: tuple[int, int] = (60, 40)) -> tuple[Image.Image, bytes]:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


def data_uri(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text: str, url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_models_and_completions_match_vlkit(served):
    client, model, folder = served
    assert [m.id for m in client.models.list().data] == ["tiny-vlm"]
    img, raw = png()
    out = client.chat.completions.create(model="tiny-vlm", messages=[user("What is this?", data_uri(raw))],
                                         max_tokens=6)
    expected = answer(model, [img], ["What is this?"], GenerationOptions(max_new_tokens=6))[0]
    assert out.choices[0].message.content == expected and expected
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > model.num_image_tokens and out.usage.completion_tokens > 0

    path = folder / "img.png"
    path.write_bytes(raw)
    by_file = client.chat.completions.create(model="tiny-vlm", messages=[user("What is this?", path.as_uri())],
                                             max_tokens=6)
    assert by_file.choices[0].message.content == expected

    # multi-turn with a system prompt and a plain-string content, a stop string, sampling with a seed
    messages = [{"role": "system", "content": "Be brief."}, user("What is this?", data_uri(raw)),
                {"role": "assistant", "content": expected}, {"role": "user", "content": "And then?"}]
    conversation = [Message("system", "Be brief."), Message("user", "<image>\nWhat is this?"),
                    Message("assistant", expected), Message("user", "And then?")]
    batch = prompt_batch(model, [conversation], [img])
    full = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                    GenerationOptions(max_new_tokens=10))[0]
    got = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=10)
    assert got.choices[0].message.content == full
    stop = full.split()[1]
    stopped = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=10, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.find(stop)].strip()
    sampled = [client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=10, temperature=1.5,
                                              top_p=0.9, seed=3).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_streaming_as_server_sent_events(served):
    client, model, _ = served
    img, raw = png(1)
    chunks = list(client.chat.completions.create(model="tiny-vlm", messages=[user("What is this?", data_uri(raw))],
                                                 max_tokens=8, stream=True))
    expected = answer(model, [img], ["What is this?"], GenerationOptions(max_new_tokens=8))[0]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected and len(pieces) > 1  # token by token, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    client, model, folder = served
    _, raw = png(2)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    bad = [
        ([{"role": "user", "content": [{"type": "audio", "data": "x"}]}], "content parts must be"),
        ([{"role": "wizard", "content": "hi"}], "role must be one of"),
        ([user("hi", "data:image/png;base64,not-base64!!")], "does not decode"),
        ([user("hi", data_uri(b"definitely not a png"))], "does not decode"),
        ([user("hi", "https://example.com/cat.png")], "downloads nothing"),
        ([user("hi", (folder / "missing.png").as_uri())], "cannot read image file"),
        ([user("hi", data_uri(raw)), user("again", data_uri(raw))], "one image per conversation"),
    ]
    for messages, message in bad:
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=4)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens") as err:
        client.chat.completions.create(model="tiny-vlm", messages=[user("hi")], max_tokens=10_000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-vlm", messages=[user("hi")], temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="tiny-vlm", messages=[user("hi")], n=2)
    # still serving
    ok = client.chat.completions.create(model="tiny-vlm", messages=[user("hi")], max_tokens=3)
    assert ok.choices[0].message.content == answer(model, [None], ["hi"], GenerationOptions(max_new_tokens=3))[0]
