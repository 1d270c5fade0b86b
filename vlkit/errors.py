"""Exceptions vlkit raises for problems the user can fix (recipes, files, data, checkpoints)."""


class VlkitError(Exception):
    """Base class: a problem in something the user owns, with a message that says how to fix it."""


class RecipeError(VlkitError, ValueError):
    """A recipe is invalid: unknown key or part name, wrong type, missing field, bad file."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class DataError(VlkitError):
    """A dataset, shard or sample is missing or corrupt."""


class CheckpointError(VlkitError):
    """A checkpoint is missing, corrupt, or does not match the model."""
