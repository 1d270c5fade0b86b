"""``vlkit new encoder|fusion|llm|dataset NAME``: write a plugin package for one new part.

The package (``vlkit-NAME``, import name ``vlkit_NAME``) holds a ``pyproject.toml`` with the part's entry
point, the part (``Args`` and the interface filled in, working as written), a pytest file, a demo recipe
that trains a tiny VLM using the part on vlkit's offline demo data, and a README. Templates are the files
in ``templates/`` with ``{{placeholders}}``; the one for the part's kind provides ``part.py`` and the test.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlkit.errors import VlkitError

TEMPLATES = Path(__file__).parent / "templates"
KINDS = ("encoder", "fusion", "llm", "dataset")
_NAME = re.compile(r"[a-z][a-z0-9_]*")

_DEFAULT = {
    "encoders": "    - {name: clip, config: {embed_dim: 64, vision_cfg: {image_size: 64, patch_size: 8, width: 64, "
                "layers: 2, heads: 4}}}",
    "fusion": "{name: mlp, projector: mlp2x_gelu}",
    "llm": "    name: hf_causal\n    tokenizer: ${recipe_dir}/data/demo/tokenizer\n    chat_template: auto\n"
           "    config: {model_type: llama, hidden_size: 64, intermediate_size: 256, num_hidden_layers: 2,\n"
           "             num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 512}",
    "train": '{name: shards, urls: "${recipe_dir}/data/demo/train-{000000..000003}.tar", batch_size: 32, '
             "num_workers: 0}",
}
_MINE = {
    "encoder": ("encoders", "    - {name: {{name}}, image_size: 64, patch_size: 8, width: 64}"),
    "fusion": ("fusion", "{name: {{name}}, tokens: 16}"),
    "llm": ("llm", "    name: {{name}}\n    tokenizer: ${recipe_dir}/data/demo/tokenizer\n    hidden_size: 64\n"
                   "    layers: 2\n    heads: 4"),
    "dataset": ("train", '{name: {{name}}, urls: "${recipe_dir}/data/demo/train-{000000..000003}.tar", '
                         "batch_size: 32}"),
}


def _render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def new_part(kind: str, name: str, out: str | Path | None = None) -> Path:
    """Write the plugin package for a new ``kind`` part called ``name`` into ``out`` (default ``./<name>``);
    return its folder. Refuses an existing non-empty folder."""
    if kind not in KINDS:
        raise VlkitError(f"unknown part kind {kind!r}; one of {', '.join(KINDS)}")
    if not _NAME.fullmatch(name):
        raise VlkitError(f"part name {name!r} must be lower case letters, digits and _ (a Python identifier, "
                         "e.g. my_encoder): it names the entry point and the package vlkit_<name>")
    folder = Path(out) if out is not None else Path(name)
    if folder.exists() and any(folder.iterdir()):
        raise VlkitError(f"{folder} exists and is not empty; pass another --out")
    camel = "".join(part.capitalize() for part in name.split("_"))
    suffix = {"encoder": "Encoder", "fusion": "Fusion", "llm": "LLM", "dataset": "Dataset"}[kind]
    values = {"name": name, "kind": kind, "dist": f"vlkit-{name.replace('_', '-')}", "package": f"vlkit_{name}",
              "module": kind, "Class": camel if camel.endswith(suffix) else camel + suffix}
    sections = dict(_DEFAULT)
    key, mine = _MINE[kind]
    sections[key] = mine
    package = folder / "src" / values["package"]
    files = {
        folder / "pyproject.toml": _render((TEMPLATES / "pyproject.toml.tmpl").read_text(), values),
        folder / "README.md": _render((TEMPLATES / "README.md.tmpl").read_text(), values),
        folder / "demo.yaml": _render(_render((TEMPLATES / "demo.yaml.tmpl").read_text(), sections), values),
        package / "__init__.py": _render((TEMPLATES / "__init__.py.tmpl").read_text(), values),
        package / f"{kind}.py": _render((TEMPLATES / kind / "part.py.tmpl").read_text(), values),
        folder / "tests" / f"test_{name}.py": _render((TEMPLATES / kind / "test.py.tmpl").read_text(), values),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder
