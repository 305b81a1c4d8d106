"""TensorRT: profiles, build plans, trtexec commands and manifest entries from the contract (on CPU),
and engine building and running (marked `tensorrt`, skipped without TensorRT and a GPU)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vilex.errors import ViLexUsageError
from vilex.engines.contract import ExportOptions, ModelDims
from vilex.engines.folder import EngineFolder
from vilex.export.onnx_export import export_checkpoint
from vilex.export.tensorrt_build import (
    SCRIPT, build_script, engine_file_name, plan_builds, profile_shapes, record_engines, shapes_arg,
)


def tensorrt_ready() -> str | None:
    """None when TensorRT and a CUDA GPU are both there, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (it has no PyPI wheel installable without NVIDIA's index)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


NOT_READY = tensorrt_ready()
needs_tensorrt = pytest.mark.skipif(NOT_READY is not None, reason=f"needs TensorRT and a GPU: {NOT_READY}")


@pytest.fixture(scope="module")
def trt_ckpt(tiny_ckpt) -> Path:
    """The session's tiny checkpoint (conftest.py)."""
    return tiny_ckpt


@pytest.fixture(scope="module")
def exported(trt_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("trt-engines") / "tiny"
    return export_checkpoint(trt_ckpt, out, ExportOptions(max_batch=2), log=lambda *_: None)


@pytest.fixture()
def folder(exported, tmp_path) -> EngineFolder:
    """A private copy: these tests write engines, scripts and manifest entries into it."""
    return EngineFolder.open(shutil.copytree(exported.root, tmp_path / "tiny"))


# ---- profiles and commands (CPU) ---------------------------------------------------------------------------
def test_profiles_come_from_the_contract(folder):
    unet = folder.contract("unet")
    profile = profile_shapes(unet)
    # max_batch 2 images -> up to 3 guidance branches -> 6; latents 16..64 (32..128 px), opt 32 (64 px)
    assert profile["min"] == {"sample": (1, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)}
    assert profile["opt"] == {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    assert profile["max"] == {"sample": (6, 4, 64, 64), "timestep": (6,), "encoder_hidden_states": (6, 77, 32)}
    assert shapes_arg(profile["max"]) == "sample:6x4x64x64,timestep:6,encoder_hidden_states:6x77x32"
    assert profile_shapes(folder.contract("vilex_encoder"))["max"] == {"pixel_values": (2, 3, 32, 32)}


def test_build_plans_names_precision_and_overrides(folder):
    builds = {b.graph: b for b in plan_builds(folder, fp16=True, trt_version="10.3.0", compute_capability="90")}
    assert builds["unet"].engine == "tensorrt/unet.fp16.trt10.3.0.sm90.plan"
    assert engine_file_name("unet", "fp16", "10.3.0", "90") == "unet.fp16.trt10.3.0.sm90.plan"
    # fp32 graphs + --fp16: the FP16 builder flag, except for the VAE decoder, which stays fp32
    assert builds["unet"].fp16_flag and not builds["unet"].strongly_typed
    assert builds["vae_decoder"].precision == "fp32" and builds["vae_decoder"].strongly_typed
    assert not any(b.up_to_date for b in builds.values())
    wide = {b.graph: b for b in plan_builds(folder, True, "10.3.0", "90", overrides={"max_batch": 4, "max_size": 256})}
    assert wide["unet"].profile["max"]["sample"] == (12, 4, 128, 128)
    assert wide["unet"].key != builds["unet"].key
    with pytest.raises(ViLexUsageError, match="--max-size must be a positive multiple of 4"):
        plan_builds(folder, True, "10.3.0", "90", overrides={"max_size": 130})


# ---- trtexec commands, read back as trtexec would read them ----------------------------------------------------
# Flags of trtexec (TensorRT 10) that a build may use; anything else is a typo trtexec would reject.
TRTEXEC_FLAGS = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--fp16", "--stronglyTyped",
                 "--timingCacheFile", "--memPoolSize"}


def parse_trtexec(argv: list[str]) -> dict[str, str | None]:
    """trtexec's arguments -> {flag: value, or None for a bare flag}; each flag at most once."""
    flags: dict[str, str | None] = {}
    for argument in argv:
        flag, _, value = argument.partition("=")
        assert flag not in flags, f"{flag} given twice"
        flags[flag] = value if _ else None
    return flags


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """trtexec's shape syntax 'name:2x4x32x32,timestep:2' -> {name: (2, 4, 32, 32), ...}, in order."""
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def script_commands(script: str) -> list[list[str]]:
    """The trtexec command lines of a bash script, split as the shell splits them (no expansion)."""
    joined = script.replace("\\\n", " ")  # line continuations
    commands = [shlex.split(line) for line in joined.splitlines() if line.lstrip().startswith(("trtexec", "'trtexec'"))]
    return [c for c in commands if c[0] == "trtexec"]


def check_trtexec_call(argv: list[str], folder: EngineFolder, fp16: bool, trt_version: str, sm: str,
                       workspace_mib: int | None) -> str:
    """One trtexec call against the export: the ONNX file it names and the contract of that graph. Returns
    the graph's name."""
    import onnx

    flags = parse_trtexec(argv)
    assert set(flags) <= TRTEXEC_FLAGS, set(flags) - TRTEXEC_FLAGS
    onnx_file = flags["--onnx"]
    graph = Path(onnx_file).stem
    contract = folder.contract(graph)
    assert (folder.root / onnx_file).is_file() and onnx_file == f"onnx/{graph}.onnx"

    # Shapes: one per graph input, in the graph's own order (read from the ONNX file), at the contract's bounds.
    inputs = onnx.load(str(folder.root / onnx_file), load_external_data=False).graph.input
    profile = {point: parse_shapes(flags[f"--{point}Shapes"]) for point in ("min", "opt", "max")}
    for point, shapes in profile.items():
        assert list(shapes) == [i.name for i in inputs] == contract.input_names, point
        for spec in contract.inputs:
            expected = tuple(getattr(contract.axes[d], point) if isinstance(d, str) else d for d in spec.shape)
            assert shapes[spec.name] == expected, (graph, point, spec.name)
    for graph_input in inputs:
        dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        low, opt, high = (profile[p][graph_input.name] for p in ("min", "opt", "max"))
        for dim, a, b, c in zip(dims, low, opt, high):
            if isinstance(dim, int):  # a fixed size of the graph: the same at every point
                assert a == b == c == dim, (graph_input.name, dims)
            else:  # a dynamic axis: ordered, and on its multiple (latent sizes, for the UNet's down-sampling)
                bounds = contract.axes[dim]
                assert 1 <= a <= b <= c and not (a % bounds.multiple or b % bounds.multiple or c % bounds.multiple)

    # Precision: the FP16 builder flag on an fp32 export, except for the VAE decoder, which stays fp32
    # (strongly typed, following the graph's own types); never both flags.
    precision = "fp16" if fp16 and graph != "vae_decoder" else "fp32"
    assert ("--fp16" in flags) == (precision == "fp16") != ("--stronglyTyped" in flags)
    assert flags.get("--fp16", None) is None and flags.get("--stronglyTyped", None) is None  # bare flags
    # Artifact names carry what makes them stale: precision, TensorRT version, GPU architecture.
    assert flags["--saveEngine"] == f"tensorrt/{graph}.{precision}.trt{trt_version}.sm{sm}.plan"
    assert flags["--timingCacheFile"] == f"tensorrt/timing.trt{trt_version}.sm{sm}.cache"
    assert flags.get("--memPoolSize") == (f"workspace:{workspace_mib}M" if workspace_mib else None)
    return graph


def test_trtexec_script_follows_the_contract(folder):
    """The script's commands split as the shell would split them (before it expands the machine's TensorRT
    version and GPU, as `vilex build-engines` writes it), flag by flag against the export."""
    builds = plan_builds(folder, fp16=False, trt_version="${TRT_VERSION}", compute_capability="${SM}", workspace_gb=4)
    commands = script_commands(build_script(builds, workspace_gb=4))
    graphs = [check_trtexec_call(c[1:], folder, fp16=False, trt_version="${TRT_VERSION}", sm="${SM}",
                                 workspace_mib=4096) for c in commands]
    assert graphs == folder.graph_names == ["vilex_encoder", "text_encoder", "unet", "vae_decoder"]
    # The UNet's profile spans one to three guidance branches per image (max_batch 2 at export).
    unet = parse_trtexec(commands[2][1:])
    assert parse_shapes(unet["--maxShapes"])["sample"][0] == 3 * 2 == folder.contract("unet").axes["batch"].max


def test_build_script_runs_trtexec_as_the_contract_says(folder, tmp_path):
    """Run the generated script with a stand-in `trtexec` that records its working folder and arguments:
    the shell's own expansion of TRT_VERSION and SM, and the flags as trtexec would receive them."""
    builds = plan_builds(folder, fp16=True, trt_version="${TRT_VERSION}", compute_capability="${SM}")
    script = folder.root / SCRIPT
    script.write_text(build_script(builds))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" >> "$TRTEXEC_LOG"; echo ---- >> "$TRTEXEC_LOG"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "trtexec.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TRT_VERSION": "10.3.0", "SM": "90",
           "TRTEXEC_LOG": str(log)}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)  # started elsewhere: it cds itself
    calls = [call.strip().split("\n") for call in log.read_text().split("----") if call.strip()]
    assert len(calls) == 4
    assert all(Path(call[0]).resolve() == folder.root.resolve() for call in calls)  # paths are folder-relative
    graphs = [check_trtexec_call(call[1:], folder, fp16=True, trt_version="10.3.0", sm="90", workspace_mib=None)
              for call in calls]
    assert sorted(graphs) == sorted(folder.graph_names)
    assert (folder.root / "tensorrt").is_dir()  # the script made the engine folder


def test_up_to_date_by_hash_not_by_existence(folder):
    """Record engines as build-engines does after a build (stand-in bytes for the engines), then change
    one input of the key at a time."""
    def plans(**kwargs):
        return {b.graph: b for b in plan_builds(folder, True, "10.3.0", "90", **kwargs)}

    builds = plans()
    (folder.root / "tensorrt").mkdir()
    for build in builds.values():
        (folder.root / build.engine).write_bytes(f"engine of {build.graph}".encode())
    record_engines(folder, list(builds.values()), "10.3.0", "90", None)
    entry = folder.manifest["tensorrt"]["engines"]["unet.fp16.trt10.3.0.sm90.plan"]
    assert entry["key"] == builds["unet"].key and entry["profile"]["max"]["sample"] == [6, 4, 64, 64]
    assert folder.verify() == []  # the engines are listed with their hashes
    reopened = EngineFolder.open(folder.root)
    assert all(b.up_to_date for b in plan_builds(reopened, True, "10.3.0", "90"))

    assert not plans(overrides={"max_batch": 1})["unet"].up_to_date  # another profile
    assert not any(b.up_to_date for b in plan_builds(reopened, True, "10.4.0", "90"))  # another TensorRT
    (folder.root / builds["text_encoder"].engine).write_bytes(b"same name, other bytes")
    assert not plans()["text_encoder"].up_to_date and plans()["unet"].up_to_date
    folder.manifest["files"]["onnx/unet.onnx"]["sha256"] = "0" * 64  # as after re-exporting the graph
    assert not plans()["unet"].up_to_date


def test_build_engines_without_tensorrt_exits_2_and_leaves_the_script(exported, tmp_path, capsys):
    if NOT_READY is None:
        pytest.skip("TensorRT and a GPU are present: the command would build")
    from vilex.cli import main

    root = shutil.copytree(exported.root, tmp_path / "tiny")
    assert main(["build-engines", str(root), "--fp16"]) == 2
    err = capsys.readouterr().err
    # The error names what this machine lacks (NOT_READY: TensorRT first, then the GPU).
    missing = "TensorRT is not installed" if NOT_READY.startswith("TensorRT") else "no CUDA GPU"
    assert "vilex build-engines: error:" in err and missing in err
    assert f"{root / SCRIPT}" in err
    assert (root / SCRIPT).is_file() and os.access(root / SCRIPT, os.X_OK)
    assert EngineFolder.open(root).verify() == []  # the script is in the manifest, nothing else changed
    assert main(["build-engines", str(root), "--max-batch", "0"]) == 2
    assert "--max-batch must be in 1..256" in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(exported, trt_ckpt, tmp_path, capsys):
    if NOT_READY is None:
        pytest.skip("TensorRT and a GPU are present")
    from vilex.backends.tensorrt import TensorRTBackend
    from vilex.cli import main
    from vilex.samples import sample_paths

    missing = "TensorRT is not installed" if NOT_READY.startswith("TensorRT") else "no CUDA GPU"
    with pytest.raises(ViLexUsageError, match=missing):
        TensorRTBackend(exported)
    assert main(["reconstruct", str(trt_ckpt), str(sample_paths()[0]), "--out", str(tmp_path / "out"),
                 "--backend", "tensorrt", "--engines", str(exported.root)]) == 2
    assert "the tensorrt backend" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- the engine's CUDA handling, with fakes of TensorRT and torch.cuda (CPU) ------------------------------------
# What a GPU would make of these calls cannot be seen here; what can is the order of the calls, which execution
# context each one is on, and which device is current at each. The fakes record exactly that.
TINY_DIMS = dict(image_size=(32, 32), num_queries=75, hidden_size=32, text_length=77, unet_in_channels=4,
                 unet_out_channels=4, vae_latent_channels=4, vae_scale_factor=2, latent_multiple=2, default_size=64,
                 num_train_timesteps=1000, word_embedding_std=0.02)  # the tiny preset's sizes


def unet_contract():
    from vilex.engines.contract import build_contracts

    return build_contracts(ModelDims(**TINY_DIMS), ExportOptions(max_batch=2))["unet"]


class FakeCuda:
    """torch.cuda as vilex/backends/tensorrt.py uses it: the current device (`torch.cuda.device`), streams, and
    graph capture (`torch.cuda.graph` around the enqueue, `CUDAGraph.replay`). Events go to `calls`."""

    def __init__(self, monkeypatch, calls: list):
        self.calls, self.devices, self.capturing, self.graph_count = calls, [], False, 0
        fake = self

        class Stream:
            cuda_stream = 1234

            def __init__(self, device=None):
                pass

            def synchronize(self):
                fake.calls.append(("synchronize",))

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def __init__(self):
                fake.graph_count += 1
                self.id = fake.graph_count

            def replay(self):
                fake.calls.append(("replay", self.id))

        @contextlib.contextmanager
        def device(index):
            self.devices.append(index if isinstance(index, int) else torch.device(index).index)
            try:
                yield
            finally:
                self.devices.pop()

        @contextlib.contextmanager
        def graph(cuda_graph, stream=None, **kwargs):
            self.calls.append(("capture_begin", cuda_graph.id))
            self.capturing = True
            try:
                yield
            finally:
                self.capturing = False
                self.calls.append(("capture_end", cuda_graph.id))

        self.Stream = Stream
        for name, value in {"Stream": Stream, "CUDAGraph": CUDAGraph, "device": device, "graph": graph,
                            "current_stream": lambda device=None: Stream(), "stream": lambda s: contextlib.nullcontext(),
                            "is_available": lambda: True, "get_device_capability": lambda device=None: (9, 0)}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    @property
    def current_device(self) -> int:
        return self.devices[-1] if self.devices else 0  # CUDA's current device is 0 until set


def fake_tensorrt(contract, cuda: FakeCuda):
    """A `tensorrt` module for one engine of `contract`: Runtime -> ICudaEngine -> IExecutionContext, recording
    deserialization, context creation and `execute_async_v3` with the current device. A context refuses to be
    rebound once a graph captured it: the graph would replay its old shapes and addresses."""
    calls = cuda.calls
    dtypes = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}
    specs = {spec.name: spec for spec in (*contract.inputs, *contract.outputs)}
    profile = {point: contract.input_shapes(point) for point in ("min", "opt", "max")}

    class Context:
        count = 0

        def __init__(self):
            self.id, Context.count = Context.count, Context.count + 1
            self.shapes, self.addresses, self.captured = {}, {}, False
            calls.append(("create_context", self.id, cuda.current_device))

        def set_input_shape(self, name, shape):
            assert not self.captured, f"context {self.id} rebound after a graph captured it"
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            assert not self.captured, f"context {self.id} rebound after a graph captured it"
            self.addresses[name] = address

        def get_tensor_shape(self, name):
            return self.shapes[contract.input_names[0]]  # the UNet's noise_pred has the sample's shape

        def execute_async_v3(self, stream_handle):
            assert set(self.addresses) == set(specs) and set(self.shapes) == set(contract.input_names)
            calls.append(("execute", self.id, cuda.capturing, dict(self.addresses), cuda.current_device))
            self.captured |= cuda.capturing
            return True

    class Engine:
        num_io_tensors = len(specs)

        def get_tensor_name(self, index):
            return list(specs)[index]

        def get_tensor_mode(self, name):
            return "INPUT" if name in contract.input_names else "OUTPUT"

        def get_tensor_dtype(self, name):
            return dtypes[specs[name].dtype]

        def get_tensor_profile_shape(self, name, index):
            return tuple(profile[point][name] for point in ("min", "opt", "max"))

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            calls.append(("deserialize", cuda.current_device))
            return Engine()

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            pass

    return SimpleNamespace(__version__="10.3.0", Runtime=Runtime, Logger=Logger,
                           DataType=SimpleNamespace(**{name: name for name in dtypes.values()}, INT8="INT8", BOOL="BOOL"),
                           TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))


def unet_inputs(contract, batch: int, side: int) -> dict[str, torch.Tensor]:
    shapes = contract.input_shapes({"batch": batch, "latent_height": side, "latent_width": side})
    return {name: torch.randn(shape) for name, shape in shapes.items()}


def test_cuda_graphs_warm_up_then_capture_on_a_context_per_shape(monkeypatch, tmp_path):
    """cuda_graph=True, issue 18: before a capture, one run with the same bindings and a synchronize (trtexec, NVIDIA's
    demo/Diffusion); each captured shape on its own execution context, never rebound, so switching shapes and
    back replays each graph on the bindings it captured."""
    from vilex.backends.tensorrt import Engine

    calls = []
    cuda = FakeCuda(monkeypatch, calls)
    contract = unet_contract()
    trt = fake_tensorrt(contract, cuda)
    (tmp_path / "unet.plan").write_bytes(b"stand-in")
    engine = Engine(trt, tmp_path / "unet.plan", contract, torch.device("cpu"), cuda_graph=True)
    engine.load(trt.Runtime(None))
    engine.activate()
    small, large = unet_inputs(contract, 1, 16), unet_inputs(contract, 2, 32)
    events = []
    for inputs in (small, small, small, large, large, small, large):
        del calls[:]
        outputs = engine.infer(inputs, cuda.Stream())
        assert outputs["noise_pred"].shape == inputs["sample"].shape
        events.append([call[:3] for call in calls])
        warm_ups = [call[3] for call in calls if call[0] == "execute"]
        if len(warm_ups) == 2:  # a capture: the run before it had the very bindings it captured
            assert warm_ups[0] == warm_ups[1]

    capture = lambda context, graph: [("create_context", context, 0), ("execute", context, False),  # noqa: E731
                                      ("synchronize",), ("capture_begin", graph), ("execute", context, True),
                                      ("capture_end", graph), ("replay", graph)]
    assert events == [
        [("execute", 0, False)],  # small, first call: the engine's first context, no graph
        capture(1, 1),  # small again: context 1, warmed up, captured into graph 1
        [("replay", 1)],
        [("execute", 0, False)],  # large, first call: context 0 rebound, which no graph holds
        capture(2, 2),  # large again: its own context and graph
        [("replay", 1)],  # back to small: graph 1 on context 1, untouched since its capture
        [("replay", 2)],
    ]
    assert {key: graph[1].id for key, graph in engine.graphs.items()} == {
        tuple((n, tuple(t.shape)) for n, t in sorted(small.items())): 1,
        tuple((n, tuple(t.shape)) for n, t in sorted(large.items())): 2}


def test_device_id_is_current_for_every_tensorrt_call(monkeypatch, tmp_path):
    """TensorRTBackend(device_id=1), issue 18: TensorRT deserializes, creates contexts and enqueues on CUDA's current
    device, so GPU 1 must be current at each of those calls (torch leaves GPU 0 current)."""
    from vilex.backends.tensorrt import TensorRTBackend

    calls = []
    cuda = FakeCuda(monkeypatch, calls)
    contract = unet_contract()
    trt = fake_tensorrt(contract, cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / engine_file_name("unet", "fp16", "10.3.0", "90")).write_bytes(b"stand-in")
    folder = EngineFolder(tmp_path, {"graphs": {"unet": {"contract": contract.to_dict()}}, "dims": TINY_DIMS})
    backend = TensorRTBackend(folder, cuda_graph=True, device_id=1)
    # the sizes generate() checks height and width against: the export's own bounds, as onnxruntime's
    options = ExportOptions(max_batch=2).resolved(ModelDims(**TINY_DIMS))  # what the export's manifest records
    assert backend.side_range("height") == backend.side_range("width") == (options.min_size, options.max_size)
    # No CUDA here: the tensors stay on the CPU (their device is not what TensorRT sees); the fakes record the
    # device that is current at each TensorRT call.
    backend.device = backend.engines["unet"].device = torch.device("cpu")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None, raising=False)
    inputs = unet_inputs(contract, 2, 16)
    for _ in range(3):  # a plain run, a capture, a replay
        assert backend.run("unet", inputs).shape == inputs["sample"].shape
    tensorrt_calls = [call for call in calls if call[0] in ("deserialize", "create_context", "execute")]
    assert [call[-1] for call in tensorrt_calls] == [1] * len(tensorrt_calls), tensorrt_calls  # GPU 1 at each
    # deserialize, the first context, a plain run; the capture's own context, its warm-up and its capture
    assert [call[0] for call in tensorrt_calls] == ["deserialize", "create_context", "execute", "create_context",
                                                    "execute", "execute"]


# ---- building and running (TensorRT and a GPU) ----------------------------------------------------------------
@pytest.mark.tensorrt
@needs_tensorrt
def test_build_engines_then_skip_when_up_to_date(folder):
    from vilex.export.tensorrt_build import build_engines

    messages = []
    builds = build_engines(folder, fp16=False, log=messages.append)
    assert all((folder.root / b.engine).is_file() for b in builds)
    assert EngineFolder.open(folder.root).verify() == []
    messages.clear()
    build_engines(EngineFolder.open(folder.root), fp16=False, log=messages.append)
    assert sum("is up to date" in m for m in messages) == 4


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_stages_match_onnxruntime(folder, cuda_graph):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.backends.tensorrt import TensorRTBackend
    from vilex.export.tensorrt_build import build_engines
    from vilex.export.validate import sample_inputs, validation_cases

    build_engines(folder, fp16=False, log=lambda *_: None)
    trt_backend = TensorRTBackend(folder, cuda_graph=cuda_graph)
    ort_backend = OnnxRuntimeBackend(folder, providers=["cpu"])
    generator = torch.Generator().manual_seed(0)
    for graph in folder.graph_names:
        contract = folder.contract(graph)
        for sizes in validation_cases(contract):
            inputs = sample_inputs(contract, sizes, generator)
            expected = ort_backend(graph, **inputs)
            for _ in range(3):  # with cuda_graph: plain run, capture, replay
                got = trt_backend(graph, **inputs)
                assert got.device.type == "cpu" and got.shape == expected.shape
                tolerance = contract.tolerances["fp32"]
                # TF32 may be on for fp32 engines: allow 10x the fp32 tolerance.
                assert float((got - expected).abs().max()) <= 10 * tolerance.allowed(float(expected.abs().max()))
    with pytest.raises(ViLexUsageError, match="outside the engine's profile"):
        trt_backend("vae_decoder", latents=torch.randn(3, 4, 32, 32))


@pytest.mark.tensorrt
@needs_tensorrt
def test_cli_reconstruct_through_tensorrt(folder, trt_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    from vilex.cli import main
    from vilex.samples import sample_paths

    assert main(["build-engines", str(folder.root)]) == 0
    image = str(sample_paths()[0])
    common = ["--steps", "3", "--seed", "0", "--tokens", "8"]
    assert main(["reconstruct", str(trt_ckpt), image, "--out", str(tmp_path / "ort"), *common,
                 "--backend", "onnxruntime", "--engines", str(folder.root)]) == 0
    assert main(["reconstruct", str(trt_ckpt), image, "--out", str(tmp_path / "trt"), *common,
                 "--backend", "tensorrt", "--engines", str(folder.root)]) == 0
    name = Path(image).stem + ".png"
    a = np.asarray(Image.open(tmp_path / "ort" / name), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "trt" / name), dtype=np.int16)
    assert np.abs(a - b).max() <= 3  # fp32 engines (TF32 allowed): a few levels at most after 3 steps


def test_manifest_tensorrt_section_is_json_serializable(folder):
    builds = plan_builds(folder, True, "10.3.0", "90")
    (folder.root / "tensorrt").mkdir()
    for build in builds:
        (folder.root / build.engine).write_bytes(b"x")
    record_engines(folder, builds, "10.3.0", "90", 2.0)
    data = json.loads((folder.root / "manifest.json").read_text())
    assert set(data["tensorrt"]["engines"]) == {Path(b.engine).name for b in builds}
    assert data["tensorrt"]["script"] == SCRIPT
