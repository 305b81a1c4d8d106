"""Backends run a stage by name; the pipeline's loop is the same over all of them.

A backend is called as `backend(stage, **inputs)` with torch tensors named as in the export contract
and returns the stage's single output as a torch tensor. Backends differ only in how a stage runs:

    TorchBackend        the checkpoint's PyTorch modules (base.py)
    OnnxRuntimeBackend  the graphs of an export folder in onnxruntime (onnxruntime.py)
    TensorRTBackend     the TensorRT engines of an export folder (tensorrt.py)

The last two import their runtime only when used (onnxruntime is the `export` extra; TensorRT is not
installable from PyPI everywhere).
"""

from .base import StageBackend, TimedBackend, TorchBackend

__all__ = ["StageBackend", "TimedBackend", "TorchBackend", "OnnxRuntimeBackend", "TensorRTBackend"]


def __getattr__(name: str):
    if name == "OnnxRuntimeBackend":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "TensorRTBackend":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
