"""A run's LoRA adapters merged into its weights, plus the LLM's adapters in peft's own format
(``vlkit merge-lora RUN --out DIR``)."""

from __future__ import annotations

import copy
from pathlib import Path

from safetensors.torch import save_file

from vlkit.atomic import atomic_dir
from vlkit.errors import CheckpointError
from vlkit.io.pretrained import save_pretrained
from vlkit.training.fit import load_run
from vlkit.training.lora import _unload_target, adapted_parts, adapter_target, peft_adapter, unload


def export_lora(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write a run's latest model with its adapters merged, plus the LLM's adapters in peft's format.

    ``out/model/`` is a saved model (:func:`vlkit.io.pretrained.save_pretrained`: adapters folded in, loads
    with ``vlkit.from_pretrained``). When the LLM holds adapters, also ``out/llm/`` (the base LLM, as
    ``save_pretrained`` writes it) and ``out/llm-adapter/`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
    out/"llm"), out/"llm-adapter")`` is the trained LLM. Returns the paths (keys ``model``, ``llm``, ``adapter``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; pass --overwrite to replace it")
    _, model = load_run(run_dir)
    parts = adapted_parts(model)
    if not parts:
        raise CheckpointError(f"the latest checkpoint of {run_dir} holds no LoRA adapters (merged already, or "
                              "the recipe has no `lora:` stage); nothing to merge")
    files: dict[str, Path] = {}
    with atomic_dir(out) as tmp:
        if "llm" in parts:
            config, tensors = peft_adapter(model, "llm")
            config.base_model_name_or_path = str((out / "llm").absolute())
            config.save_pretrained(str(tmp / "llm-adapter"))
            save_file(tensors, str(tmp / "llm-adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
            base = copy.deepcopy(model.llm)
            _unload_target(adapter_target(base), merge=False)
            base.save_pretrained(tmp / "llm")
            files.update(llm=out / "llm", adapter=out / "llm-adapter")
        unload(model, merge=True)
        save_pretrained(model, tmp / "model")
        files["model"] = out / "model"
    return files
