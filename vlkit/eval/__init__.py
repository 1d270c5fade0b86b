"""Evaluation: answer metrics (:mod:`vlkit.eval.metrics`) and the lmms-eval adapter (:mod:`vlkit.eval.lmms`)."""
