"""`vilex export` and `vilex build-engines` (registered through vilex.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import sys

from vilex.errors import ViLexUsageError
from vilex.settings import DEFAULT_STEPS
from vilex.toyworld.shipped import checkpoint_argument

from vilex.engines.contract import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, PRECISIONS
from vilex.engines.precision import CALIBRATION_METHODS, DEFAULT_CALIBRATION_COUNT, MAX_CALIBRATION_COUNT, QUANT_POLICY


def add_size_args(parser: argparse.ArgumentParser, exporting: bool) -> None:
    """Batch and image-size bounds; at export they default from the checkpoint, at build from the export."""
    def default(at_export: str) -> str:
        return f"default: {at_export}" if exporting else "default: the export's"

    parser.add_argument("--max-batch", type=int, default=None, help=f"images per call, 1..256 ({default('4')})")
    parser.add_argument("--opt-batch", type=int, default=None, help=f"the batch TensorRT tunes for ({default('1')})")
    parser.add_argument("--height", type=int, default=None, help=f"optimal image height in pixels ({default('the checkpoint size')})")
    parser.add_argument("--width", type=int, default=None, help=f"optimal image width in pixels ({default('the checkpoint size')})")
    parser.add_argument("--min-size", type=int, default=None, help=f"smallest image side in pixels ({default('half the size')})")
    parser.add_argument("--max-size", type=int, default=None, help=f"largest image side in pixels ({default('twice the size')})")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="checkpoint -> ONNX graphs validated against PyTorch, in engines/NAME")
    p.add_argument("ckpt", metavar="CKPT", type=checkpoint_argument,
                   help="a ViLex checkpoint folder, or 'toy' for the shipped toy checkpoint")
    p.add_argument("--out", required=True, help="the export folder, e.g. engines/NAME")
    p.add_argument("--precision", default="fp32",
                   help=f"{', '.join(PRECISIONS)} (default fp32): fp16 converts the graphs that are safe in fp16; "
                        f"int8 and fp8 also quantize the UNet, calibrated on its own denoising trajectories")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET}; "
                        f"{QUANT_POLICY['fp8'].min_opset} for fp8, whose QuantizeLinear came in that opset)")
    p.add_argument("--calibration-images", default=None, metavar="DIR",
                   help="int8/fp8: a folder of calibration images (recursive; default: toy-world scenes of the train "
                        "split); two more than --calibration-count are needed, to validate on held-out images")
    p.add_argument("--calibration-count", type=int, default=None, metavar="N",
                   help=f"int8/fp8: images whose reconstructions calibrate the UNet, 1..{MAX_CALIBRATION_COUNT} "
                        f"(default {DEFAULT_CALIBRATION_COUNT}: {DEFAULT_CALIBRATION_COUNT} x 25 steps x 2 guidance "
                        f"branches = {DEFAULT_CALIBRATION_COUNT * 50} UNet samples)")
    p.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                   help=f"int8/fp8: denoising steps of the calibration reconstructions (default {DEFAULT_STEPS}; "
                        f"calibrate at the step count you deploy with)")
    p.add_argument("--calibration-method", default=None, metavar="METHOD",
                   help=f"int8: how each activation's range is taken from the calibration data, "
                        f"{', '.join(CALIBRATION_METHODS['int8'])} (default {CALIBRATION_METHODS['int8'][0]}: each "
                        f"range cut at its 99.999th percentile; minmax takes the whole range); fp8 has "
                        f"{CALIBRATION_METHODS['fp8'][0]} only")
    add_size_args(p, exporting=True)
    p.add_argument("--optimize", default=None,
                   help="also write onnxruntime-optimized graphs fused for 'cpu' or 'gpu' (int8: cpu by default, with "
                        "the UNet in onnxruntime's CPU format)")
    p.add_argument("--replace", action="store_true",
                   help="replace an existing export in --out (atomically: the folder is swapped whole)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("build-engines", help="TensorRT engines from an export folder (needs TensorRT and a GPU)")
    p.add_argument("engines", help="an export folder from `vilex export`")
    p.add_argument("--fp16", action="store_true", help="fp16 engines (strongly typed from fp16 graphs, else the FP16 builder flag)")
    add_size_args(p, exporting=False)
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--force", action="store_true", help="rebuild even when an engine is up to date")
    p.set_defaults(func=cmd_build_engines)


def size_overrides(args) -> dict:
    names = ("max_batch", "opt_batch", "height", "width", "min_size", "max_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_export(args) -> None:
    from vilex.engines.contract import ExportOptions
    from .onnx_export import export_checkpoint
    from .validate import ExportError

    options = ExportOptions(precision=args.precision, opset=args.opset, **size_overrides(args))
    print(f"exporting {args.ckpt} -> {args.out} ({args.precision}"
          + (f", opset {args.opset}" if args.opset is not None else "") + ")")
    try:
        folder = export_checkpoint(args.ckpt, args.out, options, replace=args.replace, optimize=args.optimize,
                                   calibration_images=args.calibration_images,
                                   calibration_count=args.calibration_count,
                                   calibration_steps=args.calibration_steps,
                                   calibration_method=args.calibration_method)
    except ExportError as error:
        print(f"vilex export: failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    size = sum(entry["bytes"] for entry in folder.manifest["files"].values())
    print(f"wrote {folder.root} ({size / 1e6:.1f} MB): {', '.join(folder.graph_names)}; manifest {folder.root / 'manifest.json'}")


def cmd_build_engines(args) -> None:
    from vilex.engines.folder import EngineFolder
    from .tensorrt_build import BuildError, build_engines

    folder = EngineFolder.open(args.engines, what="ENGINES")
    try:
        build_engines(folder, fp16=args.fp16, overrides=size_overrides(args), workspace_gb=args.workspace_gb,
                      force=args.force)
    except BuildError as error:
        print(f"vilex build-engines: failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["add_parser", "cmd_build_engines", "cmd_export"]
