"""Registry: registration, lookup with suggestions, build with validated Args, plugins via entry points."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest

from vlkit.errors import RecipeError
from vlkit.registry import ENCODERS, FUSIONS, LLMS, Registry


def make_registry() -> Registry:
    reg = Registry("widget", "vlkit.test-widgets")

    @reg.register("spinner")
    class Spinner:
        """A test part."""

        @dataclass
        class Args:
            speed: float = 1.0
            label: str = "x"

        def __init__(self, args, scale: int = 1) -> None:
            self.args = args
            self.scale = scale

    return reg


def test_build_validates_args_and_passes_context():
    reg = make_registry()
    part = reg.build({"name": "spinner", "speed": 2}, scale=3)
    assert part.args.speed == 2.0 and isinstance(part.args.speed, float)
    assert part.scale == 3
    assert reg.names() == ["spinner"]


def test_unknown_name_suggests_close_matches():
    reg = make_registry()
    with pytest.raises(RecipeError, match=r"unknown widget 'spiner'.*Did you mean 'spinner'"):
        reg.get("spiner")
    with pytest.raises(RecipeError, match=r"model.x.name: unknown widget"):
        reg.parse_args({"name": "spiner"}, "model.x")


def test_unknown_arg_and_wrong_type_name_the_key():
    reg = make_registry()
    with pytest.raises(RecipeError, match=r"model.x.sped: unknown key. Did you mean 'speed'"):
        reg.parse_args({"name": "spinner", "sped": 1}, "model.x")
    with pytest.raises(RecipeError, match=r"model.x.label: expected str, got int"):
        reg.parse_args({"name": "spinner", "label": 3}, "model.x")


def test_register_requires_args_dataclass_and_unique_name():
    reg = make_registry()
    with pytest.raises(TypeError, match="dataclass `Args`"):
        reg.register("bad")(type("Bad", (), {}))
    with pytest.raises(ValueError, match="already registered"):
        @reg.register("spinner")
        class Other:
            @dataclass
            class Args:
                pass


def test_import_path_names_a_class_without_packaging(tmp_path, monkeypatch):
    (tmp_path / "my_parts.py").write_text(
        "from dataclasses import dataclass\n"
        "class Gizmo:\n"
        "    @dataclass\n"
        "    class Args:\n"
        "        size: int = 4\n"
        "    def __init__(self, args):\n"
        "        self.args = args\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = make_registry()
    assert reg.build({"name": "my_parts:Gizmo", "size": 7}).args.size == 7
    with pytest.raises(RecipeError, match="cannot import widget 'my_parts:Nope'"):
        reg.get("my_parts:Nope")


def test_entry_point_plugins_load_and_broken_plugin_only_warns(tmp_path, monkeypatch):
    (tmp_path / "good_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "class Sprocket:\n"
        "    '''Plugin part.'''\n"
        "    @dataclass\n"
        "    class Args:\n"
        "        teeth: int = 12\n"
        "    def __init__(self, args):\n"
        "        self.args = args\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("sprocket", "good_plugin:Sprocket", "vlkit.test-widgets"),
        EntryPoint("broken", "module_that_does_not_exist_xyz", "vlkit.test-widgets"),
    ]
    monkeypatch.setattr(sys.modules["vlkit.registry"], "entry_points",
                        lambda group: [e for e in eps if e.group == group])
    reg = make_registry()
    with pytest.warns(UserWarning, match=r"plugin 'broken'.*failed to import.*ModuleNotFoundError"):
        names = reg.names()
    assert names == ["spinner", "sprocket"]
    assert reg.build({"name": "sprocket"}).args.teeth == 12


def test_builtin_parts_are_registered():
    assert {"clip", "dinov2"} <= set(ENCODERS.names())
    assert {"linear", "mlp", "token_concat"} <= set(FUSIONS.names())
    assert "hf_causal" in LLMS.names()
