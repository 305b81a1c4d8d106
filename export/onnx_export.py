"""`vilex export`: a checkpoint -> validated ONNX graphs, host-side files and a manifest in engines/NAME.

    1. check the checkpoint and the output folder (before anything slow)
    2. load the pipeline in fp32 and derive the contracts (export/contract.py)
    3. per graph: trace the stage wrapper (vilex/stages.py) with torch.onnx.export, check it with
       onnx.checker, convert to fp16 where asked (FP16_POLICY), optionally optimize for onnxruntime
    4. validate every graph file against PyTorch at two batch sizes (export/validate.py)
    5. write the host-side files (export/runtime.py) and manifest.json
    6. move the finished folder into place: a new folder, or with `replace` an atomic swap of a
       previous export (the old folder is renamed away, the new one renamed in, the old one deleted),
       so engines/NAME is always one complete export, never a mix

Everything is written into a hidden sibling folder first; a failure removes it and leaves NAME as it was.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from vilex.errors import ViLexUsageError
from vilex.outputs import swap_folder_into_place

from .contract import GRAPH_NAMES, ExportOptions, GraphContract, ModelDims, build_contracts
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, EngineFolder, checkpoint_files, folder_files, tree_sha256, write_json_atomic
from .validate import ExportError, sample_inputs, validate_graph

# Protobuf cannot serialize a message of 2 GiB or more; graphs whose weights come near that keep their
# weights in one `<graph>.onnx.data` file next to the graph (64 MiB left for the graph structure).
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20
# Initializers at least this large are left out of the copy that shape inference sees (see infer_shapes_large).
_SHAPE_INFERENCE_STRIP_BYTES = 1024
TRACE_SEED = 0


@dataclass(frozen=True)
class Fp16Policy:
    """How a graph is converted for `--precision fp16`. Inputs and outputs always stay fp32
    (keep_io_types), so callers and the contract do not change with the precision."""

    convert: bool
    keep_fp32: str  # what stays fp32 and why (written to the manifest)
    node_prefixes: tuple[str, ...] = ()  # nodes whose name starts with one of these stay fp32 ...
    with_ancestors: bool = False  # ... together with every node that feeds them
    op_block_list: tuple[str, ...] = ()  # extra op types kept fp32 (onnxruntime's default list always applies)


FP16_POLICY: dict[str, Fp16Policy] = {
    "vilex_encoder": Fp16Policy(True, "inputs/outputs only"),
    "text_encoder": Fp16Policy(True, "inputs/outputs only"),
    "unet": Fp16Policy(
        True,
        "the timestep path (timestep input -> sinusoidal projection -> time-embedding MLP): timesteps up to "
        "999, some fractional, times the projection's frequencies need more than fp16's 11 significant bits "
        "before sin/cos",
        node_prefixes=("/unet/time_proj/", "/unet/time_embedding/"), with_ancestors=True),
    "vae_decoder": Fp16Policy(
        False,
        "the whole graph: Stable Diffusion VAE decoders overflow fp16 in their last up-blocks (why diffusers "
        "has `force_upcast`); it runs once per image, so fp32 costs little next to the UNet's steps"),
}

VARIANTS = ("onnx", "ort")


@dataclass
class GraphRecord:
    files: dict[str, str] = field(default_factory=dict)  # variant -> relative path of the graph file
    precision: str = "fp32"
    keep_fp32: str = ""
    validation: dict[str, list] = field(default_factory=dict)  # variant -> records
    fused_operators: dict[str, int] = field(default_factory=dict)  # with --optimize
    export_seconds: float = 0.0


# ---- the output folder ---------------------------------------------------------------------------------
def check_out(out: Path, replace: bool) -> None:
    """Refuse an existing export unless `replace`; never touch a folder that is not an export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ViLexUsageError(f"--out '{out}' exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise ViLexUsageError(f"--out '{out}' is a non-empty folder that is not an export (no {MANIFEST}); "
                              f"choose a new folder")
    if not replace:
        raise ViLexUsageError(f"--out '{out}' already holds an export; pass --replace to replace it "
                              f"(atomically: the folder is swapped whole, never mixed) or choose a new folder")


# ---- one graph -----------------------------------------------------------------------------------------
def export_graph(module: torch.nn.Module, contract: GraphContract, path: Path,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Trace `module` to `path` (fp32) with the contract's names and dynamic axes; check it; return its files.

    Traces at batch 2 and the opt spatial size: batch 1 would let the tracer treat the batch as a
    broadcastable 1. Weights go to `<name>.onnx.data` when above `external_data_threshold` bytes.
    """
    sizes = {axis: bounds.opt for axis, bounds in contract.axes.items()}
    sizes["batch"] = 2
    generator = torch.Generator().manual_seed(TRACE_SEED)
    inputs = sample_inputs(contract, sizes, generator)
    with tempfile.TemporaryDirectory(prefix=f"{contract.name}.", dir=path.parent) as trace_dir:
        trace_path = Path(trace_dir) / f"{contract.name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # TracerWarnings name Python branches on shapes (asserts, `if size > ...`); the validation at
            # other sizes below is what tells whether one of them was baked in wrongly.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(inputs[name] for name in contract.input_names), str(trace_path),
                              input_names=contract.input_names, output_names=contract.output_names,
                              dynamic_axes=contract.dynamic_axes(), opset_version=contract.opset,
                              do_constant_folding=True, dynamo=False)
        model = onnx.load(str(trace_path))  # loads external data the tracer may have written
    return save_graph(model, path, external_data_threshold)


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


# ---- the whole checkpoint ------------------------------------------------------------------------------
def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                      replace: bool = False, optimize: str | None = None,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log=print) -> EngineFolder:
    """Export, validate and write engines/NAME (see the module docstring). Returns the opened folder."""
    import onnxruntime

    from vilex import __version__
    from vilex.pipeline import ViLexPipeline, check_checkpoint

    from . import runtime
    from .optimize import OPTIMIZE_TARGETS, optimize_for_onnxruntime

    # 1. Check the inputs
    ckpt, out = check_checkpoint(ckpt), Path(out)
    check_out(out, replace)
    if optimize is not None and optimize not in OPTIMIZE_TARGETS:
        raise ViLexUsageError(f"--optimize must be one of {', '.join(OPTIMIZE_TARGETS)}, got {optimize!r}")

    # 2. Pipeline and contracts
    pipeline = ViLexPipeline.from_pretrained(ckpt)  # fp32: the reference every graph is validated against
    dims = ModelDims.from_pipeline(pipeline)
    options = options.resolved(dims)
    contracts = build_contracts(dims, options)
    from vilex.stages import stage_modules

    modules = {name: module.eval() for name, module in stage_modules(pipeline).items()}
    source_files = checkpoint_files(ckpt)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from a server's user
    try:
        (staging / "onnx").mkdir()
        records: dict[str, GraphRecord] = {}
        for name in GRAPH_NAMES:
            contract, policy, record = contracts[name], FP16_POLICY[name], GraphRecord()
            start = time.perf_counter()
            # 3. Trace, convert, optimize
            path = staging / "onnx" / f"{name}.onnx"
            export_graph(modules[name], contract, path, external_data_threshold)
            record.files["onnx"] = f"onnx/{name}.onnx"
            if optimize:  # fuse the fp32 graph (fusion patterns are written for it), then convert
                (staging / "ort").mkdir(exist_ok=True)
                record.fused_operators = optimize_for_onnxruntime(
                    name, path, staging / "ort" / f"{name}.onnx", optimize, options.precision, policy,
                    external_data_threshold)
                record.files["ort"] = f"ort/{name}.onnx"
            if options.precision == "fp16" and policy.convert:
                model = convert_to_fp16(onnx.load(str(path)), policy)
                save_graph(model, path, external_data_threshold)
                del model
                record.precision, record.keep_fp32 = "fp16", policy.keep_fp32
            elif options.precision == "fp16":
                record.keep_fp32 = policy.keep_fp32
            else:
                record.keep_fp32 = "everything (fp32 export)"
            record.export_seconds = time.perf_counter() - start
            # 4. Validate every variant
            for variant, relative in record.files.items():
                record.validation[variant] = validate_graph(contract, modules[name], staging / relative, record.precision)
            worst = max(o["max_abs_diff"] for v in record.validation.values() for r in v for o in r["outputs"].values())
            log(f"  {name:<14} {record.precision}  exported in {record.export_seconds:5.1f} s; "
                f"onnxruntime vs PyTorch max |diff| {worst:.2e} at batch "
                f"{', '.join(str(r['sizes']['batch']) for r in record.validation['onnx'])}")
            records[name] = record

        # 5. Host-side files and the manifest
        runtime.save_host_files(pipeline, ckpt, staging / "host", sorted(source_files))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "precision": options.precision,
            "opset": options.opset,
            "optimize": optimize,
            "versions": {"vilex": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "source": {"checkpoint": str(ckpt.resolve()), "sha256": tree_sha256(source_files),
                       "files": len(source_files)},
            "dims": dims.to_dict(),
            "options": options.to_dict(),
            "graphs": {
                name: {"files": record.files, "precision": record.precision, "keep_fp32": record.keep_fp32,
                       "contract": contracts[name].to_dict(), "validation": record.validation,
                       "fused_operators": record.fused_operators,
                       "export_seconds": round(record.export_seconds, 2)}
                for name, record in records.items()
            },
            "host": "host",
            "files": folder_files(staging),
        }
        write_json_atomic(staging / MANIFEST, manifest)

        # 6. Into place
        check_out(out, replace)  # again: another process may have written there meanwhile
        swap_folder_into_place(staging, out)  # an existing export is swapped out whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return EngineFolder.open(out, what="--out")


__all__ = ["ExportError", "FP16_POLICY", "Fp16Policy", "VARIANTS", "check_out", "convert_to_fp16", "export_checkpoint",
           "export_graph", "save_graph"]
