"""Training machinery: stages, checkpoints, the fit loop, weight mixing."""

from vlkit.training.mix import mix_weights

__all__ = ["mix_weights"]
