"""Opening the pipeline a command runs: one object with `tokenize`, `generate` and `__call__`, however
its stages run.

    open_pipeline(ckpt, backend="torch")                                  the PyTorch weights of CKPT
    open_pipeline(None, backend="onnxruntime", engines="engines/NAME")   the export folder alone
    open_pipeline(ckpt, backend="tensorrt", engines="engines/NAME")      the same, checked against CKPT
    open_pipeline(None, backend="triton", url="127.0.0.1:8000")          a running `vilex serve`

With onnxruntime or tensorrt the pipeline is built from the export folder's host files
(`vilex.engines.host.pipeline_from_engines`): no PyTorch weights are loaded, so a deployment host needs
only the export. CKPT, when given, is only checked against the checkpoint the folder was exported from
(by content hash, cached by file size and modification time, see `vilex.engines.folder`).
"""

from __future__ import annotations

import os

from .errors import ViLexUsageError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")


def load_pipeline(ckpt: str | os.PathLike):
    """The PyTorch pipeline of a checkpoint folder, quietly (our own loop keeps its progress bar)."""
    import diffusers
    import transformers

    from .pipeline import ViLexPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline = ViLexPipeline.from_pretrained(str(ckpt))
    pipeline.set_progress_bar_config(leave=False)
    return pipeline


def open_pipeline(ckpt: str | os.PathLike | None = None, backend: str = "torch", engines: str | os.PathLike | None = None,
                  url: str | None = None, protocol: str = "http"):
    """The pipeline for `backend` (see the module docstring); errors name the flag that is missing or extra."""
    if backend not in BACKENDS:
        raise ViLexUsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        if not url:
            raise ViLexUsageError("--backend triton needs --url HOST:PORT (the server from `vilex serve`)")
        if ckpt is not None:
            raise ViLexUsageError(f"with --backend triton the server holds the model: drop CKPT '{ckpt}'")
        if engines is not None:
            raise ViLexUsageError("--engines is not used with --backend triton (the server holds the model)")
        from .serving.remote import RemotePipeline

        return RemotePipeline(url, protocol)
    if url is not None:
        raise ViLexUsageError(f"--url is only for --backend triton, not --backend {backend}")
    if backend == "torch":
        if engines is not None:
            raise ViLexUsageError("--engines needs --backend onnxruntime or tensorrt (--backend torch runs CKPT's weights)")
        if ckpt is None:
            raise ViLexUsageError("--backend torch needs CKPT (a checkpoint folder)")
        from .backends import TorchBackend

        pipeline = load_pipeline(ckpt)
        return pipeline.set_backend(TorchBackend(pipeline))
    if engines is None:
        hint = f"vilex export {ckpt or 'CKPT'} --out engines/NAME"
        raise ViLexUsageError(f"--backend {backend} needs --engines engines/NAME (make one with `{hint}`)")
    from .engines.folder import EngineFolder
    from .engines.host import pipeline_from_engines

    folder = EngineFolder.open(engines)
    if ckpt is not None:
        folder.check_source(ckpt)
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeBackend

        stage_backend = OnnxRuntimeBackend(folder)
    else:
        from .backends.tensorrt import TensorRTBackend

        stage_backend = TensorRTBackend(folder)
    pipeline = pipeline_from_engines(folder, backend=stage_backend)
    pipeline.set_progress_bar_config(leave=False)
    return pipeline
