"""Registry: registration, lookup with suggestions, build with validated Args, plugins via entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

import vlkit
from vlkit.errors import RecipeError
from vlkit.registry import ENCODERS, FUSIONS, LLMS, REGISTRIES, PluginWarning, Registry


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
    with pytest.warns(PluginWarning, match=r"entry point 'broken = module_that_does_not_exist_xyz'.*failed to "
                      r"load: ModuleNotFoundError") as record:
        names = reg.names()
    assert len(record) == 1
    assert names == ["spinner", "sprocket"]
    assert reg.index()["sprocket"].doc == "Plugin part."  # read from the source: nothing imported yet
    assert "good_plugin" not in sys.modules
    assert reg.build({"name": "sprocket"}).args.teeth == 12


def test_builtin_parts_are_registered():
    assert {"clip", "dinov2"} <= set(ENCODERS.names())
    assert {"linear", "mlp", "token_concat"} <= set(FUSIONS.names())
    assert "hf_causal" in LLMS.names()


def test_static_index_matches_the_registrations():
    """The names `vlkit list` reads from the sources are exactly what importing the modules registers."""
    for registry in REGISTRIES.values():
        registry.load_all()
        builtin = {n: i.target for n, i in registry.index().items() if i.entry_point is None}
        imported = {n: f"{c.__module__}:{c.__qualname__}" for n, c in registry._classes.items()
                    if c.__module__.startswith("vlkit.")}
        assert builtin == imported


# ------------------------------------------------------------------------------------- broken plugins

PLUGIN_DIST = "vlkit-broken-plugins"
PLUGIN_FILES = {
    "bp_import_error.py": "import sys\nraise ImportError('needs the library frobnicate>=9')\nclass Encoder:\n    pass\n",
    "bp_no_args.py": (
        "from vlkit.fusions.base import Fusion\n"
        "class NoArgs(Fusion):\n"
        "    '''A fusion without Args.'''\n"
    ),
    "bp_wrong_base.py": (
        "from dataclasses import dataclass\n"
        "class WrongBase:\n"
        "    '''Not a VisionEncoder.'''\n"
        "    @dataclass\n"
        "    class Args:\n"
        "        width: int = 8\n"
        "    def __init__(self, args):\n"
        "        self.args = args\n"
    ),
    "bp_clash.py": (
        "from dataclasses import dataclass\n"
        "from vlkit.fusions.base import Fusion\n"
        "from vlkit.registry import FUSIONS\n"
        "@FUSIONS.register('mlp')\n"
        "class MyMLP(Fusion):\n"
        "    '''Takes the built-in name.'''\n"
        "    @dataclass\n"
        "    class Args:\n"
        "        pass\n"
    ),
}
PLUGIN_ENTRY_POINTS = """\
[vlkit.encoders]
import_error_enc = bp_import_error:Encoder
wrong_base_enc = bp_wrong_base:WrongBase
clip = bp_wrong_base:WrongBase
not_installed_enc = bp_not_installed_module:Encoder

[vlkit.fusions]
no_args_fusion = bp_no_args:NoArgs
clash_module = bp_clash
"""


def write_plugin_dist(site: Path) -> Path:
    """A plugin distribution as pip installs one: modules + ``<dist>.dist-info`` with ``entry_points.txt``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, text in PLUGIN_FILES.items():
        (site / name).write_text(text)
    info = site / "vlkit_broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN_DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    return site


@pytest.fixture()
def broken_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The broken plugin distribution on sys.path, with the global registries' state reset around the test."""
    site = write_plugin_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    for registry in REGISTRIES.values():
        for attr, value in (("_index", None), ("_failed", {}), ("_loaded", set(registry._loaded)),
                            ("_classes", dict(registry._classes))):
            monkeypatch.setattr(registry, attr, value)
    yield site
    for module in [m for m in sys.modules if m.startswith("bp_")]:
        del sys.modules[module]


def plugin_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PluginWarning)]


def recipe_with(tmp_path: Path, encoder: str = "clip", fusion: str = "mlp") -> Path:
    text = TINY_RECIPE.format(demo=tmp_path / "nodata").replace("- name: clip", f"- name: {encoder}", 1)
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("fusion: {name: mlp,", f"fusion: {{name: {fusion},"))
    return path


def test_plugin_failures_seen_without_importing_are_one_warning_each(broken_plugins, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        encoders, fusions = ENCODERS.names(), FUSIONS.names()
    messages = plugin_warnings(record)
    assert len(messages) == 3, messages
    missing = next(m for m in messages if "not_installed" in m)
    clash_enc = next(m for m in messages if "'clip = " in m)
    clash_fusion = next(m for m in messages if "clash_module" in m)
    assert f"plugin '{PLUGIN_DIST}', entry point 'not_installed_enc = bp_not_installed_module:Encoder'" in missing
    assert "ModuleNotFoundError: No module named 'bp_not_installed_module'" in missing
    assert "registration clash" in clash_enc and "'clip' is already taken by built-in" in clash_enc
    assert "entry point 'clash_module = bp_clash'" in clash_fusion and "'mlp' is already taken" in clash_fusion
    # everything else works: the built-ins keep their names, the other plugins are listed
    assert {"clip", "dinov2", "import_error_enc", "wrong_base_enc"} <= set(encoders)
    assert "not_installed_enc" not in encoders
    assert {"mlp", "linear", "no_args_fusion"} <= set(fusions)
    assert ENCODERS.get("clip").__module__ == "vlkit.encoders.clip"
    assert FUSIONS.get("mlp").__module__ == "vlkit.fusions.mlp"
    assert "bp_clash" not in sys.modules  # a clashing plugin is never imported
    with pytest.raises(RecipeError, match=r"model.encoders\[0\].name: encoder 'not_installed_enc' is installed "
                       r"\(plugin 'vlkit-broken-plugins'.*\) but failed to load: ModuleNotFoundError"):
        vlkit.load_recipe(recipe_with(tmp_path, encoder="not_installed_enc"))


@pytest.mark.parametrize(("kind", "name", "cause"), [
    ("encoders", "import_error_enc", r"ImportError: needs the library frobnicate>=9"),
    ("fusions", "no_args_fusion", r"bp_no_args.NoArgs has no dataclass `Args`"),
    ("encoders", "wrong_base_enc", r"bp_wrong_base.WrongBase does not subclass vlkit.encoders.base.VisionEncoder"),
])
def test_a_plugin_failing_to_load_is_one_warning_and_only_its_recipes_fail(broken_plugins, tmp_path, kind, name,
                                                                           cause):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        REGISTRIES[kind].names()
        builtin = vlkit.load_recipe(recipe_with(tmp_path))  # a recipe of built-ins never touches the plugin
        assert builtin.model.encoders[0]["name"] == "clip"
        assert not [m for m in plugin_warnings(record) if name in m]
        section = {"encoder": name} if kind == "encoders" else {"fusion": name}
        with pytest.raises(RecipeError, match=rf"{name!r} is installed \(plugin '{PLUGIN_DIST}', entry point "
                           rf"'{name} = [^']+'.*\) but failed to load: {cause}"):
            vlkit.load_recipe(recipe_with(tmp_path, **section))
        with pytest.raises(RecipeError, match="failed to load"):  # the second lookup says the same
            REGISTRIES[kind].get(name)
    mine = [m for m in plugin_warnings(record) if name in m]
    assert len(mine) == 1 and re.search(rf"entry point '{name} = .*failed to load: {cause}", mine[0])
    assert name not in REGISTRIES[kind].names() and name in REGISTRIES[kind].failures()
    assert vlkit.load_recipe(recipe_with(tmp_path)).model.fusion["name"] == "mlp"


def test_cli_with_broken_plugins_installed(broken_plugins, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_plugins), *sys.path]), "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "vlkit.cli", "list", "--check"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    warned = [line for line in listed.stderr.splitlines() if "plugin skipped" in line]
    assert len(warned) == 6, listed.stderr  # one line per broken entry point, no traceback
    assert all(line.startswith("warning: vlkit ") for line in warned)
    assert "Traceback" not in listed.stderr
    assert "import_error_enc (installed but failed to load: ImportError" in " ".join(listed.stdout.split())
    config = subprocess.run([sys.executable, "-m", "vlkit.cli", "config", str(recipe_with(tmp_path))],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    assert "name: clip" in config.stdout and "Traceback" not in config.stderr
    assert "import_error_enc" not in config.stderr  # a plugin the recipe does not name is not even imported
