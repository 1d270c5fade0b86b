"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (``vlkit data demo``), built once per test session: 4 train shards, 1 val
    shard (60 questions of each of the 6 types), ``tokenizer/`` and ``index.json``."""
    from vlkit.data.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, train_scenes=300, val_scenes=300, seed=0, shards=4, digit_repeats=1, progress=False)
    return out
