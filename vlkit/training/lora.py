"""LoRA adapters per stage, through peft: inject, train, merge, and export in peft's own format.

A stage's ``lora:`` section (:class:`vlkit.config.LoraConfig`) puts peft LoRA layers
(``peft.inject_adapter_in_model``) on the named parts; for a part that holds a Hugging Face model (the LLM)
they go on that model, so its adapter keys are peft's own (``...q_proj.lora_A.default.weight``; the base
weight becomes ``...q_proj.base_layer.weight``). The adapters stay in the model, in its checkpoints and in
later stages (frozen unless a later stage restates the same ``lora:`` section, which keeps training them)
until a stage says ``lora: merge``, which folds them into the weights.

What the model holds at a point of a run is a function of the stages run so far, so :func:`sync_lora`
rebuilds it from the recipe before any checkpoint is loaded (fit, resume, ``load_run``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from vlkit.config import LoraConfig, StageConfig
from vlkit.errors import CheckpointError, RecipeError

PREFIX = "lora_"  # peft's LoraModel.prefix: every adapter parameter name contains it
_SYNCED = "_vlkit_lora_synced"  # stages whose lora sections the model reflects
_ADAPTED = "_vlkit_lora_parts"  # part -> LoraConfig of the adapters it holds


def part_module(model: nn.Module, part: str) -> nn.Module:
    """The module of a part name: ``llm``, ``fusion``, ``encoders.<key>``."""
    modules = dict(model.named_modules())
    if part not in modules:
        raise RecipeError(f"no part {part!r} in the model", "lora.parts")
    return modules[part]


def adapter_target(part: nn.Module) -> nn.Module:
    """Where a part's adapters go: the Hugging Face model a part wraps (its direct child), else the part.

    (Injecting into the HF model lets peft's ``all-linear`` skip its output head and keeps the keys those of
    ``PeftModel``, so the peft-format export is a rename.)"""
    if isinstance(part, PreTrainedModel):
        return part
    return next((m for m in part.children() if isinstance(m, PreTrainedModel)), part)


def adapter_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LoRA parameters inside ``module`` (name, parameter)."""
    return [(n, p) for n, p in module.named_parameters() if PREFIX in n]


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention,
                               Conv1D))


def _resolve_targets(target: nn.Module, lora: LoraConfig, part: str, where: str) -> list[str]:
    """peft ``target_modules`` for a part: the linear layers for ``all-linear`` (as peft picks them, minus the
    ``out_proj`` of ``nn.MultiheadAttention``, whose forward reads that weight directly so an adapter there
    would do nothing), or the recipe's names, each checked to match an adaptable module of the part."""
    from transformers.pytorch_utils import Conv1D

    names = {n: m for n, m in target.named_modules() if n}
    inside_mha = {f"{n}.{c}" for n, m in names.items() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_modules() if c}
    candidates = sorted({n.rpartition(".")[2] for n, m in names.items() if _adaptable(m) and n not in inside_mha})
    if lora.targets == "all-linear":
        head = target.get_output_embeddings() if isinstance(target, PreTrainedModel) else None
        found = sorted(n for n, m in names.items()
                       if isinstance(m, (nn.Linear, Conv1D)) and m is not head and n not in inside_mha)
        if not found:
            raise RecipeError(f"part {part!r} has no linear layer for `all-linear`; name its modules instead "
                              f"(candidates: {', '.join(candidates) or 'none'})", f"{where}.targets")
        return found
    targets = list(lora.targets)
    for i, t in enumerate(targets):
        if not any((n == t or n.endswith("." + t)) and _adaptable(m) for n, m in names.items()):
            raise RecipeError(f"{t!r} matches no module of part {part!r} that LoRA can adapt; its candidate "
                              f"module names: {', '.join(candidates) or 'none'}", f"{where}.targets[{i}]")
    return targets


def inject(model: nn.Module, part: str, lora: LoraConfig, where: str = "lora") -> int:
    """Put fresh LoRA adapters (B = 0: the model's output is unchanged) on ``part``; returns their size."""
    import peft

    target = adapter_target(part_module(model, part))
    if adapter_parameters(target):
        raise RecipeError(f"part {part!r} already holds LoRA adapters", where)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                             target_modules=_resolve_targets(target, lora, part, where))
    try:
        peft.inject_adapter_in_model(config, target)
    except ValueError as exc:
        raise RecipeError(f"peft cannot put LoRA on part {part!r}: {exc}", f"{where}.targets") from exc
    from peft.tuners.tuners_utils import cast_adapter_dtype

    # adapters take the base layer's dtype; on a bf16/fp16 frozen base they train in float32 (as PeftModel's
    # default autocast_adapter_dtype), so their small updates do not round away
    cast_adapter_dtype(target, "default")
    model.__dict__.setdefault(_ADAPTED, {})[part] = lora
    return sum(p.numel() for _, p in adapter_parameters(target))


def adapted_parts(model: nn.Module) -> dict[str, LoraConfig]:
    """Parts holding adapters, with their settings."""
    return dict(model.__dict__.get(_ADAPTED, {}))


def unload(model: nn.Module, merge: bool = True) -> None:
    """Replace every LoRA layer by its base layer: with the adapters folded in (``merge``) or dropped."""
    for part in list(adapted_parts(model)):
        _unload_target(adapter_target(part_module(model, part)), merge)
        del model.__dict__[_ADAPTED][part]


def _unload_target(target: nn.Module, merge: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(target.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if merge:
            module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, child, module.get_base_layer())
    if hasattr(target, "peft_config"):
        del target.peft_config


def apply_stage(model: nn.Module, stage: StageConfig, where: str) -> None:
    """Change the model as a stage's ``lora:`` says: add adapters to parts without them, or merge."""
    if stage.lora == "merge":
        unload(model, merge=True)
    elif isinstance(stage.lora, LoraConfig):
        held = adapted_parts(model)
        for part in stage.lora.parts:
            if part not in held:
                inject(model, part, stage.lora, f"{where}.lora")


def sync_lora(model: nn.Module, stages: Sequence[StageConfig], first: int = 0) -> None:
    """Bring the adapters of ``model`` to what running ``stages`` (indices from ``first``) in order leaves.

    Idempotent and forward-only: the model remembers how many stages it reflects."""
    done = model.__dict__.get(_SYNCED, 0)
    if len(stages) < done:
        raise CheckpointError(f"the model already reflects {done} stages' LoRA settings; cannot go back to "
                              f"{len(stages)} (build a fresh model)")
    for i in range(done, len(stages)):
        apply_stage(model, stages[i], f"stages[{first + i}]")
    model.__dict__[_SYNCED] = len(stages)


def mark_trainable(model: nn.Module, stage: StageConfig) -> None:
    """Unfreeze the adapters of the parts a stage's ``lora:`` section trains (after the freezing pass)."""
    if not isinstance(stage.lora, LoraConfig):
        return
    for part in stage.lora.parts:
        for _, p in adapter_parameters(part_module(model, part)):
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------ export


def peft_adapter(model: nn.Module, part: str = "llm") -> tuple[Any, dict[str, torch.Tensor]]:
    """The adapters of ``part`` as peft saves them: its ``LoraConfig`` and the ``adapter_model`` tensors
    (keys ``base_model.model.<module>.lora_A.weight``, as ``PeftModel.save_pretrained`` writes them)."""
    from peft import get_peft_model_state_dict

    target = adapter_target(part_module(model, part))
    if not adapter_parameters(target):
        raise CheckpointError(f"part {part!r} holds no LoRA adapters")
    config = copy.deepcopy(target.peft_config["default"])
    config.inference_mode = True
    state = get_peft_model_state_dict(target, adapter_name="default")
    return config, {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
