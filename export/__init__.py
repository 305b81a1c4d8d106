"""ONNX export and TensorRT engine building for ViLex (installed as `vilex.export`)."""
