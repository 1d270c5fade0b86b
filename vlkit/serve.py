"""``vlkit serve MODEL``: an OpenAI-compatible chat server (FastAPI + uvicorn; ``pip install vlkit[serve]``).

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` with messages whose content is a string
or a list of ``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url": {"url": ...}}``
parts (``data:image/...;base64,...`` URIs or ``file://`` URLs of local files; nothing is downloaded; one
image per conversation, as vlkit models read), ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` (default 0: greedy), ``top_p``, ``seed``, ``stop`` and ``stream: true`` (server-sent
events). Bad requests get a 4xx JSON error in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` and the server keeps serving. Requests are answered one at a time (one model, one lock).
The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.data.conversation import IMAGE_PLACEHOLDER, Message
from vlkit.errors import VlkitError
from vlkit.generation import GenerationError, GenerationOptions, generate, prompt_batch

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from vlkit.model import VLM

_ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _decode_image(url: Any, param: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str):
        raise APIError(400, "image_url.url must be a string", param)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, "a data URI image must be base64: data:image/png;base64,...", param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image's base64 data does not decode", param, "invalid_image") from None
    elif url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise APIError(400, f"cannot read image file {path}: {exc.strerror or exc}", param,
                           "invalid_image") from None
    else:
        raise APIError(400, "image URLs must be data: URIs or file:// URLs of local files (the server downloads "
                       "nothing)", param, "invalid_image_url")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        raise APIError(400, "the image does not decode (not a PNG/JPEG/... file)", param, "invalid_image") from None


def parse_messages(raw: Any) -> tuple[list[Message], Image.Image | None]:
    """OpenAI chat messages -> vlkit messages (an image part becomes ``<image>\\n`` where it stands) and the
    conversation's image."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", "messages")
    messages: list[Message] = []
    image = None
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, "each message must be an object with role and content", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in _ROLES:
            raise APIError(400, f"role must be one of {', '.join(_ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = ""
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if image is not None:
                        raise APIError(400, "this model reads one image per conversation", at)
                    image = _decode_image(part["image_url"].get("url"), f"{at}.image_url.url")
                    text += f"{IMAGE_PLACEHOLDER}\n"
                else:
                    raise APIError(400, "content parts must be {type: text, text} or {type: image_url, image_url: "
                                   "{url}}", at)
        else:
            raise APIError(400, "content must be a string or a list of parts", f"{where}.content")
        messages.append(Message(role, text))
    if messages[-1].role == "assistant":
        raise APIError(400, "the last message must be the user's (or the system's)", f"messages[{len(raw) - 1}]")
    return messages, image


def _options(body: dict[str, Any]) -> GenerationOptions:
    def number(key: str, kind: type, default: Any) -> Any:
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise APIError(400, f"{key} must be a{'n integer' if kind is int else ' number'}", key)
        return kind(value)

    if number("n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    max_tokens = number("max_completion_tokens", int, None) or number("max_tokens", int, 256)
    try:
        return GenerationOptions(max_new_tokens=max_tokens, temperature=number("temperature", float, 0.0),
                                 top_p=number("top_p", float, 1.0), seed=number("seed", int, None), stop=stop)
    except GenerationError as exc:
        raise APIError(400, str(exc), None) from None


class Server:
    """The request handling of one model (the FastAPI app is a thin layer over it)."""

    def __init__(self, model: VLM, name: str) -> None:
        self.model = model
        self.name = name
        self.lock = threading.Lock()
        self.created = int(time.time())
        config = getattr(getattr(model.llm, "model", None), "config", None)
        self.context = getattr(config, "max_position_embeddings", None)

    def models(self) -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "vlkit"}]}

    def prepare(self, body: Any) -> tuple[dict[str, Any], GenerationOptions]:
        """Validate a chat-completion request: the prompt batch and the generation options."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != self.name:
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")
        messages, image = parse_messages(body.get("messages"))
        options = _options(body)
        if image is not None and self.model.num_image_tokens <= 0:
            raise APIError(400, "this model reads no images", "messages")
        try:
            batch = prompt_batch(self.model, [messages], [image])
        except VlkitError as exc:
            raise APIError(400, str(exc), "messages") from None
        prompt = int(batch["input_ids"].shape[1])
        if self.context is not None and prompt + options.max_new_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; the prompt takes {prompt} (images "
                           f"included) and max_tokens asks for {options.max_new_tokens} more", "messages",
                           "context_length_exceeded")
        return batch, options

    def _usage(self, batch: dict[str, Any], answer: str, options: GenerationOptions) -> tuple[dict[str, int], str]:
        prompt = int(batch["input_ids"].shape[1])
        completion = len(self.model.llm.tokenizer.encode(answer, add_special_tokens=False))
        finish = "length" if completion >= options.max_new_tokens else "stop"
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}, finish

    def complete(self, batch: dict[str, Any], options: GenerationOptions) -> dict[str, Any]:
        with self.lock:
            answer = self._generate(batch, options)
        usage, finish = self._usage(batch, answer, options)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": finish, "logprobs": None}]}

    def _generate(self, batch: dict[str, Any], options: GenerationOptions, streamer: Any = None) -> str:
        try:
            return generate(self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], options,
                            streamer=streamer)[0]
        except GenerationError as exc:
            raise APIError(400, str(exc)) from None

    def stream(self, batch: dict[str, Any], options: GenerationOptions) -> Iterator[str]:
        """Server-sent events: a role chunk, content chunks as tokens are generated, a finish chunk, [DONE]."""
        from vlkit.chat import StopAwareStream

        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        pieces: queue.Queue[Any] = queue.Queue()
        done = object()

        def work() -> None:
            try:
                with self.lock:
                    streamer = StopAwareStream(self.model.llm.tokenizer, pieces.put, options.stop)
                    answer = self._generate(batch, options, streamer)
                shown = streamer.text[:streamer.emitted].strip()
                if answer.startswith(shown) and len(answer) > len(shown):
                    pieces.put(answer[len(shown):])  # what was not streamed
                pieces.put((done, answer))
            except Exception as exc:  # reported to the client as an error event
                pieces.put((done, exc))

        threading.Thread(target=work, daemon=True).start()
        yield event({"role": "assistant", "content": ""})
        while True:
            item = pieces.get()
            if isinstance(item, tuple) and item and item[0] is done:
                result = item[1]
                break
            if item:
                yield event({"content": item})
        if isinstance(result, BaseException):
            error = result if isinstance(result, APIError) else APIError(500, f"generation failed: {result}",
                                                                          type="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            usage, finish = self._usage(batch, result, options)
            yield event({}, finish, usage=usage)
        yield "data: [DONE]\n\n"


def create_app(model: VLM, name: str) -> FastAPI:
    """The FastAPI app serving ``model`` under the model id ``name``."""
    from fastapi import Body, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(model, name)
    app = FastAPI(title=f"vlkit: {name}")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        error = APIError(400, f"invalid request: {first.get('msg', 'the body is not valid JSON')}")
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/chat/completions")
    def chat_completions(body: Any = Body(...)) -> Any:  # noqa: B008 - FastAPI's idiom
        batch, options = server.prepare(body)
        if body.get("stream"):
            return StreamingResponse(server.stream(batch, options), media_type="text/event-stream")
        return server.complete(batch, options)

    return app


def make_server(source: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> Any:
    """A ``uvicorn.Server`` for ``source`` (run folder, stage checkpoint, saved model, LLaVA folder); call
    ``.run()`` to serve."""
    try:
        import uvicorn
    except ImportError:
        raise VlkitError("vlkit serve needs FastAPI and uvicorn: pip install 'vlkit[serve]'") from None
    from vlkit.io.pretrained import from_pretrained

    model = from_pretrained(source)
    app = create_app(model, name or Path(source).resolve().name)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> int:
    """``vlkit serve``: serve ``source`` until interrupted."""
    server = make_server(source, host, port, name)
    print(f"serving {server.config.app.title.removeprefix('vlkit: ')!r} on http://{host}:{port}/v1 (Ctrl-C stops)",
          flush=True)
    server.run()
    return 0
