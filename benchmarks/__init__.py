"""Benchmarks for ViLex (installed as `vilex.benchmarks`; `vilex bench` runs them)."""

# Declared here, away from the torch-importing runner, so building the CLI parser stays cheap.
STAGE_BACKENDS = ("torch", "torch-fp16", "torch-bf16", "torch-cudagraph", "torch-compile",
                  "onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")
ALL_BACKENDS = STAGE_BACKENDS + ("triton",)
