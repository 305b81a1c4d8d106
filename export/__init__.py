"""ONNX export and TensorRT engine building for ViLex (installed as `vilex.export`).

    contract.py        one declaration per graph: names, dtypes, dynamic axes, bounds, opset, tolerances
    onnx_export.py     `vilex export`: trace the stage wrappers, fp16 policy, external data, atomic folder
    validate.py        onnxruntime vs PyTorch on fresh random inputs; typed errors
    manifest.py        engines/NAME/manifest.json: files and hashes, contracts, source checkpoint
    runtime.py         host-side files; the pipeline from an export folder without PyTorch weights
    optimize.py        onnxruntime transformer-optimizer fusions, and their CPU measurement
    tensorrt_build.py  `vilex build-engines`: TensorRT Python API builds, trtexec script, rebuild by hash
    cli.py             the two subcommands
"""
