"""Exporters: a trained model written in another library's format (``vlkit export RUN --format ...``).

``vlkit`` (the default) is vlkit's own saved-model folder (:mod:`vlkit.io.pretrained`, every architecture);
``llava`` is Hugging Face transformers' ``LlavaForConditionalGeneration`` (:mod:`vlkit.export.llava`).
"""

from __future__ import annotations

from pathlib import Path

from vlkit.errors import CheckpointError

FORMATS = ("vlkit", "llava")


def export(source: str | Path, out: str | Path, format: str = "vlkit", *, overwrite: bool = False,
           max_shard_size: int | str = "5GB") -> Path:
    """Load ``source`` (run folder, stage checkpoint, saved model) and write it to ``out`` in ``format``."""
    from vlkit.io.pretrained import from_pretrained, save_pretrained

    if format not in FORMATS:
        raise CheckpointError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if out.exists() and overwrite and out.resolve() == Path(source).resolve():
        raise CheckpointError(f"--out {out} is the folder being exported; choose another folder")
    model = from_pretrained(source)
    if format == "llava":
        from vlkit.export.llava import export_llava

        return export_llava(model, out, max_shard_size=max_shard_size)
    if out.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    return save_pretrained(model, out, max_shard_size=max_shard_size)
