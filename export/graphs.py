"""ONNX graph files: saving (with external data past protobuf's 2 GB limit, then onnx.checker), shape
inference for graphs of any size, and fp16 conversion under a graph's Fp16Policy. Used by the export
(onnx_export.py) and the onnxruntime optimizer (optimize.py)."""

from __future__ import annotations

from pathlib import Path

import onnx

from vilex.engines.precision import Fp16Policy

# Protobuf cannot serialize a message of 2 GiB or more; graphs whose weights come near that keep their
# weights in one `<graph>.onnx.data` file next to the graph (64 MiB left for the graph structure).
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20
# Initializers at least this large are left out of the copy that shape inference sees (see infer_shapes_large).
_SHAPE_INFERENCE_STRIP_BYTES = 1024

def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save (one file, or graph + one external-data file) and run onnx.checker on the saved file.

    Saving with external data moves the weights out of `model` (onnx clears them in place): load the
    file again to use the graph afterwards."""
    domains = {node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    imported = {opset.domain for opset in model.opset_import}
    for domain in sorted(domains - imported):  # fused onnxruntime ops (com.microsoft) need their opset declared
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    external = initializer_bytes(model) > external_data_threshold
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_path.name, size_threshold=1024)
    # The path form of the checker follows external data and is not bound by protobuf's 2 GB limit.
    onnx.checker.check_model(str(path), full_check=True)
    return [path, data_path] if external else [path]


def infer_shapes_large(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference for graphs of any size: it runs on a copy without the large initializers'
    data (inference needs their dims and types, not their values) and the value_info is copied back."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if len(tensor.raw_data) >= _SHAPE_INFERENCE_STRIP_BYTES:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def fp32_nodes(model: onnx.ModelProto, policy: Fp16Policy) -> list[str]:
    """Names of the nodes the policy keeps fp32: by name prefix, plus their ancestors if asked."""
    nodes = list(model.graph.node)
    chosen = {n.name for n in nodes if n.name.startswith(policy.node_prefixes)} if policy.node_prefixes else set()
    if policy.with_ancestors and chosen:
        producer = {output: n for n in nodes for output in n.output}
        stack = [n for n in nodes if n.name in chosen]
        while stack:
            for name in stack.pop().input:
                parent = producer.get(name)
                if parent is not None and parent.name not in chosen:
                    chosen.add(parent.name)
                    stack.append(parent)
    return sorted(chosen)


def convert_to_fp16(model: onnx.ModelProto, policy: Fp16Policy) -> onnx.ModelProto:
    """fp32 -> fp16 with onnxruntime's converter (it inserts the Casts around the nodes kept fp32)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = infer_shapes_large(model)
    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(policy.op_block_list),
        node_block_list=fp32_nodes(model, policy))
    converted = OnnxModel(model)
    converted.topological_sort()  # the converter appends its Casts at the end; onnx wants producers first
    return converted.model
