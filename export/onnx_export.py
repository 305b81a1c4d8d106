"""`vilex export`: a checkpoint -> validated ONNX graphs, host-side files and a manifest in engines/NAME.

    1. check the checkpoint and the output folder (before anything slow)
    2. load the pipeline in fp32 and derive the contracts (vilex/engines/contract.py)
    3. per graph: trace the stage wrapper (vilex/stages.py) with torch.onnx.export, check it with
       onnx.checker, convert to fp16 where asked (FP16_POLICY), optionally optimize for onnxruntime
    4. validate every graph file against PyTorch at two batch sizes (export/validate.py)
    5. write the host-side files (vilex/engines/host.py) and manifest.json
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

from vilex.engines.contract import GRAPH_NAMES, ExportOptions, GraphContract, ModelDims, build_contracts
from vilex.engines.folder import (CHECKPOINT_HASH, FORMAT, FORMAT_VERSION, MANIFEST, EngineFolder, checkpoint_paths,
                                  checkpoint_sha256, folder_files, write_json_atomic)
from vilex.engines.host import save_host_files
from vilex.engines.precision import FP16_POLICY

from .graphs import EXTERNAL_DATA_THRESHOLD, convert_to_fp16, save_graph
from .validate import ExportError, sample_inputs, validate_graph

TRACE_SEED = 0


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
    declare_output_shapes(model, contract)
    return save_graph(model, path, external_data_threshold)


def declare_output_shapes(model: onnx.ModelProto, contract: GraphContract) -> None:
    """Write the contract's output shapes into the graph: the tracer leaves its own symbols (e.g.
    'Mulvilex_tokens_dim_1') where an output's size is fixed but computed (a slice, a reshape), so a
    runtime that reads the graph's output shapes would see a dynamic size the contract fixes."""
    specs = {spec.name: spec for spec in contract.outputs}
    for output in model.graph.output:
        spec = specs[output.name]
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportError(f"{contract.name}: output '{output.name}' has rank {len(dims)}, the contract says "
                              f"{len(spec.shape)} ({spec.shape})")
        for dim, size in zip(dims, spec.shape):
            if isinstance(size, int):
                dim.Clear()
                dim.dim_value = size
            else:
                dim.Clear()
                dim.dim_param = size


# ---- the whole checkpoint ------------------------------------------------------------------------------
def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                      replace: bool = False, optimize: str | None = None,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log=print) -> EngineFolder:
    """Export, validate and write engines/NAME (see the module docstring). Returns the opened folder."""
    import onnxruntime

    from vilex import __version__
    from vilex.pipeline import ViLexPipeline, check_checkpoint

    from .optimize import OPTIMIZE_TARGETS, optimize_for_onnxruntime  # onnxruntime.transformers loads slowly

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
    source_files = checkpoint_paths(ckpt)
    source_sha256 = checkpoint_sha256(ckpt)  # hashed once here and cached: later runs check CKPT by metadata

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
        save_host_files(pipeline, ckpt, staging / "host", source_files)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "precision": options.precision,
            "opset": options.opset,
            "optimize": optimize,
            "versions": {"vilex": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "source": {"checkpoint": str(ckpt.resolve()), "sha256": source_sha256, "hash": CHECKPOINT_HASH,
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


__all__ = ["ExportError", "VARIANTS", "check_out", "export_checkpoint", "export_graph"]
