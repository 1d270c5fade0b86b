"""LLM backbones: the :class:`~vlkit.llms.base.LLM` interface and the built-in ``hf_causal`` part.

Parts are registered in :data:`vlkit.registry.LLMS`; third-party ones via the ``vlkit.llms`` entry-point
group or a ``module:Class`` import path in the recipe.
"""

from vlkit.llms.base import LLM
from vlkit.llms.hf_causal import HFCausalLM

__all__ = ["LLM", "HFCausalLM"]
