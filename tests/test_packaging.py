"""Packaging (issue 16, item 11): every imported package is declared, as a range, pinned in constraints.txt."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "open_clip": "open-clip-torch"}
"""Import names whose distribution is named otherwise (used when the distribution is not installed)."""


def norm(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(optional: bool) -> list[Requirement]:
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    if optional:
        reqs += [Requirement(r) for group in project.get("optional-dependencies", {}).values() for r in group]
    return reqs


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module names imported anywhere in vlkit (absolute imports), outside the standard library,
    with the files importing them."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "vlkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "vlkit":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[norm(name)] = version
    return pins


def test_every_imported_package_is_declared():
    installed = metadata.packages_distributions()
    declared = {norm(r.name) for r in requirements(optional=True)}
    imports = third_party_imports()
    assert {"yaml", "braceexpand", "huggingface_hub", "PIL", "torch"} <= set(imports)  # the walk finds them
    missing = {}
    for name, files in imports.items():
        dists = {norm(d) for d in installed.get(name, [])} or {norm(KNOWN.get(name, name))}
        if not dists & declared:
            missing[name] = sorted(set(files))[:2]
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_library_dependencies_are_ranges_pinned_by_the_constraints_file():
    pins = constraints()
    for req in requirements(optional=False):
        assert req.specifier, f"{req}: give a compatible range"
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range, not a pin"
        assert norm(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[norm(req.name)], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[norm(req.name)]}, outside {req.specifier}"
    for req in requirements(optional=True):  # the extras' tested versions too, where installed
        if norm(req.name) == "vlkit":  # an extra that names other extras
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        assert pins.get(norm(req.name)) == version, f"constraints.txt should pin {req.name}=={version} (tested)"


def test_install_commands_use_the_constraints_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].startswith('pip install -e ".[dev]" -c constraints.txt && ')
    assert 'pip install -q -e ".[dev]" -c constraints.txt' in (ROOT / ".ci" / "run").read_text()
