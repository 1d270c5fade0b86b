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
    monkeypatch.chdir(ROOT)
    loaded = vlkit.load_recipe(recipe)
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
