"""Errors a user can cause. The CLI turns them into one line and exit code 2."""

import math


class ViLexUsageError(ValueError):
    """A caller's mistake: the message names the input and the allowed values."""


class CheckpointError(ViLexUsageError):
    """A folder that is not a ViLex checkpoint, or one we refuse to load (pickle weights)."""


class ImageInputError(ViLexUsageError):
    """A missing, corrupt or non-image file."""


def check_range(name: str, value, low, high=None) -> None:
    """Raise a ViLexUsageError naming `name` unless value is a finite number with low <= value <= high
    (high=None: no upper bound). NaN fails every comparison, so it is tested for, not compared."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float is finite; the bounds decide
        finite = True
    except TypeError:
        raise ViLexUsageError(f"{name} must be a number, got {value!r}") from None
    if not finite or value < low or (high is not None and value > high):
        allowed = f"{_number(low)}..{_number(high)}" if high is not None else f">= {_number(low)}"
        raise ViLexUsageError(f"{name} must be in {allowed}, got {value}")


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
