"""One resolver for model sources (local folders, hub ids, ``local-dir:`` / ``hf-hub:``, offline errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlkit.errors import CheckpointError
from vlkit.sources import is_offline, load_error, resolve_source


def test_local_paths_hub_ids_and_prefixes(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # an existing folder wins over the hub id of the same shape
    assert resolve_source("org/model", "k").kind == "local"
    assert resolve_source("org/model", "k").path == Path("org/model")
    assert resolve_source(f"local-dir:{folder}", "k").target == str(folder)
    assert resolve_source("hf-hub:org/model", "k").target == "org/model"
    hub = resolve_source("llava-hf/llava-1.5-7b-hf", "k")
    assert (hub.kind, hub.target, hub.open_clip_name) == ("hub", "llava-hf/llava-1.5-7b-hf",
                                                          "hf-hub:llava-hf/llava-1.5-7b-hf")
    assert resolve_source("gpt2", "k").kind == "hub"  # canonical single-name repositories


@pytest.mark.parametrize("value, message", [
    ("./missing", r"k: checkpoint not found: \./missing \(looked for .*missing; it is neither an existing "
                  r"path nor a hub id"),
    ("/abs/missing", "checkpoint not found: /abs/missing"),
    ("a--b/c", "checkpoint not found"),
    ("local-dir:org/model", r"k: checkpoint not found: org/model \(from `local-dir:org/model`\)"),
    ("hf-hub:", "names nothing after 'hf-hub:'"),
    ("", "expected a local folder or a Hugging Face hub id"),
])
def test_bad_sources_name_the_key_and_the_path(value: str, message: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        resolve_source(value, "k")


def test_what_a_local_path_must_be(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a file; expected the folder .*for a GGUF file set `checkpoint: .*` and `gguf_file: m.gguf`"):
        resolve_source(str(gguf), "model.llm.checkpoint")
    assert resolve_source(str(gguf), "k", expect="file").target == str(gguf)
    with pytest.raises(CheckpointError, match="is a folder; expected a file"):
        resolve_source(str(tmp_path), "k", expect="file")
    with pytest.raises(CheckpointError, match="takes a local path, not a hub id"):
        resolve_source("hf-hub:org/model", "k", hub=False)
    with pytest.raises(CheckpointError, match=r"neither an existing path\)"):
        resolve_source("org/model", "k", hub=False)


def test_offline_errors_say_how_to_fix_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline()
    hub = resolve_source("org/model", "model.llm.checkpoint")
    err = load_error(hub, "model.llm.checkpoint", "tokenizer", OSError("not cached"))
    assert "could not be found offline" in str(err) and "hf download org/model" in str(err)
    # a value error is the library's own reason, not a missing download
    assert "cannot load the tokenizer of 'org/model': bad" in str(load_error(hub, "k", "tokenizer", ValueError("bad")))
    local = resolve_source(str(tmp_path), "k")
    assert f"cannot load the tokenizer from folder {tmp_path}: broken" in str(load_error(local, "k", "tokenizer",
                                                                                  OSError("broken")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert not is_offline()
    assert "cannot load the tokenizer of 'org/model'" in str(load_error(hub, "k", "tokenizer", OSError("x")))


@pytest.mark.parametrize("encoder", [
    {"name": "clip"}, {"name": "convnext_clip"}, {"name": "qformer"}, {"name": "florence2"}])
def test_every_part_reads_a_checkpoint_value_alike(encoder: dict, tmp_path: Path, monkeypatch) -> None:
    """The same ``checkpoint:`` values mean the same for every part: a missing path is "not found", a hub
    id that is not cached offline says how to fetch it."""
    from vlkit.registry import ENCODERS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=rf"{encoder['name']} encoder `checkpoint`: .*not found: {missing}"):
        ENCODERS.build({**encoder, "checkpoint": str(missing)}, "model.encoders.0")
    with pytest.raises(CheckpointError, match=r"could not be found offline.*hf download vlkit-test/not-cached"):
        ENCODERS.build({**encoder, "checkpoint": "vlkit-test/not-cached"}, "model.encoders.0")
