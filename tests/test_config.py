"""Recipes: base inheritance, dotted overrides, validation errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlkit
from vlkit.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_and_overrides(tiny_recipe: Path, tmp_path: Path):
    write(tmp_path / "sub" / "mid.yaml", f"base: ../{tiny_recipe.name}\nseed: 5\n"
                "model: {fusion: {name: linear}}\n")
    top = write(tmp_path / "sub" / "deeper" / "top.yaml", "base: ../mid.yaml\nseed: 7\n")
    recipe = vlkit.load_recipe(top, ["stages.1.lr=5e-4", "model.fusion.name=token_concat"])
    assert recipe.seed == 7  # later file wins
    assert recipe.model.fusion["name"] == "token_concat"  # override wins over base files
    assert recipe.model.fusion["projector"] == "mlp2x_gelu"  # defaults filled in
    assert recipe.stages[1].lr == 5e-4 and isinstance(recipe.stages[1].lr, float)
    assert recipe.model.llm["config"]["hidden_size"] == 32  # inherited through two levels


def test_unknown_key_names_file_key_and_suggestion(tiny_recipe: Path, tmp_path: Path):
    child = write(tmp_path / "child.yaml", f"base: {tiny_recipe.name}\nmodel: {{fusion: {{projecter: linear}}}}\n")
    with pytest.raises(RecipeError) as err:
        vlkit.load_recipe(child)
    msg = str(err.value)
    assert str(child) in msg and "model.fusion.projecter" in msg and "Did you mean 'projector'" in msg


def test_error_in_base_file_names_the_base(tiny_recipe: Path, tmp_path: Path):
    base = write(tmp_path / "base.yaml", tiny_recipe.read_text().replace("seed: 0", "seed: zero"))
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    with pytest.raises(RecipeError, match=rf"{base}: seed: expected int, got str"):
        vlkit.load_recipe(child)


def test_override_errors_say_command_line(tiny_recipe: Path):
    with pytest.raises(RecipeError, match=r"command-line override: stages\[0\].max_steps: expected int"):
        vlkit.load_recipe(tiny_recipe, ["stages.0.max_steps=many"])
    with pytest.raises(RecipeError, match=r"command-line override: model.fusion.name: unknown fusion "
                                          r"'mpl'.*Did you mean 'mlp'"):
        vlkit.load_recipe(tiny_recipe, ["model.fusion.name=mpl"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        vlkit.load_recipe(tiny_recipe, ["model.fusion.name"])


def test_missing_required_and_literal_choices(tiny_recipe: Path, tmp_path: Path):
    text = tiny_recipe.read_text()
    no_llm = write(tmp_path / "a.yaml", text.replace("  llm:\n", "  lm:\n"))
    with pytest.raises(RecipeError, match=r"model.lm: unknown key. Did you mean 'llm'"):
        vlkit.load_recipe(no_llm)
    with pytest.raises(RecipeError, match=r"stages\[0\].schedule: 'cosin' is not one of .*Did you mean 'cosine'"):
        vlkit.load_recipe(tiny_recipe, ["stages.0.schedule=cosin"])
    with pytest.raises(RecipeError, match=r"model.llm.*`config` needs `tokenizer`|model.llm.tokenizer"):
        vlkit.load_recipe(tiny_recipe, ["model.llm.tokenizer=null"])


def test_missing_base_file_and_cycle(tmp_path: Path):
    a = write(tmp_path / "a.yaml", "base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="recipe file not found.*nowhere.yaml.*named in `base:`"):
        vlkit.load_recipe(a)
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: b.yaml\n")
    with pytest.raises(RecipeError, match="circular"):
        vlkit.load_recipe(tmp_path / "b.yaml")


def test_duplicate_stage_names_rejected(tiny_recipe: Path):
    with pytest.raises(RecipeError, match="duplicate stage name"):
        vlkit.load_recipe(tiny_recipe, ["stages.1.name=align"])


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")))
def test_shipped_recipes_validate(recipe: str, monkeypatch):
    from vlkit.io.init import InitUnavailable, check_without_init

    monkeypatch.chdir(ROOT)
    try:
        loaded = vlkit.load_recipe(recipe)
    except InitUnavailable as exc:  # a hub `model.init` not cached offline: all but the model's parts (as
        assert check_without_init(exc)[1]  # `vlkit config`; tests/test_init_from.py checks the whole recipe)
        return
    assert loaded.stages and loaded.model.encoders


def test_list_override_then_item_override(tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["stages=[{name: s, trainable: [fusion], max_steps: 2}]",
                                             "stages.0.lr=1e-3"])
    assert [(s.name, s.lr) for s in recipe.stages] == [("s", 1e-3)]
    with pytest.raises(RecipeError, match=r"command-line override: stages\[0\].lr: expected float"):
        vlkit.load_recipe(tiny_recipe, ["stages=[{name: s, trainable: [fusion], max_steps: 2}]", "stages.0.lr=x"])


def test_part_by_import_path_gets_a_usable_key(tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["model.encoders.0.name=vlkit.encoders.clip:CLIPEncoder"])
    model = vlkit.build_model(recipe)
    assert list(model.encoders) == ["CLIPEncoder"]


# ------------------------------------------------------------------------------------ recipe semantics


def test_replace_marker_replaces_a_whole_section_instead_of_merging(tiny_recipe: Path, tmp_path: Path):
    merged = write(tmp_path / "merge.yaml", f"base: {tiny_recipe}\nmodel: {{fusion: {{name: linear}}}}\n")
    with pytest.raises(RecipeError) as err:  # merged key by key: the base's `projector` stays and is refused
        vlkit.load_recipe(merged)
    message = str(err.value)
    assert message.startswith(f"{tiny_recipe}: model.fusion.projector: unknown key")  # the file that set it
    assert f"`model.fusion.name` was set in {merged}" in message and "_replace_: true" in message
    replaced = write(tmp_path / "replace.yaml",
                     f"base: {tiny_recipe}\nmodel: {{fusion: {{_replace_: true, name: linear}}}}\n"
                     "stages: [{name: only, trainable: [fusion], max_steps: 1}]\n")
    recipe = vlkit.load_recipe(replaced)
    assert recipe.model.fusion == {"name": "linear", "streams": None}
    assert [s.name for s in recipe.stages] == ["only"]  # lists are replaced whole
    assert recipe.model.llm["config"]["hidden_size"] == 32  # the other sections still merge
    bad = write(tmp_path / "bad.yaml", f"base: {tiny_recipe}\nmodel: {{fusion: {{_replace_: yes please}}}}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: model.fusion._replace_: expected true or false"):
        vlkit.load_recipe(bad)


def test_recipe_dir_resolves_against_the_file_that_writes_it(tiny_recipe: Path, demo_dir: Path, tmp_path: Path,
                                                             monkeypatch):
    write(tmp_path / "shared" / "base.yaml", tiny_recipe.read_text().replace(
        f"tokenizer: {demo_dir}/tokenizer", "tokenizer: ${recipe_dir}/../demo/tokenizer"))
    (tmp_path / "demo").symlink_to(demo_dir)
    child = write(tmp_path / "runs" / "exp" / "child.yaml", "base: ../../shared/base.yaml\n"
                  "data: {val: {urls: '${recipe_dir}/val.tar'}}\n")
    monkeypatch.chdir(tmp_path / "runs")  # anywhere: the paths do not depend on the working directory
    recipe = vlkit.load_recipe("exp/child.yaml", ["eval.metrics=[exact_match]"])
    assert recipe.model.llm["tokenizer"] == str(tmp_path / "demo" / "tokenizer")  # normalised, base's folder
    assert recipe.data.val["urls"] == str(child.parent.resolve() / "val.tar")  # the child's own folder
    assert "${recipe_dir}" not in recipe.to_yaml()


@pytest.mark.parametrize("key", ["source", "sourse", "base_dir"])
def test_unknown_top_level_keys_are_refused(tiny_recipe: Path, tmp_path: Path, key: str):
    path = write(tmp_path / "r.yaml", f"base: {tiny_recipe}\n{key}: somewhere.yaml\n")
    with pytest.raises(RecipeError, match=rf"r.yaml: {key}: unknown key"):
        vlkit.load_recipe(path)


@pytest.mark.parametrize(("override", "match"), [
    ("model.encoders.0.name=3", r"model.encoders\[0\].name: a part name must be a string, got int"),
    ("model.fusion.name=[mlp]", r"model.fusion.name: a part name must be a string, got list"),
    ("model.encoders=[clip]", r"model.encoders\[0\]: expected a mapping, got str"),
    ("data.train=7", r"data.train: expected a mapping, got int"),
    ("trainer.devices=[1]", r"trainer.devices: expected int \| str, got list"),
    ("stages.0.trainable=fusion", r"stages\[0\].trainable: expected a list, got str"),
    ("base=3", r"override"),
])
def test_wrong_types_anywhere_are_one_line_errors(tiny_recipe: Path, override: str, match: str):
    with pytest.raises(RecipeError, match=match) as err:
        vlkit.load_recipe(tiny_recipe, [override])
    assert "\n" not in str(err.value)


def test_library_check_in_part_arguments_is_a_recipe_error():
    """The wrong type the fuzzing of the demo recipes found: transformers' own config validation."""
    recipe = ROOT / "recipes" / "demo" / "florence_dbfusion.yaml"
    with pytest.raises(RecipeError, match=r"model.encoders\[0\]: encoder 'florence2' rejected its arguments: "
                       r"StrictDataclassFieldValidationError: .*depths") as err:
        vlkit.load_recipe(recipe, ["model.encoders.0.config.vision_config.depths=3"])
    assert "\n" not in str(err.value)


def test_key_is_accepted_by_every_encoder(tiny_recipe: Path, tmp_path: Path, monkeypatch):
    write(tmp_path / "keyless_parts.py", (
        "from dataclasses import dataclass\n"
        "from torch import nn\n"
        "from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder\n\n\n"
        "class Keyless(VisionEncoder):\n"
        "    @dataclass\n"
        "    class Args:\n"
        "        width: int = 16\n\n"
        "    def __init__(self, args):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, args.width, 8, 8)\n"
        "        self.num_tokens, self.stream_dims = 16, {'tokens': args.width}\n"
        "        self.preprocess = Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)\n\n"
        "    def forward(self, x):\n"
        "        return {'tokens': self.conv(x).flatten(2).transpose(1, 2)}\n"))
    monkeypatch.chdir(tmp_path)  # `module:Class` names are found in the working directory, as documented
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    with pytest.raises(RecipeError, match=r"model.encoders\[0\].config: unknown key.*set on the command line"):
        vlkit.load_recipe(tiny_recipe, ["model.encoders.0.name=keyless_parts:Keyless"])
    recipe = vlkit.load_recipe(tiny_recipe, ["model.encoders=[{name: 'keyless_parts:Keyless', key: vis}]"])
    assert recipe.model.encoders[0]["key"] == "vis"
    assert "key" not in {f.name for f in __import__("dataclasses").fields(vlkit.ENCODERS.get(
        "keyless_parts:Keyless").Args)}
    assert list(vlkit.build_model(recipe).encoders) == ["vis"]
    with pytest.raises(RecipeError, match=r"model.encoders\[0\].key: expected str"):
        vlkit.load_recipe(tiny_recipe, ["model.encoders=[{name: 'keyless_parts:Keyless', key: 3}]"])


def test_package_dir_names_an_installed_package_folder(tiny_recipe: Path, tmp_path: Path):
    import webdataset

    recipe = vlkit.load_recipe(tiny_recipe, ["model.llm.tokenizer=${package_dir:webdataset}/../x"])
    assert recipe.model.llm["tokenizer"] == str(Path(webdataset.__file__).parent) + "/../x"
    with pytest.raises(RecipeError, match=r"\$\{package_dir:no_such_pkg\}: no installed Python package "
                                          r"'no_such_pkg' \(install it, e.g. `pip install no-such-pkg`"):
        vlkit.load_recipe(tiny_recipe, ["model.llm.tokenizer=${package_dir:no_such_pkg}"])
