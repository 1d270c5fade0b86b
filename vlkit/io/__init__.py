"""Model I/O: vlkit's own saved-model format (:mod:`vlkit.io.pretrained`) for every architecture."""
