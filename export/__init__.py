"""ONNX export and TensorRT engine building for ViLex (installed as `vilex.export`). Build-time only:
it depends on the core (`vilex.engines` holds what a runtime needs: the contracts, the export folder and
its manifest, the host files, the precision policy), and nothing in the core imports it.

    onnx_export.py     `vilex export`: trace the stage wrappers, fp16 conversion, atomic folder, manifest
    graphs.py          ONNX graph files: save with external data + onnx.checker, shape inference, fp16
    calibration.py     int8/fp8: the UNet's inputs recorded over real denoising trajectories of the checkpoint
    quantize.py        int8/fp8: onnxruntime's static quantizer, in TensorRT's and onnxruntime CPU's QDQ formats
    validate.py        onnxruntime vs PyTorch on fresh random inputs (8-bit: held-out denoising inputs, and end
                       to end); typed errors
    optimize.py        onnxruntime transformer-optimizer fusions, and their CPU measurement
    tensorrt_build.py  `vilex build-engines`: TensorRT Python API builds, trtexec script, rebuild by hash
    cli.py             the two subcommands
"""
