"""Atomic writes: the final name holds the old version or the complete new one, never a partial write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlkit.atomic import atomic_dir, atomic_file, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    write_json(path, {"a": 2}, indent=2)
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    folder = tmp_path / "last"
    with atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_text("v2")
        raise RuntimeError("crash before state.pt")
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    assert (folder / "model.safetensors").read_text() == "v1"
    with atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_text("v2")
    assert [p.name for p in folder.iterdir()] == ["state.pt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
