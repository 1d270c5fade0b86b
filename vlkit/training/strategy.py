"""``trainer.strategy``: a Lightning strategy name, or a mapping for FSDP and DeepSpeed.

* ``fsdp`` / ``{name: fsdp, ...}``: Lightning's ``FSDPStrategy`` with every part's block class (its
  ``fsdp_wrap_block``: the encoders' transformer/ConvNeXt/DaViT blocks, the holistic module's blocks, the LLM's
  decoder layer) as the auto-wrap unit. Activation checkpointing stays the parts' own
  (``gradient_checkpointing: true``), on the same block classes. Mixed precision is ``trainer.precision``
  (``bf16-mixed``: bf16 parameters, gradients and buffers inside FSDP). ``state_dict_type``: ``full`` (default:
  rank 0 writes the stage checkpoint vlkit resumes and exports from) or ``sharded`` (one file per rank,
  torch.distributed.checkpoint; resumes, export needs the run re-gathered on the same world size). Other keys
  are ``FSDPStrategy`` arguments (``sharding_strategy``, ``cpu_offload``, ...). Lightning runs FSDP on CUDA only.
* ``{name: deepspeed, config: {...}}``: Lightning's ``DeepSpeedStrategy`` with that DeepSpeed config (a mapping
  or a JSON file path, e.g. ``{zero_optimization: {stage: 3}}``); ``{name: deepspeed, stage: 2}`` for Lightning's
  default ZeRO config of that stage. Other keys are ``DeepSpeedStrategy`` arguments. Needs ``pip install
  deepspeed`` (and CUDA to run).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlkit.errors import RecipeError

MAPPED = ("fsdp", "deepspeed")
_WHERE = "trainer.strategy"


def check_strategy(spec: str | dict[str, Any]) -> None:
    """Validate a ``trainer.strategy`` mapping (names are left to Lightning)."""
    if isinstance(spec, str):
        return
    name = spec.get("name")
    if name not in MAPPED:
        raise RecipeError(f"a strategy mapping needs `name: fsdp` or `name: deepspeed`, got name {name!r}; other "
                          "strategies are given by name (e.g. `strategy: ddp`)", f"{_WHERE}.name")
    if name == "fsdp":
        state = spec.get("state_dict_type", "full")
        if state not in ("full", "sharded"):
            raise RecipeError(f"`state_dict_type` must be full or sharded, got {state!r}", f"{_WHERE}.state_dict_type")
        for key in ("auto_wrap_policy", "activation_checkpointing_policy", "activation_checkpointing"):
            if key in spec:
                raise RecipeError(f"`{key}` is vlkit's: FSDP wraps every part's block class, and activation "
                                  "checkpointing is each part's `gradient_checkpointing: true`; remove it",
                                  f"{_WHERE}.{key}")
    if name == "deepspeed":
        if "config" in spec and "stage" in spec:
            raise RecipeError("set `config` (a whole DeepSpeed config) or `stage` (Lightning's default ZeRO config "
                              "of that stage), not both", _WHERE)
        stage = spec.get("stage")
        if stage is not None and stage not in (1, 2, 3):
            raise RecipeError(f"ZeRO `stage` must be 1, 2 or 3, got {stage!r}", f"{_WHERE}.stage")
        config = spec.get("config")
        if config is not None and not isinstance(config, (dict, str)):
            raise RecipeError("`config` must be a DeepSpeed config mapping or the path of a JSON file",
                              f"{_WHERE}.config")


def block_classes(model: Any) -> set[type[nn.Module]]:
    """Every part's block class (``fsdp_wrap_block``; parts without one are wrapped with the root)."""
    parts = [*model.encoders.values(), model.fusion, model.llm]
    return {c for c in (getattr(p, "fsdp_wrap_block", None) for p in parts if p is not None) if c is not None}


def build_strategy(spec: str | dict[str, Any], model: Any) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer`` for ``trainer.strategy`` and ``model`` (a VLM)."""
    if spec == "fsdp":
        spec = {"name": "fsdp"}
    if isinstance(spec, str):
        return spec
    check_strategy(spec)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        kwargs.setdefault("state_dict_type", "full")
        return FSDPStrategy(auto_wrap_policy=block_classes(model), **kwargs)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)
