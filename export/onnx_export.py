"""`vilex export`: a checkpoint -> validated ONNX graphs, host-side files and a manifest in engines/NAME.

    1. check the checkpoint and the output folder (before anything slow)
    2. load the pipeline in fp32 and derive the contracts (vilex/engines/contract.py)
    3. per graph: trace the stage wrapper (vilex/stages.py) with torch.onnx.export, check it with
       onnx.checker, convert to fp16 where asked (FP16_POLICY), optionally optimize for onnxruntime;
       for int8/fp8, record calibration data first (export/calibration.py) and quantize the UNet after its
       fp32 graph has been validated (export/quantize.py, QUANT_POLICY)
    4. validate every graph file against PyTorch at two batch sizes (export/validate.py); a quantized
       UNet on held-out denoising inputs
    5. write the host-side files (vilex/engines/host.py) and manifest.json; for int8/fp8, first check the
       whole export end to end: held-out reconstructions through onnxruntime against the fp32 PyTorch ones
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

from vilex import settings
from vilex.errors import ViLexUsageError
from vilex.outputs import open_to_all_readers, swap_folder_into_place

from vilex.engines.contract import GRAPH_NAMES, ExportOptions, GraphContract, ModelDims, build_contracts
from vilex.engines.folder import (CHECKPOINT_HASH, FORMAT, FORMAT_VERSION, MANIFEST, EngineFolder, checkpoint_paths,
                                  checkpoint_sha256, folder_files, write_json_atomic)
from vilex.engines.host import save_host_files
from vilex.engines.precision import FP16_POLICY, QUANT_POLICY, graph_precision

from .calibration import DEFAULT_CALIBRATION_COUNT, calibration_set, record_trajectories, resolve_method
from .graphs import EXTERNAL_DATA_THRESHOLD, convert_to_fp16, save_graph
from .quantize import FORMATS, quantize_unet
from .validate import ExportError, sample_inputs, validate_end_to_end, validate_graph, validate_quantized_graph

TRACE_SEED = 0


VARIANTS = ("onnx", "ort")


@dataclass
class GraphRecord:
    files: dict[str, str] = field(default_factory=dict)  # variant -> relative path of the graph file
    precision: str = "fp32"
    keep_fp32: str = ""
    validation: dict[str, list] = field(default_factory=dict)  # variant -> records
    fused_operators: dict[str, int] = field(default_factory=dict)  # with --optimize
    quantization: dict | None = None  # int8 / fp8: export/quantize.py's record
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
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log=print,
                      calibration_images: str | os.PathLike | None = None,
                      calibration_count: int | None = None, calibration_steps: int | None = None,
                      calibration_method: str | None = None) -> EngineFolder:
    """Export, validate and write engines/NAME (see the module docstring). Returns the opened folder.

    calibration_images / calibration_count / calibration_steps / calibration_method (int8 and fp8 only): the
    calibration images' folder (default: toy-world scenes), how many (default calibration.DEFAULT_CALIBRATION_COUNT),
    the denoising steps of their reconstructions (default settings.DEFAULT_STEPS: calibrate at the step count
    you deploy with) and how the activation ranges are taken from them (vilex/engines/precision.py
    CALIBRATION_METHODS; the precision's first by default)."""
    import onnxruntime

    from vilex import __version__
    from vilex.pipeline import ViLexPipeline, check_checkpoint

    from .optimize import OPTIMIZE_TARGETS, optimize_for_onnxruntime  # onnxruntime.transformers loads slowly

    # 1. Check the inputs
    ckpt, out = check_checkpoint(ckpt), Path(out)
    check_out(out, replace)
    if optimize is not None and optimize not in OPTIMIZE_TARGETS:
        raise ViLexUsageError(f"--optimize must be one of {', '.join(OPTIMIZE_TARGETS)}, got {optimize!r}")
    quantized = options.precision in QUANT_POLICY
    if not quantized and (calibration_images, calibration_count, calibration_steps, calibration_method) != (None,) * 4:
        raise ViLexUsageError(f"--calibration-images, --calibration-count, --calibration-steps and "
                              f"--calibration-method are for --precision {' or '.join(QUANT_POLICY)}, "
                              f"not {options.precision}")
    if quantized and optimize is not None and not (optimize == "cpu" and QUANT_POLICY[options.precision].cpu_kernels):
        raise ViLexUsageError(
            f"--optimize {optimize} cannot be combined with --precision {options.precision}: " + (
                "onnxruntime has no FP8 kernels (its CPU runs the graph by dequantizing it); FP8 runs through "
                "TensorRT (`vilex build-engines`) on GPUs of compute capability 8.9 or newer"
                if not QUANT_POLICY[options.precision].cpu_kernels else
                "on GPUs the 8-bit UNet runs through TensorRT (`vilex build-engines`); --optimize cpu writes "
                "onnxruntime's CPU format of it to ort/"))
    if quantized and optimize is None and QUANT_POLICY[options.precision].cpu_kernels:
        optimize = "cpu"  # int8 also writes onnxruntime's CPU format of the UNet to ort/ (export/quantize.py)
    if quantized:  # before anything slow: a wrong folder or count fails here
        calibration = calibration_set(calibration_images,
                                      DEFAULT_CALIBRATION_COUNT if calibration_count is None else calibration_count,
                                      steps=settings.DEFAULT_STEPS if calibration_steps is None else calibration_steps,
                                      method=resolve_method(calibration_method, options.precision))

    # 2. Pipeline and contracts
    pipeline = ViLexPipeline.from_pretrained(ckpt)  # fp32: the reference every graph is validated against
    dims = ModelDims.from_pipeline(pipeline)
    options = options.resolved(dims)
    contracts = build_contracts(dims, options)
    from vilex.stages import stage_modules

    modules = {name: module.eval() for name, module in stage_modules(pipeline).items()}
    source_files = checkpoint_paths(ckpt)
    source_sha256 = checkpoint_sha256(ckpt)  # hashed once here and cached: later runs check CKPT by metadata
    if quantized:  # 2b. the UNet's inputs over real denoising trajectories (PyTorch, fp32)
        log(f"  calibration: {calibration.count} images from {calibration.source}, {calibration.steps} steps; "
            f"{len(calibration.images) - calibration.count} held out")
        pipeline.set_progress_bar_config(disable=True)
        calibration_calls = record_trajectories(pipeline, calibration.images[:calibration.count], 0,
                                                calibration.steps, calibration.guidance, calibration.seed, log=log)
        heldout = record_trajectories(pipeline, calibration.images[calibration.count:], calibration.count,
                                      calibration.steps, calibration.guidance, calibration.seed, log=log)

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
            target = graph_precision(name, options.precision)
            start = time.perf_counter()
            # 3. Trace, convert, optimize
            path = staging / "onnx" / f"{name}.onnx"
            export_graph(modules[name], contract, path, external_data_threshold)
            record.files["onnx"] = f"onnx/{name}.onnx"
            if optimize and target not in QUANT_POLICY:  # fuse the fp32 graph (the fusions are written for it), convert
                (staging / "ort").mkdir(exist_ok=True)
                record.fused_operators = optimize_for_onnxruntime(
                    name, path, staging / "ort" / f"{name}.onnx", optimize, target, policy, external_data_threshold)
                record.files["ort"] = f"ort/{name}.onnx"
            if target == "fp16":
                model = convert_to_fp16(onnx.load(str(path)), policy)
                save_graph(model, path, external_data_threshold)
                del model
                record.precision, record.keep_fp32 = "fp16", policy.keep_fp32
            elif target in QUANT_POLICY:
                # The fp32 graph is validated first, at batch 1 and 3 (its shapes and dynamic axes, which Q/DQ
                # nodes do not change); the quantized graphs are then validated on held-out denoising inputs.
                # With --optimize cpu, onnxruntime's CPU format goes to ort/ (export/quantize.py FORMATS).
                record.validation["onnx"] = validate_graph(contract, modules[name], path, "fp32")
                described = {**calibration.describe(dims.num_queries), "unet_calls": len(calibration_calls.calls),
                             "unet_samples": calibration_calls.samples}
                record.quantization = {}
                for variant in (("ort", "onnx") if optimize else ("onnx",)):  # ort/ first: onnx/ is replaced
                    (staging / variant).mkdir(exist_ok=True)
                    record.quantization[variant] = quantize_graph(
                        path, staging / variant / f"{name}.onnx", QUANT_POLICY[target], FORMATS[variant],
                        calibration_calls.calls, described, external_data_threshold)
                    record.files[variant] = f"{variant}/{name}.onnx"
                record.precision, record.keep_fp32 = target, QUANT_POLICY[target].keep_float
            elif options.precision == "fp32":
                record.keep_fp32 = "everything (fp32 export)"
            else:
                record.keep_fp32 = policy.keep_fp32
            record.export_seconds = time.perf_counter() - start
            # 4. Validate every variant
            for variant, relative in record.files.items():
                if record.precision in QUANT_POLICY:
                    record.validation.setdefault(variant, []).append(validate_quantized_graph(
                        contract, modules[name], staging / relative, record.precision, heldout.calls))
                else:
                    record.validation[variant] = validate_graph(contract, modules[name], staging / relative,
                                                                record.precision)
            log(describe_validation(name, record))
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
                       **({"quantization": record.quantization} if record.quantization else {}),
                       "export_seconds": round(record.export_seconds, 2)}
                for name, record in records.items()
            },
            "host": "host",
            "files": folder_files(staging),
        }
        if quantized:  # 5b. the whole export against PyTorch fp32, on the held-out images, per variant
            manifest["end_to_end"] = {}
            for variant in records["unet"].files:
                end_to_end = manifest["end_to_end"][variant] = validate_end_to_end(
                    pipeline, EngineFolder(staging, manifest), variant, calibration.images[calibration.count:],
                    heldout, first_index=calibration.count, steps=calibration.steps, guidance=calibration.guidance,
                    seed=calibration.seed, precision=options.precision,
                    figures="; ".join(describe_validation(n, r).strip() for n, r in records.items()))
                log(f"  end to end     {options.precision}  {variant}/: {end_to_end['images']} held-out "
                    f"reconstructions through onnxruntime vs PyTorch fp32: mean PSNR {end_to_end['mean_psnr_db']:.1f} "
                    f"dB ({', '.join(f'{p:.1f}' for p in end_to_end['psnr_db'])}; allowed >= "
                    f"{end_to_end['allowed_mean_psnr_db']:g})")
        write_json_atomic(staging / MANIFEST, manifest)

        # 6. Into place
        check_out(out, replace)  # again: another process may have written there meanwhile
        open_to_all_readers(staging)
        swap_folder_into_place(staging, out)  # an existing export is swapped out whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return EngineFolder.open(out, what="--out")


def quantize_graph(source: Path, dest: Path, policy, qdq_format, calls: list, calibration: dict,
                   external_data_threshold: int) -> dict:
    """Quantize the validated fp32 graph at `source` to `dest` (which may be `source`: it is replaced) in
    `qdq_format` (export/quantize.py); return its manifest record."""
    with tempfile.TemporaryDirectory(prefix="quantize.", dir=dest.parent) as work:
        quantized_path = Path(work) / dest.name
        record = quantize_unet(source, quantized_path, policy, qdq_format, calls, calibration)
        model = onnx.load(str(quantized_path))  # follows external data the quantizer may have written
    save_graph(model, dest, external_data_threshold)  # replaces a graph there (and its .data); onnx.checker
    return record.to_dict()


def describe_validation(name: str, record: GraphRecord) -> str:
    """One log line: the graph's precision, export time and validation figures."""
    head = f"  {name:<14} {record.precision}  exported in {record.export_seconds:5.1f} s; "
    fp32_cases = [r for r in record.validation["onnx"] if "case" not in r]
    if record.precision in QUANT_POLICY:
        before = max(o["max_abs_diff"] for r in fp32_cases for o in r["outputs"].values())
        parts = []
        for variant, records in record.validation.items():
            quantized = next(r for r in records if "case" in r)
            figures = next(iter(quantized["outputs"].values()))
            parts.append(f"{variant}/ relative RMS {figures['rel_rms']:.3g} (allowed {figures['allowed_rel_rms']:g}), "
                         f"max |diff| {figures['max_abs_diff']:.2e}")
        calls = quantized["case"].split(" on ", 1)[1]
        return (head + f"onnxruntime vs PyTorch fp32 on {calls}: {'; '.join(parts)}; the fp32 graph before "
                f"quantization max |diff| {before:.2e} at batch 1, 3")
    worst = max(o["max_abs_diff"] for v in record.validation.values() for r in v for o in r["outputs"].values())
    return head + (f"onnxruntime vs PyTorch max |diff| {worst:.2e} at batch "
                   f"{', '.join(str(r['sizes']['batch']) for r in fp32_cases)}")


__all__ = ["ExportError", "VARIANTS", "check_out", "export_checkpoint", "export_graph"]
