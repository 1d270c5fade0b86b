"""What trains in a stage: freezing by part or module path, the parameter table, optimizer groups, schedule."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vlkit.config import StageConfig
from vlkit.errors import RecipeError
from vlkit.training.lora import adapter_parameters, mark_trainable


def _module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _resolve(model: nn.Module, path: str, key: str) -> nn.Module:
    modules = dict(model.named_modules())
    if path not in modules:
        top = [p for p in _module_paths(model) if p.count(".") <= 1]
        close = difflib.get_close_matches(path, _module_paths(model), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RecipeError(f"no part or module {path!r} in the model.{hint} Parts: {', '.join(top)}", key)
    return modules[path]


def apply_trainable(model: nn.Module, stage: StageConfig, where: str = "stages") -> None:
    """Freeze everything, then unfreeze the parts/modules the stage lists in ``trainable``.

    Parameters the model declares outside its forward pass (``bypassed_parameters()``, e.g. the LLM's input
    embeddings behind a holistic encoder) stay frozen: they would get no gradient.
    """
    model.requires_grad_(False)
    for i, path in enumerate(stage.trainable):
        _resolve(model, path, f"{where}.trainable[{i}]").requires_grad_(True)
    mark_trainable(model, stage)  # the LoRA adapters of the stage's `lora:` parts
    for p in getattr(model, "bypassed_parameters", list)():
        p.requires_grad_(False)
    for path in stage.lrs:
        _resolve(model, path, f"{where}.lrs.{path}")
    check_trainable_dtypes(model, stage, where)


HALF = (torch.bfloat16, torch.float16)


def check_trainable_dtypes(model: nn.Module, stage: StageConfig, where: str = "stages") -> None:
    """Refuse a stage that would train weights stored in bf16/fp16: AdamW's updates below their resolution
    (7.8e-3 at 1.0 in bf16) round away. The recipe check catches ``dtype: bfloat16`` on a trained part; this
    catches what only the loaded weights tell (``dtype: auto`` on a half-precision checkpoint)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in HALF:
            part = _part_of(model, name)
            raise RecipeError(
                f"stage {stage.name!r} trains {name} ({part}), whose weights are stored in {p.dtype}: AdamW's "
                f"updates round away there. Load {part} in float32 (its `dtype: float32`, not auto or a half "
                "precision) and compute in bf16 with `trainer.precision: bf16-mixed`", f"{where}.trainable")


def _part_of(model: nn.Module, name: str) -> str:
    """The part (``encoders.<key>``, ``fusion``, ``llm``, ...) a parameter name belongs to."""
    return next((part for part, _ in _parts(model) if name.startswith(part + ".")), name.split(".")[0])


def _longest_prefix(name: str, prefixes: Sequence[str]) -> str | None:
    best = None
    for p in prefixes:
        if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """AdamW groups: one per (learning rate, decay/no-decay); only trainable parameters appear.

    Biases and normalisation weights (tensors with < 2 dims) get no weight decay.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = _longest_prefix(name, list(stage.lrs))
        lr = stage.lrs[prefix] if prefix is not None else stage.lr
        decay = p.ndim >= 2 and stage.weight_decay > 0
        groups.setdefault((lr, decay), []).append(p)
    if not groups:
        raise RecipeError(f"stage {stage.name!r} has no trainable parameters", "stages.trainable")
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": stage.weight_decay if decay else 0.0}
            for (lr, decay), ps in groups.items()]


def build_scheduler(opt: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules (as LLaVA's HF-Trainer recipes use them): linear warmup over ``warmup`` steps
    (from 0, or from ``min_lr_ratio``), then cosine or linear decay to ``min_lr_ratio`` at ``max_steps``, or
    constant."""
    from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

    warmup = int(stage.warmup * stage.max_steps) if stage.warmup < 1 else int(stage.warmup)
    if stage.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, warmup)
    return get_wsd_schedule(opt, num_warmup_steps=warmup, num_stable_steps=0,
                            num_decay_steps=max(1, stage.max_steps - warmup), decay_type=stage.schedule,
                            min_lr_ratio=stage.min_lr_ratio)


@dataclass
class PartCount:
    part: str
    total: int
    trainable: int
    adapters: int = 0
    """LoRA adapter parameters (part of ``total``)."""
    dtypes: str = ""
    """The dtypes its parameters are stored in, e.g. ``fp32`` or ``bf16+fp32`` (a bf16 base, fp32 adapters)."""


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    parts: list[tuple[str, nn.Module]] = []
    encoders = getattr(model, "encoders", None)
    if isinstance(encoders, nn.ModuleDict):
        parts += [(f"encoders.{k}", m) for k, m in encoders.items()]
    return parts + [(n, m) for n, m in model.named_children() if n != "encoders"]


def count_parts(model: nn.Module) -> list[PartCount]:
    """Trainable vs total parameters per encoder, fusion and LLM, and the dtypes they are stored in."""
    rows = []
    for name, module in _parts(model):
        ps = list(module.parameters())
        dtypes = "+".join(sorted({_SHORT.get(p.dtype, str(p.dtype).removeprefix("torch.")) for p in ps}))
        rows.append(PartCount(name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad),
                              sum(p.numel() for _, p in adapter_parameters(module)), dtypes))
    return rows


def print_param_table(model: nn.Module, stage: StageConfig, console: Console | None = None) -> list[PartCount]:
    """Print (and return) the table of trainable vs frozen parameters per part for a stage."""
    rows = count_parts(model)
    table = Table(title=f"stage {stage.name!r}: what trains")
    for col in ("part", "parameters", "trainable", "frozen", "lora", "dtype", "status"):
        table.add_column(col, justify="left" if col in ("part", "dtype", "status") else "right")
    for r in rows:
        status = "train" if r.trainable == r.total else ("frozen" if r.trainable == 0 else "partial")
        table.add_row(r.part, f"{r.total:,}", f"{r.trainable:,}", f"{r.total - r.trainable:,}", f"{r.adapters:,}",
                      r.dtypes, status)
    total = sum(r.total for r in rows)
    train = sum(r.trainable for r in rows)
    table.add_row("total", f"{total:,}", f"{train:,}", f"{total - train:,}", f"{sum(r.adapters for r in rows):,}",
                  "", "", style="bold")
    (console or Console()).print(table)
    return rows


def build_optimizer(model: nn.Module, stage: StageConfig, precision: str = "32-true"
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters only, with the stage's warmup + schedule (stepped per step).

    Plain parameters on CPU or CUDA get torch's fused AdamW (its CPU default is a per-parameter loop: on
    the Florence demo 10.9 ms per step, fused 2.2 ms); others (e.g. sharded parameters) get the default, and
    so do stages that clip gradients under mixed ``precision`` (Lightning refuses to clip for an optimizer
    that unscales gradients itself, as the fused one does)."""
    groups = param_groups(model, stage)
    params = [p for group in groups for p in group["params"]]
    mixed = precision.endswith("-mixed") or precision in ("16", "bf16")
    fused = _fusable(params) and not (mixed and stage.grad_clip)
    opt = torch.optim.AdamW(groups, betas=tuple(stage.betas), fused=fused or None)
    return opt, build_scheduler(opt, stage)


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes all of ``params``."""
    return bool(params) and all(
        type(p) is nn.Parameter and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
