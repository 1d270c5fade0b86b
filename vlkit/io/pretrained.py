"""Saved models: :func:`save_pretrained` and :func:`from_pretrained`, for every architecture.

A saved model is a folder that needs neither the recipe nor the run folder (no pickles anywhere)::

    config.json                  vlkit_format_version, vlkit_version, the model section (a recipe's ``model:``
                                 with every part complete), image token, chat template, processor settings
    model.safetensors            every weight, tied tensors once; beyond ``max_shard_size`` the shards
                                 model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer/                   the LLM's tokenizer with the chat template the model was trained with

Loading builds every part from its section and then loads the weights. The LLM section is rewritten on
saving to its own config inline (random init) plus the saved tokenizer, so nothing is downloaded; a string
in the model section that starts with ``${recipe_dir}`` is relative to the saved folder, as in a recipe.
Encoder sections are kept as the recipe gave them: inline ``config:`` sections rebuild offline, a named
pretrained checkpoint is read from the Hugging Face / open_clip cache before the saved weights replace it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.config import RECIPE_DIR, DataConfig, ModelConfig, Recipe
from vlkit.data.conversation import IMAGE_PLACEHOLDER
from vlkit.errors import CheckpointError, RecipeError
from vlkit.schema import to_dataclass
from vlkit.weights import load_complete_state

if TYPE_CHECKING:
    from torch import nn

    from vlkit.model import VLM

FORMAT_VERSION = 1
"""Version of the saved-model layout; loading refuses a folder written in a newer one."""
CONFIG = "config.json"
TOKENIZER = "tokenizer"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PART_KEYS = ("encoders", "fusion", "llm")


def vlkit_version() -> str:
    try:
        return importlib.metadata.version("vlkit")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


# -------------------------------------------------------------------------------------------------- save


def _part_section(part: nn.Module, where: str) -> dict[str, Any]:
    """``{name: <registered name>, **args}`` of a part built by a registry (it keeps its ``Args`` as ``args``)."""
    args = getattr(part, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise CheckpointError(f"model.{where}: {type(part).__qualname__} keeps no `args` dataclass, so its recipe "
                              "section cannot be written; store the Args it was built from as `self.args`")
    cls = type(part)
    name = getattr(cls, "registered_name", None) or f"{cls.__module__}:{cls.__qualname__}"
    return {"name": name, **dataclasses.asdict(args)}


def model_section(model: VLM, tokenizer: str = f"{RECIPE_DIR}/{TOKENIZER}") -> dict[str, Any]:
    """The recipe ``model:`` section that rebuilds ``model``'s architecture (weights not included).

    The LLM section points to ``tokenizer`` and carries the LLM's config inline when the LLM can say so
    (``portable_section``, e.g. ``hf_causal``); other model-level keys (``views``, ...) are read from the
    model's attributes of the same name.
    """
    encoders = []
    for key, encoder in model.encoders.items():
        section = _part_section(encoder, f"encoders.{key}")
        section["key"] = key
        encoders.append(section)
    portable = getattr(model.llm, "portable_section", None)
    section: dict[str, Any] = {
        "encoders": encoders,
        "fusion": None if model.fusion is None else _part_section(model.fusion, "fusion"),
        "llm": portable(tokenizer) if portable is not None else _part_section(model.llm, "llm"),
    }
    for f in dataclasses.fields(ModelConfig):
        if f.name not in section and f.init:
            value = getattr(model, f.name, None)
            section[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return section


def processor_settings(model: VLM) -> dict[str, Any]:
    """What the model's processor delivers: image size, resize/pad policy, views, each encoder's
    normalisation, visual tokens per image (informational, and checked again when loading)."""
    processor = model.processor()
    encoders = {}
    for key, encoder in model.encoders.items():
        pre = getattr(encoder, "preprocess", None)
        if pre is not None:
            encoders[key] = {"size": pre.size, "mean": list(pre.mean), "std": list(pre.std),
                             "resample": "bicubic"}
    views = getattr(model, "views", None)
    return {
        "image_size": model.image_size,
        "num_image_tokens": model.num_image_tokens,
        "resize_policy": getattr(processor, "resize_policy", None),
        "pad_color": list(getattr(processor, "pad_color", None) or []) or None,
        "views": dataclasses.asdict(views) if views is not None else None,
        "encoders": encoders,
        "pixels": "RGB in [0, 1]; every encoder resizes (bicubic, antialiased) and normalises its own input",
    }


def _check_target(folder: Path) -> None:
    """Refuse to replace a folder that is not a vlkit saved model (e.g. the run folder itself)."""
    if not folder.exists():
        return
    if not folder.is_dir() or (any(folder.iterdir()) and _format_version(folder) is None):
        raise CheckpointError(f"{folder} exists and is not a vlkit saved model; save into a new or empty folder "
                              "(an existing saved model is replaced)")


def save_pretrained(model: VLM, folder: str | Path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a saved-model folder (see the module docstring); replaces an earlier save there.

    The folder is written next to ``folder`` and renamed into place, so a crash never leaves half a save.
    """
    from huggingface_hub import save_torch_state_dict

    from vlkit.atomic import atomic_dir

    folder = Path(folder)
    _check_target(folder)
    config = {
        "vlkit_format_version": FORMAT_VERSION,
        "vlkit_version": vlkit_version(),
        "architecture": "vlkit.VLM",
        "model": model_section(model),
        "image_token": IMAGE_PLACEHOLDER,
        "chat_template": getattr(model.llm.template, "name", None),
        "processor": processor_settings(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as exc:
        raise CheckpointError(f"the model section cannot be written as JSON ({exc}); part arguments must be "
                              "plain values (str, numbers, lists, mappings)") from exc
    with atomic_dir(folder) as tmp:
        save_torch_state_dict(model.state_dict(), tmp, max_shard_size=max_shard_size)
        save_tokenizer = getattr(model.llm, "save_tokenizer", None)
        if save_tokenizer is not None:
            save_tokenizer(tmp / TOKENIZER)
        else:
            model.llm.tokenizer.save_pretrained(tmp / TOKENIZER)
        (tmp / CONFIG).write_text(text + "\n")
    return folder


# -------------------------------------------------------------------------------------------------- load


def _format_version(folder: Path) -> int | None:
    """The saved-model format version in ``folder/config.json``; None when it is not a vlkit save."""
    try:
        data = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    version = data.get("vlkit_format_version") if isinstance(data, dict) else None
    return version if isinstance(version, int) else None


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a saved model, checked: vlkit's, and a format version this vlkit reads."""
    folder = Path(folder)
    file = folder / CONFIG
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a vlkit saved model: no {CONFIG}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not readable JSON ({exc})") from None
    version = data.get("vlkit_format_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        kind = f" (model_type {data.get('model_type')!r})" if isinstance(data, dict) and "model_type" in data else ""
        raise CheckpointError(f"{file} is not a vlkit config{kind}: it has no vlkit_format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was saved in vlkit format version {version} (by vlkit {data.get('vlkit_version', '?')}); "
            f"this vlkit ({vlkit_version()}) reads versions up to {FORMAT_VERSION}. Upgrade vlkit "
            "(pip install -U vlkit) to load it"
        )
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{file}: missing the `model` section")
    return data


def resolve_folder_paths(data: Any, folder: Path) -> Any:
    """``data`` with every string that starts with ``${recipe_dir}`` made relative to ``folder``."""
    if isinstance(data, dict):
        return {k: resolve_folder_paths(v, folder) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_folder_paths(v, folder) for v in data]
    if isinstance(data, str) and data.startswith(RECIPE_DIR):
        return str(folder / data[len(RECIPE_DIR):].lstrip("/"))
    return data


def build_from_section(section: dict[str, Any], where: str = "model") -> VLM:
    """Build (random init / the sections' own checkpoints) the VLM a ``model:`` section describes."""
    from vlkit.model import build_model

    model_cfg = to_dataclass(ModelConfig, section, where)
    return build_model(Recipe(model=model_cfg, data=DataConfig(train={}), stages=[]))


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load ``model.safetensors`` (or the shards of ``model.safetensors.index.json``) from ``folder``.

    Tensors that share storage in the model (tied weights) are stored once, so a key whose tensor is
    loaded under another name is not missing.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{folder / INDEX} is not a valid safetensors index ({exc})") from None
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{folder} holds no weights: expected {WEIGHTS} or {INDEX}")
    state = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / name} is not a readable safetensors file ({exc}); the save may be "
                                  "incomplete") from None
    load_complete_state(model, state, f"{folder}: the weights do not match the model of its {CONFIG}")


def load_saved(folder: str | Path) -> VLM:
    """A model saved by :func:`save_pretrained` (in eval mode)."""
    folder = Path(folder).expanduser().resolve()
    config = read_config(folder)
    section = resolve_folder_paths(config["model"], folder)
    try:
        model = build_from_section(section)
    except RecipeError as exc:
        raise CheckpointError(f"{folder / CONFIG}: {exc}") from None
    saved = config.get("processor") or {}
    for key in ("image_size", "num_image_tokens"):
        if key in saved and saved[key] != getattr(model, key):
            raise CheckpointError(f"{folder / CONFIG}: the rebuilt model has {key} {getattr(model, key)} but the "
                                  f"saved model {saved[key]}; was it saved by a vlkit whose parts differ?")
    load_weights(model, folder)
    return model.eval()


def _stage_recipe(checkpoint: Path) -> Path:
    for parent in (checkpoint.parent, checkpoint.parent.parent):
        if (parent / "recipe.yaml").is_file():
            return parent / "recipe.yaml"
    raise CheckpointError(f"{checkpoint} is a stage checkpoint but no recipe.yaml is in its run folder "
                          f"({checkpoint.parent.parent})")


def _stage_index(checkpoint: Path) -> int:
    """The index of the stage a checkpoint ``<run>/stage<i>-<name>/last`` belongs to."""
    name = checkpoint.parent.name
    index = name[len("stage"):].split("-", 1)[0]
    if not name.startswith("stage") or not index.isdigit():
        raise CheckpointError(f"{checkpoint} is not in a stage folder (<run>/stage<i>-<name>/last), so the stage "
                              "whose LoRA adapters it holds is unknown")
    return int(index)


def _merged(model: VLM) -> VLM:
    """``model`` with the LoRA adapters it holds folded into its weights (a plain model, as after ``lora:
    merge``), in eval mode."""
    from vlkit.training.lora import adapted_parts, unload

    if adapted_parts(model):
        unload(model, merge=True)
    return model.eval()


def from_pretrained(source: str | Path) -> VLM:
    """A VLM, in eval mode, from a saved model (:func:`save_pretrained`), a run folder (its latest stage
    checkpoint) or one stage checkpoint (``<run>/stage*/last``), or a Hugging Face LLaVA folder.

    A checkpoint of a stage that holds LoRA adapters gives the model with them merged into its weights."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{source}: no such folder; expected a vlkit saved model ({CONFIG}), a run folder "
                              "(recipe.yaml) or a stage checkpoint (model.safetensors + state.pt)")
    if (path / CONFIG).is_file():
        if _format_version(path) is not None:
            return load_saved(path)
        from vlkit.export.llava import is_llava_folder, load_llava

        if is_llava_folder(path):
            return load_llava(path)
        read_config(path)  # raises: a config.json that is neither vlkit's nor LLaVA's
    from vlkit.config import load_recipe
    from vlkit.model import build_model
    from vlkit.training.fit import load_run, load_stage_weights
    from vlkit.training.lora import sync_lora

    if (path / "recipe.yaml").is_file():
        return _merged(load_run(path)[1])
    if (path / WEIGHTS).is_file() and (path / "state.pt").is_file():
        recipe = load_recipe(_stage_recipe(path))
        model = build_model(recipe)
        sync_lora(model, recipe.stages[: _stage_index(path) + 1])  # the adapters this checkpoint holds
        load_stage_weights(model, path)
        return _merged(model)
    raise CheckpointError(f"{path} is neither a vlkit saved model ({CONFIG}), a run folder (recipe.yaml) nor a "
                          "stage checkpoint (model.safetensors + state.pt)")


__all__ = ["FORMAT_VERSION", "build_from_section", "from_pretrained", "load_saved", "load_weights",
           "model_section", "read_config", "save_pretrained"]
