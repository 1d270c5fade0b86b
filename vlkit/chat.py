"""``vlkit chat MODEL``: a multi-turn terminal chat with a model (run folder, saved model or LLaVA export).

Commands: ``/image PATH`` attaches an image (vlkit models read one image per conversation, so attaching
one starts a new conversation about it), ``/reset`` clears the conversation (and the image), ``/exit``
quits (so does end of input). Answers are streamed token by token as they are generated, rendered with
the model's own chat template.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vlkit.data.conversation import Message
from vlkit.errors import DataError, VlkitError
from vlkit.generation import GenerationOptions, generate, prompt_batch

if TYPE_CHECKING:
    from PIL import Image

    from vlkit.model import VLM

HELP = "commands: /image PATH (attach an image; starts a new conversation), /reset, /exit"


class StopAwareStream:
    """A transformers streamer (``put``/``end``) that decodes new tokens and hands text to ``write`` as it
    comes, holding back what could be the start of a stop string and nothing after one.

    transformers' ``TextStreamer`` prints to stdout and cannot cut at stop strings, so this small one is kept.
    """

    def __init__(self, tokenizer: Any, write: Any, stop: list[str]) -> None:
        from transformers import TextStreamer

        self._decoder = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._decoder.on_finalized_text = self._on_text  # type: ignore[method-assign]
        self.write = write
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def put(self, value: Any) -> None:
        self._decoder.put(value)

    def end(self) -> None:
        self._decoder.end()
        self._flush(final=True)

    def _on_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self._flush(final=stream_end)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        if not self.emitted:  # the answer is stripped: no leading whitespace
            lead = len(self.text) - len(self.text.lstrip())
            self.emitted = lead if lead < len(self.text) else 0
            if not self.text.strip():
                return
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(self.text)
        else:  # keep back a tail that may grow into a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        end = len(self.text[:end].rstrip())  # trailing whitespace waits for the next word (answers are stripped)
        if end > self.emitted:
            self.write(self.text[self.emitted:end])
            self.emitted = end


class ChatSession:
    """A conversation with a model: the messages so far and the attached image."""

    def __init__(self, model: VLM, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.options = options or GenerationOptions(max_new_tokens=256)
        self.messages: list[Message] = []
        self.image: Image.Image | None = None

    def reset(self) -> None:
        self.messages = []
        self.image = None

    def attach(self, path: str | Path) -> None:
        """Attach the image at ``path`` and start a new conversation about it."""
        from PIL import Image, UnidentifiedImageError

        if self.model.num_image_tokens <= 0:
            raise DataError("this model reads no images")
        try:
            with Image.open(Path(path).expanduser()) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        self.reset()
        self.image = image

    def reply(self, text: str, write: Any = None) -> str:
        """Add the user's ``text``, generate the answer (streamed to ``write``), add it and return it."""
        messages = [*self.messages, Message("user", text)]
        batch = prompt_batch(self.model, [messages], [self.image])
        streams = write is not None and self.options.num_beams == 1  # transformers streams no beam search
        stream = StopAwareStream(self.model.llm.tokenizer, write, self.options.stop) if streams else None
        answer = generate(self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          self.options, streamer=stream)[0]
        if write is not None:  # what was not streamed (beam search)
            shown = stream.text[:stream.emitted].strip() if stream is not None else ""
            write(answer[len(shown):] if answer.startswith(shown) else "")
        self.messages = [*messages, Message("assistant", answer)]
        return answer


def chat_loop(model: VLM, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, image: str | None = None,
              options: GenerationOptions | None = None) -> int:
    """Read user turns and commands from ``stdin`` until ``/exit`` or end of input; stream answers to ``stdout``."""
    session = ChatSession(model, options)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(f"vlkit chat ({HELP})\n")
    if image:
        session.attach(image)
        write(f"[image attached: {image}]\n")
    while True:
        write("> ")
        line = stdin.readline()
        if not line:
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            write("[conversation cleared]\n")
            continue
        if command == "/image":
            if not rest.strip():
                write("[usage: /image PATH]\n")
                continue
            try:
                session.attach(rest.strip())
            except VlkitError as exc:
                write(f"[error: {exc}]\n")
                continue
            write(f"[image attached: {rest.strip()}; new conversation]\n")
            continue
        if command.startswith("/"):
            write(f"[unknown command {command}; {HELP}]\n")
            continue
        try:
            session.reply(line, write)
        except VlkitError as exc:
            write(f"[error: {exc}]")
        write("\n")


def run(source: str, image: str | None = None, options: GenerationOptions | None = None) -> int:
    """``vlkit chat``: load ``source`` (run folder, stage checkpoint, saved model, LLaVA folder) and chat."""
    from vlkit.io.pretrained import from_pretrained

    return chat_loop(from_pretrained(source), image=image, options=options or GenerationOptions(max_new_tokens=256))
