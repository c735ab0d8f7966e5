"""Errors shown to the user as one line (the CLI prints them without a traceback)."""


class ToolkitError(Exception):
    """Base class: an error the user can act on."""


class WeightsNotFound(ToolkitError):
    """Checkpoint files for a model could not be found; the message lists paths tried and how to get them."""


class CheckpointError(ToolkitError):
    """A checkpoint file is corrupt, truncated, or does not match the model (names the file / tensors)."""


class SelectionError(ToolkitError):
    """An invalid capture/analysis selection (layer out of range, unknown step, ...)."""
