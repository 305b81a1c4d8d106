"""`vilex build-engines`: TensorRT engines from an export folder, through the TensorRT Python API.

    1. contracts for the build: the export's, with any batch/size bounds given on the command line
    2. build_engines.sh: the same builds as `trtexec` commands (written first: it needs no TensorRT)
    3. TensorRT and a GPU, or a TensorRTUnavailableError (exit 2) that points at the script
    4. per graph, a plan: engine file `tensorrt/<graph>.<precision>.trt<version>.sm<cc>.plan`, and a
       build key (sha256 over the ONNX files' hashes, the profile, precision, typing, TensorRT version,
       compute capability and builder settings); an engine is up to date when the manifest records
       the same key for it and the file still has the recorded sha256, so a changed graph, profile or
       setting rebuilds it while an unchanged one is skipped (not merely because the file exists)
    5. build the stale ones: Builder -> NetworkDefinition from OnnxParser -> BuilderConfig with one
       optimization profile from the contract, FP16 where asked, a timing cache shared by the graphs
    6. record each engine in manifest.json ("tensorrt": {"engines": {file: entry}}) with its hash

Precision. An fp16 export already says which parts are fp16 and which stay fp32
(onnx_export.FP16_POLICY); those graphs are built as strongly typed networks, which follow the graph's
types exactly (weak typing is deprecated from TensorRT 10.12 and gone in 11). `--fp16` on an fp32
export instead sets the FP16 builder flag (weakly typed: TensorRT picks fp16 kernels where faster),
except for the graphs the policy keeps fp32 (the VAE decoder); TensorRT 11 has no such flag, so there
export with `--precision fp16`.

8-bit. The UNet of an int8 or fp8 export is a QDQ graph (QuantizeLinear/DequantizeLinear around the
quantized layers' inputs and weights, export/quantize.py): TensorRT builds it with explicit quantization,
as a strongly typed network and without precision flags, as NVIDIA's guide says to ("Use explicit
quantization with Strong Typing. Precision-control build flags are not required and should not be
specified"); the other graphs of such an export are built as those of an fp16 export. FP8 kernels exist
from compute capability 8.9 (Ada, Hopper) on; an fp8 export on an older GPU is refused before any build.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError

from vilex.backends.tensorrt import TensorRTUnavailableError, cuda_compute_capability, engine_file_name, import_tensorrt
from vilex.engines.contract import GraphContract, build_contracts
from vilex.engines.folder import EngineFolder, sha256_file
from vilex.engines.precision import FP16_POLICY, QUANT_POLICY

ENGINE_DIR = "tensorrt"
SCRIPT = "build_engines.sh"


class BuildError(Exception):
    """TensorRT could not parse a graph or build an engine."""


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    return f"timing.trt{trt_version}.sm{compute_capability}.cache"


# ---- what to build ---------------------------------------------------------------------------------------
def build_contracts_for(folder: EngineFolder, overrides: dict | None = None) -> dict[str, GraphContract]:
    """The export's contracts, with batch/size bounds replaced where `overrides` says (checked as at export)."""
    options = dataclasses.replace(folder.options, **(overrides or {}))
    return build_contracts(folder.dims, options)


def profile_shapes(contract: GraphContract) -> dict[str, dict[str, tuple[int, ...]]]:
    """{"min"|"opt"|"max": {input: shape}}: one optimization profile from the contract's bounds."""
    return {point: contract.input_shapes(point) for point in ("min", "opt", "max")}


@dataclass
class EngineBuild:
    graph: str
    onnx: str  # relative to the folder
    engine: str  # relative to the folder
    precision: str  # of the engine: "fp32", "fp16", or "int8" / "fp8" (a QDQ graph)
    strongly_typed: bool
    fp16_flag: bool
    profile: dict[str, dict[str, tuple[int, ...]]]
    key: str = ""
    up_to_date: bool = False


def plan_builds(folder: EngineFolder, fp16: bool, trt_version: str, compute_capability: str,
                overrides: dict | None = None, workspace_gb: float | None = None) -> list[EngineBuild]:
    """One EngineBuild per graph, with its key and whether the recorded engine is up to date."""
    contracts = build_contracts_for(folder, overrides)
    recorded = folder.manifest.get("tensorrt", {}).get("engines", {})
    builds = []
    for graph in folder.graph_names:
        exported = folder.graph_precision(graph)  # fp32, fp16, int8 or fp8: strongly typed but for fp32
        fp16_flag = fp16 and exported == "fp32" and FP16_POLICY[graph].convert
        precision = "fp16" if fp16_flag else exported
        onnx_path = folder.graph_path(graph, "onnx")
        build = EngineBuild(
            graph=graph, onnx=onnx_path.relative_to(folder.root).as_posix(),
            engine=f"{ENGINE_DIR}/{engine_file_name(graph, precision, trt_version, compute_capability)}",
            precision=precision, strongly_typed=not fp16_flag, fp16_flag=fp16_flag,
            profile=profile_shapes(contracts[graph]))
        # The graph's files as the manifest records them (verified against the disk before building).
        onnx_files = {rel: entry["sha256"] for rel, entry in folder.manifest["files"].items()
                      if rel in (build.onnx, build.onnx + ".data")}
        key_material = {"onnx": onnx_files, "profile": build.profile, "precision": precision,
                        "strongly_typed": build.strongly_typed, "fp16_flag": fp16_flag, "tensorrt": trt_version,
                        "compute_capability": compute_capability, "workspace_gb": workspace_gb}
        build.key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
        entry = recorded.get(Path(build.engine).name)
        engine_path = folder.root / build.engine
        build.up_to_date = bool(entry and entry.get("key") == build.key and engine_path.is_file()
                                and sha256_file(engine_path) == entry.get("sha256"))
        builds.append(build)
    return builds


def check_compute_capability(folder: EngineFolder, compute_capability: str) -> None:
    """Refuse a quantized graph this GPU has no kernels for (FP8 below sm89) before building anything."""
    for graph in folder.graph_names:
        policy = QUANT_POLICY.get(folder.graph_precision(graph))
        if policy and policy.min_compute_capability and int(compute_capability) < policy.min_compute_capability:
            minimum = f"{policy.min_compute_capability // 10}.{policy.min_compute_capability % 10}"
            raise ViLexUsageError(
                f"ENGINES '{folder.root}' is a {policy.precision} export: TensorRT builds {policy.precision} engines "
                f"on GPUs of compute capability {minimum} or newer (Ada, Hopper and later), and this one is "
                f"{compute_capability[:-1]}.{compute_capability[-1]} (sm{compute_capability}); export with "
                f"--precision int8 or fp16 for it")


# ---- trtexec ---------------------------------------------------------------------------------------------
def shapes_arg(shapes: dict[str, tuple[int, ...]]) -> str:
    """trtexec's shape syntax: name:1x4x64x64,timestep:1."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trtexec_command(build: EngineBuild, engine: str, timing_cache: str, workspace_gb: float | None = None) -> list[str]:
    command = ["trtexec", f"--onnx={build.onnx}", f"--saveEngine={engine}",
               f"--minShapes={shapes_arg(build.profile['min'])}", f"--optShapes={shapes_arg(build.profile['opt'])}",
               f"--maxShapes={shapes_arg(build.profile['max'])}",
               "--fp16" if build.fp16_flag else "--stronglyTyped", f"--timingCacheFile={timing_cache}"]
    if workspace_gb:
        command.append(f"--memPoolSize=workspace:{int(workspace_gb * 1024)}M")
    return command


def build_script(builds: list[EngineBuild], workspace_gb: float | None = None) -> str:
    """A bash script with the trtexec commands for `builds`; TensorRT version and GPU come from the machine
    it runs on (or TRT_VERSION / SM), so the engine names match what the Python build would write there."""
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `vilex build-engines`: the same engines as its TensorRT Python API build, as trtexec",
        "# commands for NVIDIA's TensorRT container. Run from anywhere: bash build_engines.sh",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "TRT_VERSION=\"${TRT_VERSION:-$(python3 -c 'import tensorrt; print(tensorrt.__version__)')}\"",
        "SM=\"${SM:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | tr -d '.')}\"",
        f"mkdir -p {ENGINE_DIR}",
    ]
    cache = f"{ENGINE_DIR}/timing.trt${{TRT_VERSION}}.sm${{SM}}.cache"
    for build in builds:
        command = trtexec_command(build, engine=build.engine, timing_cache=cache, workspace_gb=workspace_gb)
        # Parts with ${...} are double-quoted so that the shell expands them; the rest are quoted as literals.
        quoted = [f'"{part}"' if "${" in part else shlex.quote(part) for part in command]
        lines.append("")
        lines.append(f"# {build.graph}: {build.precision}, "
                     + ("FP16 builder flag" if build.fp16_flag else "strongly typed (precision from the graph)"))
        lines.append(" \\\n    ".join(quoted))
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    staging = path.with_name(f".{path.name}.partial")
    try:
        staging.write_text(text)
        os.chmod(staging, mode)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


# ---- building ---------------------------------------------------------------------------------------------
def build_engine(trt, folder: EngineFolder, build: EngineBuild, timing_cache: Path, workspace_gb: float | None,
                 log=print) -> None:
    """Build one engine with the TensorRT Python API and write it atomically."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if build.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder.root / build.onnx)):  # follows external data next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {build.onnx}: {errors}")

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if build.fp16_flag:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ViLexUsageError(f"TensorRT {trt.__version__} builds strongly typed networks only: export with "
                                  f"`vilex export CKPT --precision fp16` instead of building fp32 graphs with --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name in build.profile["min"]:
        profile.set_shape(name, build.profile["min"][name], build.profile["opt"][name], build.profile["max"][name])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"  building {build.engine} ({build.precision}, "
        f"{'FP16 flag' if build.fp16_flag else 'strongly typed'}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {build.engine} from {build.onnx} (see its log above)")
    engine_path = folder.root / build.engine
    staging = engine_path.with_name(f".{engine_path.name}.partial")
    try:
        with open(staging, "wb") as handle:
            handle.write(serialized)
        os.replace(staging, engine_path)
    finally:
        staging.unlink(missing_ok=True)
    timing_staging = timing_cache.with_name(f".{timing_cache.name}.partial")
    try:
        with open(timing_staging, "wb") as handle:
            handle.write(config.get_timing_cache().serialize())
        os.replace(timing_staging, timing_cache)
    finally:
        timing_staging.unlink(missing_ok=True)


def record_engines(folder: EngineFolder, builds: list[EngineBuild], trt_version: str, compute_capability: str,
                   workspace_gb: float | None) -> None:
    """Write the engines' entries (key, sha256, profile ...) and the current file list to the manifest."""
    section = folder.manifest.get("tensorrt", {"engines": {}})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for build in builds:
        name = Path(build.engine).name
        if build.up_to_date and name in section["engines"]:
            continue
        section["engines"][name] = {
            "graph": build.graph, "file": build.engine, "onnx": build.onnx, "precision": build.precision,
            "strongly_typed": build.strongly_typed, "fp16_flag": build.fp16_flag, "tensorrt": trt_version,
            "compute_capability": compute_capability, "workspace_gb": workspace_gb,
            "profile": {point: {n: list(s) for n, s in shapes.items()} for point, shapes in build.profile.items()},
            "key": build.key, "sha256": sha256_file(folder.root / build.engine), "built": now,
        }
    section["script"] = SCRIPT
    timing_caches = [p.relative_to(folder.root).as_posix() for p in (folder.root / ENGINE_DIR).glob("timing.*.cache")]
    folder.update({"tensorrt": section}, files=[b.engine for b in builds] + timing_caches)


def build_engines(folder: EngineFolder, fp16: bool = False, overrides: dict | None = None,
                  workspace_gb: float | None = None, force: bool = False, log=print) -> list[EngineBuild]:
    """The whole of `vilex build-engines` (see the module docstring); returns the plans."""
    if workspace_gb is not None and workspace_gb <= 0:
        raise ViLexUsageError(f"--workspace-gb must be > 0, got {workspace_gb}")
    # 1-2. Contracts and the trtexec script (machine-independent: version and GPU are shell variables)
    script_plans = plan_builds(folder, fp16, "${TRT_VERSION}", "${SM}", overrides, workspace_gb)
    write_text_atomic(folder.root / SCRIPT, build_script(script_plans, workspace_gb), mode=0o755)
    folder.update({}, files=[SCRIPT])
    log(f"wrote {folder.root / SCRIPT} (trtexec commands)")

    # 3. TensorRT and a GPU
    try:
        trt = import_tensorrt()
        compute_capability = cuda_compute_capability()
    except TensorRTUnavailableError as error:
        raise TensorRTUnavailableError(f"{error}. The equivalent trtexec commands are in {folder.root / SCRIPT}") from None
    trt_version = trt.__version__
    check_compute_capability(folder, compute_capability)

    # 4. Plans; the graphs must be what the manifest says, since the build keys trust its hashes
    problems = [p for p in folder.verify() if "onnx/" in p]
    if problems:
        raise ViLexUsageError(f"ENGINES '{folder.root}' does not match its manifest ({'; '.join(problems)}); re-export it")
    builds = plan_builds(folder, fp16, trt_version, compute_capability, overrides, workspace_gb)

    # 5. Build what is stale
    (folder.root / ENGINE_DIR).mkdir(exist_ok=True)
    timing_cache = folder.root / ENGINE_DIR / timing_cache_name(trt_version, compute_capability)
    for build in builds:
        if build.up_to_date and not force:
            log(f"  {build.engine} is up to date")
            continue
        build_engine(trt, folder, build, timing_cache, workspace_gb, log)
        build.up_to_date = False  # freshly built: recorded below

    # 6. Manifest
    record_engines(folder, builds, trt_version, compute_capability, workspace_gb)
    return builds
