"""Errors a user can cause. The CLI turns them into one line and exit code 2."""


class ViLexUsageError(ValueError):
    """A caller's mistake: the message names the input and the allowed values."""


class CheckpointError(ViLexUsageError):
    """A folder that is not a ViLex checkpoint, or one we refuse to load (pickle weights)."""


class ImageInputError(ViLexUsageError):
    """A missing, corrupt or non-image file."""


def check_range(name: str, value, low, high=None) -> None:
    """Raise a ViLexUsageError naming `name` unless low <= value <= high (high=None: no upper bound)."""
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ViLexUsageError(f"{name} must be in {allowed}, got {value}")
