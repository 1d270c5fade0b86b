"""Pieces of the ``florence2`` encoder (:mod:`vlkit.encoders.florence2`): its prompt grammar and its offline
tokenizer."""
