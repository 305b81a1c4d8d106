"""GPU-ready repositories and the `gpu` extra, checked on a CPU machine.

1. Repositories written for `--platform onnxruntime|tensorrt` (GPU hosts) put every model, graph and
   pipeline alike, on KIND_GPU; python-ort (the CPU server) stays KIND_CPU. Read back from the written
   config.pbtxt with Triton's own ModelConfig protobuf (tritonclient's model_config_pb2).
2. What a pipeline-model instance does with that: Triton hands initialize() the instance kind and device
   (`model_instance_kind`, `model_instance_device_id`, as python_backend documents them), the instance picks
   its device from them, and its BLS requests ask for the graph models' outputs in that memory
   (`preferred_memory`). The GPU path itself cannot run here; the CPU path runs end to end through the same
   DLPack calls, against an onnxruntime session of the repository's own graph.
3. pyproject.toml: onnxruntime and onnxruntime-gpu install the same module, so no extra may bring both, and the
   GPU host's extras bring neither onnxruntime nor anything that pulls it in.

No server is started: this file is fast (the tiny export is shared with the other test modules).
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vilex.serving.interface import PIPELINE_MODELS

ROOT = Path(__file__).resolve().parents[1]
GRAPH_MODELS = ("vilex_encoder", "text_encoder", "unet", "vae_decoder")
# What issue 12 asks for, per platform: the CPU server runs on the CPU, the two GPU-host platforms on the GPU.
EXPECTED_KIND = {"python-ort": "KIND_CPU", "onnxruntime": "KIND_GPU", "tensorrt": "KIND_GPU"}


def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def kind_name(group) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)


def with_stand_in_engines(engines: Path, folder: Path) -> Path:
    """A copy of the export whose manifest records TensorRT engines (stand-in files: TensorRT cannot run here)."""
    from vilex.engines.folder import EngineFolder

    copy = Path(shutil.copytree(engines, folder))
    manifest = json.loads((copy / "manifest.json").read_text())
    contracts = EngineFolder.open(copy).contracts()
    (copy / "tensorrt").mkdir()
    manifest["tensorrt"] = {"engines": {}}
    for graph, contract in contracts.items():
        name = f"{graph}.fp16.trt10.3.0.sm90.plan"
        (copy / "tensorrt" / name).write_bytes(b"stand-in")
        manifest["tensorrt"]["engines"][name] = {
            "graph": graph, "file": f"tensorrt/{name}", "precision": "fp16", "built": "2026-01-01T00:00:00+00:00",
            "profile": {"max": {spec.name: list(shape) for spec, shape in
                                zip(contract.inputs, contract.input_shapes("max").values())}}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def repositories(tiny_engines, tmp_path_factory) -> dict[str, Path]:
    """{platform: repository} of the tiny export, 2 instances per graph model and 3 per pipeline model."""
    from vilex.serving.repository import build_repository

    root = tmp_path_factory.mktemp("gpu-configs")
    sources = {"python-ort": tiny_engines, "onnxruntime": tiny_engines,
               "tensorrt": with_stand_in_engines(tiny_engines, root / "engines-trt")}
    return {platform: build_repository(sources[platform], root / platform, platform=platform, max_batch=2,
                                       instances=2, pipeline_instances=3, streaming=True)
            for platform in EXPECTED_KIND}


# ---- 1. instance kinds in the written configs ---------------------------------------------------------------
@pytest.mark.parametrize("platform", list(EXPECTED_KIND))
def test_every_model_runs_where_its_platform_says(repositories, platform):
    repository = repositories[platform]
    assert json.loads((repository / "repository.json").read_text())["platform"] == platform
    for model in (*GRAPH_MODELS, *PIPELINE_MODELS):
        config = parse_config(repository / model / "config.pbtxt")
        # One group each; the counts stay separate (--instances for graphs, --pipeline-instances for pipelines).
        assert [(group.count, kind_name(group)) for group in config.instance_group] == \
            [(3 if model in PIPELINE_MODELS else 2, EXPECTED_KIND[platform])], (platform, model)
        # KIND_GPU without a `gpus` list: `count` instances on every GPU the server sees.
        assert all(not group.gpus for group in config.instance_group), (platform, model)
        if model in PIPELINE_MODELS:
            assert config.backend == "python"
            # The pipeline models read their own inputs with as_numpy(): they must stay in host memory, which is
            # the Python backend's default unless FORCE_CPU_ONLY_INPUT_TENSORS is "no".
            force = config.parameters.get("FORCE_CPU_ONLY_INPUT_TENSORS")
            assert force is None or force.string_value.lower() != "no", (platform, model)


# ---- 2. what an instance does with its kind ------------------------------------------------------------------
def fake_pb_utils():
    """The parts of python_backend's pb_utils that the code under test touches, as NVIDIA's API defines them:
    PreferredMemory(memory_type, device_id) and the TRITONSERVER_MEMORY_* constants (values of tritonserver.h's
    TRITONSERVER_MemoryType: CPU 0, CPU_PINNED 1, GPU 2)."""
    return SimpleNamespace(TRITONSERVER_MEMORY_CPU=0, TRITONSERVER_MEMORY_CPU_PINNED=1, TRITONSERVER_MEMORY_GPU=2,
                           PreferredMemory=lambda memory_type, device_id=0: (memory_type, device_id))


def triton_args(config, repository: Path, model: str, device_id: int) -> dict:
    """What Triton passes to a Python model's initialize() for one instance of `config`'s group: the config as
    JSON (proto field names), and the group's kind as TRITONSERVER_InstanceGroupKindString spells it."""
    from google.protobuf import json_format

    (group,) = config.instance_group
    return {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_instance_kind": kind_name(group).removeprefix("KIND_"),  # "CPU" or "GPU"
            "model_instance_device_id": str(device_id),
            "model_repository": str(repository / model), "model_version": "1", "model_name": model}


@pytest.mark.parametrize("platform", list(EXPECTED_KIND))
@pytest.mark.parametrize("device_id", [0, 1])
def test_pipeline_instances_ask_for_outputs_in_their_own_memory(repositories, platform, device_id):
    from vilex.serving.bls import instance_device, preferred_memory

    pb = fake_pb_utils()
    repository = repositories[platform]
    for model in PIPELINE_MODELS:
        config = parse_config(repository / model / "config.pbtxt")
        device = instance_device(triton_args(config, repository, model, device_id))
        on_gpu = kind_name(config.instance_group[0]) == "KIND_GPU"
        assert device == (torch.device("cuda", device_id) if on_gpu else torch.device("cpu")), (platform, model)
        # The stage outputs come back in the memory the loop's tensors are in: the instance's GPU, or the host.
        assert preferred_memory(pb, device) == ((pb.TRITONSERVER_MEMORY_GPU, device_id) if on_gpu
                                                else (pb.TRITONSERVER_MEMORY_CPU, 0)), (platform, model)


def test_a_cpu_instance_loads_from_its_written_repository(repositories):
    """python-ort: PipelineModel builds from the repository as Triton would start it, and its loop is on the CPU."""
    from vilex.serving.bls import PipelineModel

    repository = repositories["python-ort"]
    config = parse_config(repository / "vilex_generate" / "config.pbtxt")
    model = PipelineModel("vilex_generate", triton_args(config, repository, "vilex_generate", 0), fake_pb_utils())
    assert model.pipeline.backend.device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a host without CUDA")
def test_a_gpu_instance_without_cuda_says_so(repositories):
    from vilex.serving.bls import PipelineModel

    repository = repositories["onnxruntime"]
    config = parse_config(repository / "vilex_generate" / "config.pbtxt")
    with pytest.raises(RuntimeError, match=r"GPU 0 \(instance_group KIND_GPU\).*no CUDA.*--platform python-ort"):
        PipelineModel("vilex_generate", triton_args(config, repository, "vilex_generate", 0), fake_pb_utils())


def test_tensorrt_loop_sends_every_unet_step_to_the_engine(repositories, tiny_engines, tmp_path):
    """--platform tensorrt, issue 18: the loop models run the UNet as the `unet` model (the TensorRT engine), not in
    an onnxruntime session of their own; `--unet local` is refused there with the reason."""
    from vilex.errors import ViLexUsageError
    from vilex.serving.bls import LocalUNetBackend, PipelineModel, TritonStageBackend
    from vilex.serving.repository import build_repository

    repository = repositories["tensorrt"]  # written without --unet: the platform's default
    assert json.loads((repository / "repository.json").read_text())["unet"] == "bls"
    for model in PIPELINE_MODELS:
        config = parse_config(repository / model / "config.pbtxt")
        assert config.parameters["unet"].string_value == "bls", model
        assert not list((repository / model / "1" / "engine").rglob("*.onnx")), model  # no graph to run locally
    # The model as Triton starts it (on a CPU instance: no GPU here) sends the UNet, like every stage, by BLS.
    config = parse_config(repository / "vilex_generate" / "config.pbtxt")
    args = {**triton_args(config, repository, "vilex_generate", 0), "model_instance_kind": "CPU"}
    backend = PipelineModel("vilex_generate", args, fake_pb_utils()).pipeline.backend
    assert isinstance(backend, TritonStageBackend) and not isinstance(backend, LocalUNetBackend)

    source = with_stand_in_engines(tiny_engines, tmp_path / "engines")
    with pytest.raises(ViLexUsageError, match=r"--unet local cannot be used with --platform tensorrt.*--unet bls"):
        build_repository(source, tmp_path / "repo", platform="tensorrt", unet="local")
    assert not (tmp_path / "repo").exists()
    # The other platforms keep local as their default.
    assert json.loads((repositories["onnxruntime"] / "repository.json").read_text())["unet"] == "local"


class RecordingBLS:
    """pb_utils for TritonStageBackend.run on the CPU, following python_backend's documented behavior: Tensor.
    from_dlpack takes an object with __dlpack__/__dlpack_device__ and, for host memory, calls __dlpack__(stream=None)
    (pb_tensor.cc); InferenceRequest(...).exec() is answered the way Triton would, by checking each input against
    the graph model's config.pbtxt (dtype, dims, then its `reshape`) and running the model's ONNX graph in an
    onnxruntime session; output tensors give to_dlpack() and is_cpu()."""

    def __init__(self, repository: Path):
        import onnxruntime as ort
        from tritonclient.grpc import model_config_pb2

        self.pb = model_config_pb2
        self.repository = repository
        self.sessions = {}
        self.ort = ort
        self.requests = []  # (model_name, {input: array as sent}, preferred_memory)
        self.outputs = []  # the arrays handed back, to check the caller does not keep a view of them
        pb = fake_pb_utils()
        self.TRITONSERVER_MEMORY_CPU, self.TRITONSERVER_MEMORY_GPU = pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_MEMORY_GPU
        self.PreferredMemory = pb.PreferredMemory
        outer = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self.array = name, array

            @staticmethod
            def from_dlpack(name, value):
                assert hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__")
                assert value.__dlpack_device__()[0] == 1  # kDLCPU: this fake only does host memory
                return Tensor(name, torch.from_dlpack(value.__dlpack__(stream=None)).numpy())

            def name(self):
                return self._name

            def is_cpu(self):
                return True

            def to_dlpack(self):
                return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.array))

        class Response:
            def __init__(self, tensors):
                self.tensors = tensors

            def has_error(self):
                return False

            def output_tensors(self):
                return self.tensors

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names, timeout=0, preferred_memory=None):
                self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names
                self.preferred_memory = preferred_memory

            def exec(self):
                return outer.answer(self, Response, Tensor)

        self.Tensor, self.InferenceRequest = Tensor, InferenceRequest

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    def answer(self, request, response_type, tensor_type):
        from google.protobuf import text_format

        config = text_format.Parse((self.repository / request.model_name / "config.pbtxt").read_text(),
                                   self.pb.ModelConfig())
        sent = {tensor.name(): tensor.array for tensor in request.inputs}
        self.requests.append((request.model_name, sent, request.preferred_memory))
        feed = {}
        for declared in config.input:
            array = sent[declared.name]
            dtype = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16,
                     "TYPE_INT32": np.int32}[self.pb.DataType.Name(declared.data_type)]
            assert array.dtype == dtype, declared.name
            assert array.ndim == 1 + len(declared.dims) and all(
                d in (-1, s) for d, s in zip(declared.dims, array.shape[1:])), (declared.name, array.shape)
            if declared.HasField("reshape"):
                array = array.reshape(array.shape[0], *declared.reshape.shape)
            feed[declared.name] = array
        if request.model_name not in self.sessions:
            self.sessions[request.model_name] = self.ort.InferenceSession(
                str(self.repository / request.model_name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        arrays = self.sessions[request.model_name].run(request.outputs, feed)
        self.outputs.extend(arrays)
        return response_type([tensor_type(name, array) for name, array in zip(request.outputs, arrays)])


def test_cpu_stage_tensors_cross_by_dlpack(repositories, tiny_engines):
    """The UNet step through TritonStageBackend on the CPU: sent as DLPack, accepted by the config's dtypes and
    dims, outputs asked for in host memory, and the result equals the graph run directly on the same inputs."""
    import onnxruntime as ort

    from vilex.engines.folder import EngineFolder
    from vilex.serving.bls import TritonStageBackend

    repository = repositories["python-ort"]
    contracts = EngineFolder.open(tiny_engines).contracts()
    bls = RecordingBLS(repository)
    backend = TritonStageBackend(bls, contracts, timeout_s=10.0)
    generator = torch.Generator().manual_seed(0)
    shapes = contracts["unet"].input_shapes("opt")  # {input: (batch, ...)}
    inputs = {spec.name: torch.randn(shapes[spec.name], generator=generator).to(getattr(torch, spec.dtype))
              for spec in contracts["unet"].inputs}
    output = backend.run("unet", inputs)

    ((model, sent, memory),) = bls.requests
    assert model == "unet" and memory == (bls.TRITONSERVER_MEMORY_CPU, 0)
    batch = next(iter(shapes.values()))[0]
    assert sent["timestep"].shape == (batch, 1)  # dims [1]; the config's reshape makes it (batch,)
    session = ort.InferenceSession(str(repository / "unet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {name: value.numpy() for name, value in inputs.items()}
    (expected,) = session.run([contracts["unet"].output_names[0]], feed)
    assert output.device == torch.device("cpu") and output.dtype == torch.float32
    assert np.array_equal(output.numpy(), expected)
    # The result is a copy, not a view of the response's memory (which Triton frees with the response).
    bls.outputs[0][...] = 0
    assert np.array_equal(output.numpy(), expected)


# ---- 3. pyproject.toml: one onnxruntime per install ----------------------------------------------------------
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}  # both install the module `onnxruntime`


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared_requirements(extras: set[str]) -> list:
    """vilex's base dependencies plus `extras`, self-references (`vilex[serve]`) expanded, from pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    meta = project()
    optional = {canonicalize_name(name): reqs for name, reqs in meta["optional-dependencies"].items()}
    found, seen, todo = [], set(), [canonicalize_name(e) for e in extras]
    for text in meta["dependencies"]:
        found.append(Requirement(text))
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"vilex has no extra {extra!r}"
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "vilex":
                todo.extend(canonicalize_name(e) for e in requirement.extras)
            else:
                found.append(requirement)
    return found


def installed_closure(requirements: list) -> set[str]:
    """Names of `requirements` and, for those installed here, of everything their metadata requires, with their
    extras' markers evaluated: what pip would bring besides what vilex names itself (packages not installed here,
    such as onnxruntime-gpu or tensorrt, count by name only)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    names, seen, todo = set(), set(), list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra})
                                           for extra in {"", *requirement.extras}):
                todo.append(child)
    return names


def test_no_extra_installs_both_onnxruntime_builds():
    extras = set(project()["optional-dependencies"])
    closures = {extra: installed_closure(declared_requirements({extra})) for extra in extras}
    for extra, names in sorted(closures.items()):
        assert not RUNTIMES <= names, f"vilex[{extra}] would install both {sorted(RUNTIMES)}"
    # Which runtime each install brings: the CPU one with cpu/all, the GPU one with gpu/all-gpu, else none.
    runtime = {extra: RUNTIMES & names for extra, names in closures.items()}
    assert runtime == {extra: ({"onnxruntime"} if extra in ("cpu", "all") else
                               {"onnxruntime-gpu"} if extra in ("gpu", "all-gpu") else set()) for extra in extras}


def test_the_gpu_host_install_is_the_cpu_one_with_the_other_runtime():
    """all-gpu brings what all brings, with onnxruntime-gpu in place of onnxruntime (and neither TensorRT)."""
    def names(extras):
        from packaging.utils import canonicalize_name
        return {canonicalize_name(r.name) for r in declared_requirements(extras)}

    assert names({"all-gpu"}) == names({"all"}) - {"onnxruntime"} | {"onnxruntime-gpu"}
    assert names({"gpu"}) - names(set()) == {"onnxruntime-gpu"}
    assert "tensorrt" not in names({"all"}) | names({"all-gpu"})  # not installable without NVIDIA's index


def test_the_ci_install_line_still_brings_what_the_tests_use():
    """.ci/run's `pip install -e ".[...]"` resolves to at least what it did when `export` carried onnxruntime."""
    lines = re.findall(r'pip install[^\n]*-e\s+"\.\[([^\]]+)\]"', (ROOT / ".ci" / "run").read_text())
    assert lines == ["all"], lines
    installed = {r.name.lower() for r in declared_requirements(set(lines[0].split(",")))}
    before = {"torch", "diffusers", "transformers", "safetensors", "numpy", "pillow", "tqdm", "torchmetrics",
              "onnx", "onnxruntime", "onnxscript", "tritonclient", "nvidia-pytriton", "psutil", "accelerate",
              "matplotlib", "pytest", "pytest-timeout", "polygraphy", "onnx-graphsurgeon"}
    assert before <= installed, before - installed
