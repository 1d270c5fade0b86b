"""lmms-eval adapter: vlkit models as the lmms-eval model ``vlkit``, and ``vlkit eval``.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (see pyproject.toml), so after
``pip install 'vlkit[eval]'``::

    lmms-eval --model vlkit --model_args pretrained=runs/llava_demo --tasks vqav2_val --limit 100
    vlkit eval runs/llava_demo --tasks vqav2_val --limit 100 --out results/

``pretrained`` is a run folder (its latest checkpoint, :func:`vlkit.training.fit.load_run`) or a saved model
(:func:`vlkit.from_pretrained`). Requests follow lmms-eval's conventions (``lmms_eval/api/model.py``):
``generate_until`` gets ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and stops at the
``until`` strings; ``loglikelihood`` gets ``(context, target, doc_to_visual, doc_id, task, split)`` and
returns ``(mean negative log-likelihood of the continuation tokens, whether greedy decoding gives them)``,
as lmms-eval's own models do (its multiple-choice scoring takes the argmin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.data.conversation import IGNORE_INDEX, Message
from vlkit.errors import CheckpointError, DataError, VlkitError

try:
    from lmms_eval.api.model import lmms
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise VlkitError("the lmms-eval adapter needs lmms-eval: pip install 'vlkit[eval]'") from exc

_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
                  "repetition_penalty")


def manifest():
    """The entry point lmms-eval loads (group ``lmms_eval.models``): model id ``vlkit`` -> :class:`VLKitLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlkit", simple_class_path="vlkit.eval.lmms.VLKitLMM")


def load_model(path: str | Path) -> Any:
    """A run folder's latest model, or a saved model folder (through :func:`vlkit.from_pretrained`)."""
    import vlkit

    path = Path(path)
    if not ((path / "recipe.yaml").is_file() or (path / "config.json").is_file()):
        raise CheckpointError(f"{path} is neither a vlkit run folder (recipe.yaml + stage checkpoints) nor a "
                              "saved model (config.json): pass `pretrained=` one of those")
    return vlkit.from_pretrained(path).eval()


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class VLKitLMM(lmms):
    """A vlkit model for lmms-eval: one image (or none) per request, the model's own chat template."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 8, max_new_tokens: int = 32,
                 device: str | None = None, **_: Any) -> None:
        super().__init__()
        self._rank, self._world_size = _rank_world()
        if device in (None, "", "auto"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model = load_model(pretrained).to(self._device)
        self.batch_size_per_device = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_new_tokens = int(max_new_tokens)
        self.processor = self.model.processor(max_length=1 << 20)
        self.tokenizer = self.model.llm.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    # -------------------------------------------------------------------------------------------- inputs

    def _image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image | None:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise DataError(f"{task} doc {doc_id}: {len(visuals)} visuals, but vlkit models take one image per "
                            "prompt")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise DataError(f"{task} doc {doc_id}: expected a PIL image from doc_to_visual, got "
                            f"{type(visuals[0]).__name__}")
        return visuals[0].convert("RGB") if visuals else None

    def _prompt(self, context: str, image: Image.Image | None) -> dict[str, Any]:
        return self.processor.prompt_features([Message("user", context)], image)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch.get("pixel_values")
        return {"input_ids": batch["input_ids"].to(self._device),
                "attention_mask": batch["attention_mask"].to(self._device),
                "pixel_values": None if pixels is None else pixels.to(self._device)}

    # ---------------------------------------------------------------------------------------- generation

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            kwargs = {k: gen_kwargs[k] for k in _GENERATE_KEYS if k in gen_kwargs}
            max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
            temperature = float(kwargs.pop("temperature", 0) or 0)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature)
            elif not kwargs.get("do_sample"):
                kwargs.pop("top_p", None)
                kwargs.pop("top_k", None)
                kwargs["do_sample"] = False
            for start in range(0, len(indices), self.batch_size_per_device):
                chunk = indices[start:start + self.batch_size_per_device]
                features = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    features.append(self._prompt(context, self._image(doc_to_visual, doc_id, task, split)))
                batch = self._to_device(self.processor.collate(features, padding_side="left"))
                texts = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                            max_new_tokens=max_new, **kwargs)
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop, 1)[0]
                    out[i] = text
        return [t if t is not None else "" for t in out]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("vlkit models answer single-round requests (generate_until)")

    # ----------------------------------------------------------------------------------------- likelihood

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """:meth:`score` of each request, as the evaluator must receive it: lmms-eval 0.7 turns any model
        output but a ``str`` or ``GenerationResult`` into its ``str`` (``api/instance.py``
        ``unwrap_generation_output``), which would break the ``(nll, is_greedy)`` pairs, so they travel
        inside ``GenerationResult`` (unwrapped to the pair itself)."""
        try:
            from lmms_eval.api.instance import GenerationResult
        except ImportError:  # older lmms-eval: pairs pass through as they are
            return self.score(requests)
        return [GenerationResult(text=pair) for pair in self.score(requests)]  # type: ignore[arg-type]

    def score(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(mean NLL of the continuation tokens, whether greedy decoding gives them)`` per request."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size_per_device):
            chunk = requests[start:start + self.batch_size_per_device]
            features = []
            for req in chunk:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                prompt = self._prompt(context, self._image(doc_to_visual, doc_id, task, split))
                cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
                if not cont:
                    raise DataError(f"{task} doc {doc_id}: empty continuation {continuation!r}")
                features.append({"input_ids": prompt["input_ids"] + cont,
                                 "labels": [IGNORE_INDEX] * len(prompt["input_ids"]) + cont,
                                 "pixel_values": prompt["pixel_values"]})
            batch = self.processor.collate(features, padding_side="right")
            labels = batch["labels"].to(self._device)
            with torch.no_grad():
                logits = self.model(**self._to_device(batch)).logits.float()
            logits, targets = logits[:, :-1], labels[:, 1:]
            mask = targets != IGNORE_INDEX
            nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
            greedy = (logits.argmax(-1) == targets) | ~mask
            for row in range(len(chunk)):
                m = mask[row]
                results.append((float(nll[row][m].mean()), bool(greedy[row].all())))
        return results


# ------------------------------------------------------------------------------------------------ vlkit eval


def run_eval(model: str | Path, tasks: Sequence[str], limit: int | float | None = None,
             out: str | Path | None = None, include_path: str | Path | None = None, batch_size: int = 8,
             max_new_tokens: int = 32) -> dict[str, Any]:
    """lmms-eval's evaluator, in-process, on a vlkit model (by the registered name ``vlkit``).

    Writes ``results.json`` (lmms-eval's results, per-task configs and versions) and ``results.md`` (its
    table) into ``out`` when given; returns lmms-eval's result dict.
    """
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import make_table

    if "," in str(model):
        raise VlkitError(f"{model}: lmms-eval's model_args cannot hold a path with a comma; rename the folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = [f"{t!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            t, manager.all_tasks, n=1)) else "") for t in unknown]
        raise VlkitError(f"unknown lmms-eval task(s): {', '.join(hints)}; local tasks need --include-path DIR")
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluator.simple_evaluate(
        model="vlkit", model_args=f"pretrained={model},max_new_tokens={max_new_tokens}",
        tasks=list(tasks), limit=limit, batch_size=batch_size, task_manager=manager, log_samples=False)
    if results is None:  # a non-zero rank
        return {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better",
                                        "n-samples", "groups") if k in results}
        for name, text in (("results.json", json.dumps(keep, indent=2, default=str)),
                           ("results.md", make_table(results) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(out / name)
    return results
