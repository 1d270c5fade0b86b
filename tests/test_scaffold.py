"""`vlkit new`: the generated plugin package installs, passes its own test and trains as written."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vlkit
from vlkit.cli import main
from vlkit.errors import VlkitError
from vlkit.scaffold import KINDS, new_part

CLASSES = {"encoder": "MyEncoder", "fusion": "MyFusion", "llm": "MyLlmLLM", "dataset": "MyDataset"}


@pytest.mark.parametrize("kind", KINDS)
def test_new_writes_a_complete_package(kind: str, tmp_path: Path, capsys):
    name = {"encoder": "my_encoder", "fusion": "my_fusion", "llm": "my_llm", "dataset": "my_dataset"}[kind]
    assert main(["new", kind, name, "--out", str(tmp_path / "pkg")]) == 0
    assert "pip install -e" in capsys.readouterr().out
    pkg = tmp_path / "pkg"
    project = tomllib.loads((pkg / "pyproject.toml").read_text())
    target = project["project"]["entry-points"][f"vlkit.{kind}s"][name]
    module, _, cls = target.partition(":")
    assert module == f"vlkit_{name}.{kind}" and cls == CLASSES[kind]
    source = pkg / "src" / f"vlkit_{name}" / f"{kind}.py"
    tree = ast.parse(source.read_text())
    part = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    assert any(isinstance(n, ast.ClassDef) and n.name == "Args" for n in part.body)
    for path in pkg.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
        assert "{{" not in path.read_text().replace("{{000000..000003}}", "")
    recipe = vlkit.load_recipe(pkg / "demo.yaml", [f"model.encoders.0.name={target}"] if kind == "encoder" else
                               [f"model.fusion.name={target}"] if kind == "fusion" else
                               [f"model.llm.name={target}"] if kind == "llm" else [f"data.train.name={target}"])
    assert str(pkg.resolve() / "data" / "demo") in recipe.to_yaml()  # ${recipe_dir}: paths next to demo.yaml


@pytest.fixture(autouse=True)
def _plugin_src_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path / "pkg" / "src"))  # import-path lookups find the generated source
    yield
    for module in [m for m in sys.modules if m.startswith("vlkit_my_")]:
        del sys.modules[module]


def test_new_refuses_bad_names_and_existing_folders(tmp_path: Path):
    with pytest.raises(VlkitError, match="must be lower case"):
        new_part("encoder", "My-Encoder", tmp_path / "a")
    with pytest.raises(VlkitError, match="unknown part kind"):
        new_part("tokenizer", "x", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(VlkitError, match="not empty"):
        new_part("fusion", "pool", tmp_path / "b")


def _install(packages: list[Path], site: Path) -> None:
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([*base, "--no-build-isolation", "--no-index", *map(str, packages)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:  # no setuptools in this environment: let pip fetch it into an isolated build
        res = subprocess.run([*base, *map(str, packages)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_generated_plugins_install_pass_their_tests_and_train(tmp_path: Path, demo_dir: Path):
    """As a newcomer would: `vlkit new` for each kind, install the packages, run their tests, train their
    demo recipes, and train an encoder + fusion of their own together."""
    names = {"encoder": "cnn_patch", "fusion": "pool_sum", "llm": "tiny_llama", "dataset": "my_shards"}
    packages = {kind: new_part(kind, name, tmp_path / name) for kind, name in names.items()}
    site = tmp_path / "site"
    _install(list(packages.values()), site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "vlkit.cli", "list"], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in names.values():
        assert f"  {name} " in listed.stdout

    short = ["stages.0.max_steps=3", "eval.max_samples=8", "eval.baseline_samples=100", "trainer.progress_bar=false"]
    for kind, pkg in packages.items():
        (pkg / "data").mkdir()
        (pkg / "data" / "demo").symlink_to(demo_dir)
        shutil.rmtree(pkg / "src")  # the installed copy is what runs
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                               capture_output=True, text=True, env=env, cwd=pkg)
        assert tests.returncode == 0 and " passed" in tests.stdout and "skipped" not in tests.stdout, \
            tests.stdout[-2000:] + tests.stderr[-2000:]
        fit = subprocess.run([sys.executable, "-m", "vlkit.cli", "fit", "demo.yaml", *short, "--run-dir", "run"],
                             capture_output=True, text=True, env=env, cwd=pkg)
        assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
        summary = json.loads((pkg / "run" / "summary.json").read_text())
        assert summary["stages"][0]["steps"] == 3 and summary["val"]["val/count"] == 8
        assert f"name: {names[kind]}" in (pkg / "run" / "recipe.yaml").read_text()

    both = subprocess.run([sys.executable, "-m", "vlkit.cli", "fit", "demo.yaml", *short, "--run-dir", "run_both",
                           "model.fusion={name: pool_sum, tokens: 8}"], capture_output=True, text=True, env=env,
                          cwd=packages["encoder"])
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    resolved = (packages["encoder"] / "run_both" / "recipe.yaml").read_text()
    assert "name: cnn_patch" in resolved and "name: pool_sum" in resolved
