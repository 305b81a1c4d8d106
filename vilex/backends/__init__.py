"""Backends run a stage by name; the pipeline's loop is the same over all of them.

A backend is called as `backend(stage, **inputs)` with torch tensors named as in the export contract
and returns the stage's single output as a torch tensor. Backends differ only in how a stage runs.
"""

from .base import StageBackend, TimedBackend, TorchBackend

__all__ = ["StageBackend", "TimedBackend", "TorchBackend"]
