"""``model: {init: SOURCE}``: a recipe that starts from an existing model.

``SOURCE`` is a vlkit saved-model folder (:func:`vlkit.io.pretrained.save_pretrained`, ``vlkit export``), a
Hugging Face LLaVA folder (``vlkit export --format llava``, or any ``LlavaForConditionalGeneration`` with a
CLIP vision tower) or the hub id of either (``llava-hf/llava-1.5-7b-hf``), resolved by huggingface_hub as
``from_pretrained`` resolves it (its cache; a download unless ``HF_HUB_OFFLINE=1``).

- **When the recipe loads** (:func:`expand_init`), the source's config files are read (never its weights)
  and give the ``encoders``, ``fusion``, ``llm``, ``views`` and ``resize_policy`` of the model; every key the
  recipe's ``model:`` section sets overrides them (mappings merge key by key, ``encoders`` entry by entry, as
  a list or as ``model.encoders.0.KEY=...`` overrides). A part keeps the init's ``name``: the init's weights
  are loaded into every part, so a part cannot be swapped for another kind (drop ``init`` for that).
- **When the model is built** (:func:`load_init_weights`, called by :func:`vlkit.model.build_model`), the
  source's weights are loaded into the whole model; an override that changes a part's shape fails there,
  naming the init.

The resolved recipe keeps ``init`` (a run folder's ``recipe.yaml`` names where it started; ``vlkit export``
gives a folder that needs nothing else). A hub id whose files are not in the cache while offline raises
:class:`InitUnavailable`: ``vlkit config`` then checks what does not depend on the model's parts and says
what it could not check (:func:`check_without_init`); every other command fails with the fix.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlkit.errors import CheckpointError, RecipeError
from vlkit.sources import looks_like_hub_id

if TYPE_CHECKING:
    from vlkit.model import VLM

KEY = "model.init"
CONFIG_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
"""What the recipe needs of a hub source: configs, processor and tokenizer files (in subfolders too)."""
WEIGHT_FILES = [*CONFIG_FILES, "*.safetensors"]
_PARTS = ("fusion", "llm")


class InitUnavailable(RecipeError):
    """``model.init`` names a hub id whose files are neither local nor downloadable now (offline)."""

    def __init__(self, message: str, key: str | None = None, *, source: str = "", data: Any = None,
                 layers: Any = None) -> None:
        super().__init__(message, key)
        self.source = source
        self.data = data
        """The merged recipe (before validation), set by :func:`vlkit.config.load_recipe`."""
        self.layers = layers


# ----------------------------------------------------------------------------------------------- resolve


def resolve(source: str, patterns: list[str]) -> Path:
    """The local folder of ``source``: itself, or the hub snapshot holding ``patterns`` (downloaded unless
    offline, as transformers' ``from_pretrained`` resolves hub ids)."""
    if not isinstance(source, str) or not source.strip():
        raise RecipeError(f"expected a folder or a hub id (org/name), got {source!r}", KEY)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecipeError(f"{source} is a file; `init` takes the folder of a vlkit saved model or a Hugging "
                              "Face LLaVA model", KEY)
        return path.resolve()
    if "/" not in source or not looks_like_hub_id(source):  # init names org/name repositories
        raise RecipeError(f"folder not found: {source} (looked for {path.absolute()}); `init` takes a vlkit saved "
                          "model folder (vlkit export), a Hugging Face LLaVA folder or a hub id (org/name)", KEY)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise RecipeError(f"{source!r} is not a local folder and no Hugging Face Hub repository of that name is "
                          "reachable (a private or gated one needs `hf auth login`)", KEY) from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 forbids downloading them" if constants.HF_HUB_OFFLINE
               else "the Hub could not be reached")
        raise InitUnavailable(
            f"{source!r} is not a local folder and its files are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}. Download it once where the Hub is reachable "
            f"(`hf download {source}`) or run with HF_HUB_OFFLINE=0, or set `init` to a local folder",
            KEY, source=source) from None
    except (HfHubHTTPError, OSError) as exc:
        raise RecipeError(f"cannot fetch {source!r} from the Hugging Face Hub: {exc}", KEY) from None


def _kind(folder: Path, source: str) -> str:
    """``vlkit`` (a saved model) or ``llava``; anything else is refused with what `init` reads."""
    from vlkit.export.llava import is_llava_folder
    from vlkit.io.pretrained import CONFIG, _format_version

    if _format_version(folder) is not None:
        return "vlkit"
    if is_llava_folder(folder):
        return "llava"
    if (folder / "recipe.yaml").is_file():
        raise RecipeError(f"{source} is a vlkit run folder; export it first (`vlkit export {source} --out DIR`) "
                          "and set `init: DIR`", KEY)
    found = f"its {CONFIG} is neither vlkit's nor LLaVA's" if (folder / CONFIG).is_file() else f"no {CONFIG}"
    raise RecipeError(f"{source} is neither a vlkit saved model nor a Hugging Face LLaVA model ({found})", KEY)


def init_section(source: str) -> dict[str, Any]:
    """The ``model:`` section (encoders, fusion, llm, views, resize_policy) of the model ``source`` holds."""
    from vlkit.export.llava import llava_model_section
    from vlkit.io.pretrained import read_config, resolve_folder_paths

    folder = resolve(source, CONFIG_FILES)
    try:
        if _kind(folder, source) == "llava":
            is_hub = not Path(source).expanduser().exists()  # the tokenizer resolves through the hub, as the id
            section = llava_model_section(folder, tokenizer=source if is_hub else None)
        else:
            section = resolve_folder_paths(read_config(folder)["model"], folder)
    except CheckpointError as exc:
        raise RecipeError(str(exc), KEY) from None
    section = {k: v for k, v in section.items() if k != "init"}
    return section


# ------------------------------------------------------------------------------------------------ merge


def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key (recursively), anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v)
        return out
    return copy.deepcopy(over)


def _part(base: dict[str, Any] | None, over: Any, where: str) -> Any:
    if not isinstance(over, dict) or not isinstance(base, dict):
        if over is not None and base is not None:
            raise RecipeError(f"expected a mapping of keys overriding the init's {base.get('name')!r} section, "
                              f"got {over!r}", where)
        if base is None and over is not None:
            raise RecipeError("the init's model has no such part", where)
        return base if over is None else over
    name = over.get("name", base.get("name"))
    if name != base.get("name"):
        raise RecipeError(f"{name!r} would replace the init's {base.get('name')!r}; the init's weights are loaded "
                          "into every part, so a part keeps its kind: override its keys only (or drop `init` and "
                          "describe every part)", f"{where}.name")
    return _merge(base, over)


def expand_init(model: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``model:`` section (with ``init``) completed from the init's own section."""
    source = model.get("init")
    base = init_section(source)
    out = {**base, **{k: v for k, v in model.items() if k not in ("encoders", *_PARTS)}}
    for key in _PARTS:
        if key in model:
            out[key] = _part(base.get(key), model[key], f"model.{key}")
    encoders = model.get("encoders")
    if encoders is not None:
        n = len(base["encoders"])
        if isinstance(encoders, dict):  # `model.encoders.0.layer=-1` overrides: {"0": {...}}
            bad = [k for k in encoders if not str(k).isdigit() or int(k) >= n]
            if bad:
                raise RecipeError(f"the init has {n} encoder(s) (indices 0..{n - 1}); cannot override {bad[0]!r}",
                                  "model.encoders")
            over = [encoders.get(str(i), encoders.get(i)) for i in range(n)]
        elif isinstance(encoders, list):
            if len(encoders) != n:
                raise RecipeError(f"the init has {n} encoder(s); list {n} entries to override them in order "
                                  f"(got {len(encoders)})", "model.encoders")
            over = encoders
        else:
            raise RecipeError(f"expected a list of encoder overrides, got {encoders!r}", "model.encoders")
        out["encoders"] = [_part(b, o, f"model.encoders[{i}]") if o is not None else b
                           for i, (b, o) in enumerate(zip(base["encoders"], over))]
    out["views"] = _merge(base.get("views"), model["views"]) if "views" in model else base.get("views")
    out["init"] = source
    return out


# ---------------------------------------------------------------------------------------------- weights


def load_init_weights(model: VLM, source: str) -> None:
    """Load the weights of ``source`` (``model.init``) into ``model``, built from the expanded section."""
    from vlkit.export.llava import llava_weights
    from vlkit.io.pretrained import load_weights
    from vlkit.weights import load_complete_state

    try:
        folder = resolve(source, WEIGHT_FILES)
        what = f"{KEY} {source}: its weights do not fill the recipe's model (does an override change a part's " \
               "architecture?)"
        try:
            if _kind(folder, source) == "llava":
                load_complete_state(model, llava_weights(model, folder), what)
            else:
                load_weights(model, folder)
        except RuntimeError as exc:  # load_state_dict: a tensor of another shape
            raise CheckpointError(f"{what}: {exc}") from None
        except CheckpointError as exc:
            raise CheckpointError(str(exc) if str(exc).startswith(KEY) else f"{KEY} {source}: {exc}") from None
    except RecipeError as exc:
        raise CheckpointError(str(exc)) from None


# ------------------------------------------------------------------------------------- vlkit config


def check_without_init(exc: InitUnavailable) -> tuple[str, str]:
    """What ``vlkit config`` can check of a recipe whose hub ``init`` is not available offline: everything but
    the model's parts. Returns (the recipe as YAML, its model section as written; a note of what was not
    checked). Errors name the file that set the key, as :func:`vlkit.config.load_recipe`'s do."""
    from vlkit.config import Recipe
    from vlkit.config.validation import validate_parts
    from vlkit.schema import to_dataclass

    data = copy.deepcopy(exc.data)
    given = data.get("model") or {}
    try:
        # the model's own keys are checked against the schema; its part sections need the init
        schema = {**given, "encoders": [], "llm": {}, "fusion": None}
        recipe = to_dataclass(Recipe, {**data, "model": schema})
        validate_parts(recipe, with_model=False)
    except RecipeError as err:
        origin = exc.layers.origin(err.key) if err.key and exc.layers is not None else "recipe"
        raise RecipeError(f"{origin}: {err}") from None
    out = recipe.to_dict()
    out.pop("source")
    out["model"] = {"init": exc.source, **{k: v for k, v in dataclasses.asdict(recipe.model).items()
                       if k in given and k not in ("encoders", "llm", "fusion")},
                    **{k: given[k] for k in ("encoders", "fusion", "llm") if k in given}}
    lora = any(s.lora is not None for s in recipe.stages)
    note = (f"{KEY} {exc.source!r} is not available offline, so its config.json was not read: the model's "
            "parts (encoders, fusion, llm: the init's sections and this recipe's overrides of them), the stages' "
            f"objectives against the model{', LoRA parts' if lora else ''} and half-precision checks of the parts "
            "were NOT checked. Checked: the recipe's schema, the model keys it sets, data, stages, trainer and "
            f"eval. To check everything, download the model's config files (`hf download {exc.source} "
            "--include '*.json' '*.model' '*.jinja'`) or run with HF_HUB_OFFLINE=0.")
    return yaml.safe_dump(out, sort_keys=False), note


__all__ = ["InitUnavailable", "check_without_init", "expand_init", "init_section", "load_init_weights", "resolve"]
