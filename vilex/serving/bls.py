"""What runs inside the pipeline models' Python-backend processes (their model.py files stay thin).

`TritonStageBackend` is a StageBackend whose stages are other models of the same server, called through
BLS (`pb_utils.InferenceRequest(...).exec()`, with a timeout, `has_error()` checked). With
`vilex triton-repo --unet local`, `LocalUNetBackend` runs the UNet in the pipeline model's own process
instead (one onnxruntime session) and sends the other stages by BLS. The pipeline built
on it by `pipeline_from_engines` is the ordinary `ViLexPipeline`: the denoising loop is the one in
vilex/pipeline.py, only where a stage runs differs.

`PipelineModel` is the body of `vilex_tokenize`, `vilex_generate` and `vilex_reconstruct`: it parses
the model config in `__init__` (called from `initialize`) and returns exactly one response per request,
a per-request `TritonError` where the request was wrong (INVALID_ARG: HTTP 400 naming the input) or
where running it failed (INTERNAL). Requests that Triton batched together run as one pipeline call per
group of equal settings; each image has its own noise generator (`seeded_generators`, the rule every
backend keeps), so its result does not depend on which requests it was batched with. (The rows of one
group may still differ in prompt: a row without one gets the ViLex-only states, exactly as when alone.)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vilex.backends.base import StageBackend
from vilex.errors import ViLexUsageError
from vilex.pipeline import seeded_generators

from .config import LOOP_MODELS, triton_dims
from .interface import pipeline_models
from .pipeline_requests import Limits, PipelineRequest, parse_request


class StageError(RuntimeError):
    """A graph model failed or timed out on the server."""


class TritonStageBackend(StageBackend):
    """Runs each stage as a BLS request to the graph model of the same name.

    pb_utils: the `triton_python_backend_utils` module (passed in: it exists only inside the stub).
    device: where the denoising loop keeps its tensors, the instance's own (`instance_device`).
    Outputs come back on the device the inputs came from, as with the other backends. Tensors cross by
    DLPack both ways (`pb_utils.Tensor.from_dlpack`, `Tensor.to_dlpack`), and the request's
    `preferred_memory` asks Triton for the outputs on that same device: on a GPU instance the latents and
    prompt states stay in device memory from one step to the next, with no host round trip.
    """

    name = "triton-bls"

    def __init__(self, pb_utils, contracts: dict, timeout_s: float, device: torch.device = torch.device("cpu")):
        self.pb_utils = pb_utils
        self.contracts = contracts
        self.timeout_us = int(timeout_s * 1e6)
        self.device = torch.device(device)

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pb = self.pb_utils
        contract = self.contracts[stage]
        device = next(iter(inputs.values())).device
        tensors = []
        for spec in contract.inputs:
            value = inputs[spec.name].detach().to(getattr(torch, spec.dtype)).contiguous()
            dims, reshape = triton_dims(spec)
            if reshape is not None:  # e.g. timestep (B,) is declared dims [1]: send (B, 1)
                value = value.reshape(value.shape[0], *dims)
            tensors.append(self._to_triton(spec.name, value))
        output_name = contract.output_names[0]
        request = pb.InferenceRequest(model_name=stage, inputs=tensors, requested_output_names=[output_name],
                                      timeout=self.timeout_us, preferred_memory=preferred_memory(pb, device))
        response = request.exec()
        if response.has_error():
            raise StageError(f"stage '{stage}' failed on the server: {response.error().message()}")
        output = pb.get_output_tensor_by_name(response, output_name)
        if output is None:
            raise StageError(f"stage '{stage}' returned no '{output_name}'")
        return self._to_torch(output).to(device)

    def _to_triton(self, name: str, value: torch.Tensor):
        # The torch tensor itself, not a capsule: the stub then calls its __dlpack__ with the stub's own CUDA
        # stream and synchronizes on it, so work torch queued on the tensor is finished before Triton reads it
        # (a bare to_dlpack() capsule carries no stream). On the CPU this is a view of the same memory.
        return self.pb_utils.Tensor.from_dlpack(name, value)

    @staticmethod
    def _to_torch(tensor) -> torch.Tensor:
        # A view of the output where Triton put it (preferred_memory: the caller's device), copied once on that
        # device: the view alone would keep the response's shared-memory or CUDA-pool block allocated for as long
        # as the torch tensor lives (prompt states live for the whole loop).
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).clone()


def instance_device(args: dict) -> torch.device:
    """The device of this model instance, from what Triton passes to initialize(): model_instance_kind "GPU"
    (instance_group KIND_GPU: `--platform onnxruntime|tensorrt`) with model_instance_device_id, else the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return torch.device("cuda", int(args.get("model_instance_device_id", 0)))
    return torch.device("cpu")


def preferred_memory(pb_utils, device: torch.device):
    """A BLS request's `preferred_memory`: where Triton is to put the graph model's outputs. On the device the
    inputs came from, so a GPU loop gets device memory back (and a CPU loop host memory) with no extra copy."""
    if device.type == "cuda":
        return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


class LocalUNetBackend(StageBackend):
    """The UNet in this process, every other stage through BLS (`vilex triton-repo --unet local`).

    The denoising loop calls the UNet once per step; here that call is an onnxruntime session in the
    pipeline model's own process (on the GPU, with IO binding, where onnxruntime has CUDA), so a step costs
    no inter-process hop, no host copy of the latents and no graph-model queue. The per-request stages
    (`vilex_encoder`, `text_encoder`, `vae_decoder`) still go to their graph models. Never on `--platform
    tensorrt`, whose UNet is the engine: there every step is a BLS request (config.Platform says why)."""

    name = "triton-bls+local-unet"

    def __init__(self, bls: TritonStageBackend, unet: StageBackend, pb_utils=None, model: str = ""):
        self.bls, self.unet = bls, unet
        self.device = unet.device  # the loop keeps its tensors where the UNet runs
        # The UNet's own run time on the metrics port, as `vilex_local_unet_duration_us{model=...}` and
        # `vilex_local_unet_runs{model=...}` (Python-backend custom metrics): a graph model's compute time is in
        # the server's statistics, and this UNet has no model of its own, so serving overhead per step (the
        # pipeline's time less the stages' own runs) stays measurable (benchmarks/triton.py).
        self._duration = self._runs = None
        if pb_utils is not None and hasattr(pb_utils, "MetricFamily"):
            labels = {"model": model}
            # A family must outlive its metrics (Triton refuses to count into a deleted family): both are kept.
            self._families = (
                pb_utils.MetricFamily(name="vilex_local_unet_duration_us", kind=pb_utils.MetricFamily.COUNTER,
                                      description="microseconds spent in the local UNet's runs"),
                pb_utils.MetricFamily(name="vilex_local_unet_runs", kind=pb_utils.MetricFamily.COUNTER,
                                      description="runs of the local UNet (one per denoising step)"))
            self._duration, self._runs = (family.Metric(labels=labels) for family in self._families)

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if stage != "unet":
            return self.bls.run(stage, inputs)
        start = time.perf_counter_ns()
        output = self.unet.run(stage, inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the run's end, not its launch
        if self._duration is not None:
            self._duration.increment((time.perf_counter_ns() - start) / 1000)
            self._runs.increment(1)
        return output


def local_unet(folder, contract, device_id: int = 0, variant: str = "onnx") -> StageBackend:
    """An onnxruntime backend for the export's UNet graph in `folder` (a pipeline model's engine/), warmed up
    once at the contract's opt shapes, as the graph models are by their config's model_warmup. device_id: the
    instance's GPU, where onnxruntime has CUDA. variant: the one `vilex triton-repo` copied there (the `unet`
    graph model's: an int8 export's integer-kernel `ort/` UNet on CPU)."""
    import onnxruntime as ort

    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.folder import EngineFolder

    # A folder whose manifest lists the UNet alone: the other graphs are not in the engine folder.
    manifest = {**folder.manifest, "graphs": {"unet": folder.manifest["graphs"]["unet"]}}
    options = ort.SessionOptions()
    # As in triton_repo/onnxruntime_model.py: other stages run in other processes, and threads spinning
    # idle in this one would take the cores they run on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    backend = OnnxRuntimeBackend(EngineFolder(folder.root, manifest), variant=variant, session_options=options,
                                 device_id=device_id)
    opt = contract.input_shapes("opt")  # {input: shape}
    backend.run("unet", {spec.name: torch.zeros(opt[spec.name], dtype=getattr(torch, spec.dtype))
                         for spec in contract.inputs})
    return backend


class PipelineModel:
    """The logic of one pipeline model. `args` is what Triton passes to `initialize`."""

    def __init__(self, model: str, args: dict, pb_utils):
        from vilex.engines.folder import MANIFEST, EngineFolder
        from vilex.engines.host import pipeline_from_engines

        self.pb_utils = pb_utils
        self.model = model
        # 1. Parameters of config.pbtxt (written by config.pipeline_config)
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        # 2. The export's host files (tokenizer, scheduler, configs, token embeddings), copied into the version folder
        engine_dir = Path(args["model_repository"]) / args["model_version"] / parameters["engine_dir"]
        folder = EngineFolder(engine_dir, json.loads((engine_dir / MANIFEST).read_text()))
        # 3. Where this instance runs: the GPU Triton gave it (KIND_GPU), else the CPU
        device = instance_device(args)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{model}: Triton gave this instance GPU {device.index} (instance_group KIND_GPU), but "
                               f"torch {torch.__version__} in the serving environment has no CUDA; install a CUDA "
                               f"build of torch, or write the repository with --platform python-ort for a CPU server")
        backend = TritonStageBackend(pb_utils, folder.contracts(), float(parameters["stage_timeout_seconds"]), device)
        if parameters.get("unet", "bls") == "local" and model in LOOP_MODELS:
            unet = local_unet(folder, folder.contract("unet"), device.index or 0,
                              variant=parameters.get("unet_variant", "onnx"))
            backend = LocalUNetBackend(backend, unet, pb_utils, model)
        self.pipeline = pipeline_from_engines(folder, backend=backend)
        self.pipeline.set_progress_bar_config(disable=True)
        dims = folder.dims
        self.limits = Limits.from_export(dims, folder.contracts()["unet"], max_steps=int(parameters["max_steps"]),
                                         default_steps=int(parameters["default_steps"]),
                                         default_guidance=float(parameters["default_guidance"]))
        self.served = pipeline_models(dims.hidden_size, dims.num_queries)[model]

    # ---- one call of execute() ---------------------------------------------------------------------------
    def execute(self, requests: list) -> list:
        pb = self.pb_utils
        responses: list = [None] * len(requests)
        # 1. Check every request on its own: a bad one gets its 400, the others still run.
        checked, refused = self._check(requests, self.model)
        for index, (message, code) in refused.items():
            responses[index] = self._error(message, code)
        # 2. Run them together; a failure is reported to the requests it concerns.
        for index, outcome in self._run(checked).items():
            if isinstance(outcome, Exception):
                code = pb.TritonError.INVALID_ARG if isinstance(outcome, ViLexUsageError) else pb.TritonError.INTERNAL
                responses[index] = self._error(f"{self.model}: {outcome}", code)
            else:
                responses[index] = pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, np.ascontiguousarray(array)) for name, array in outcome.items()])
        return responses

    def _check(self, requests: list, name: str) -> tuple[dict[int, PipelineRequest], dict[int, tuple[str, object]]]:
        """Every request checked on its own: ({index: checked request}, {index: (message, TritonError code)} for
        the refused ones: the caller's mistakes INVALID_ARG, a bug in a check INTERNAL, its message naming `name`)."""
        pb = self.pb_utils
        checked: dict[int, PipelineRequest] = {}
        refused: dict[int, tuple[str, object]] = {}
        for index, request in enumerate(requests):
            try:
                checked[index] = parse_request(self.model, self._inputs(request), self.limits,
                                               self.pipeline.prompt_builder)
            except ViLexUsageError as error:
                refused[index] = (str(error), pb.TritonError.INVALID_ARG)
            except Exception as error:  # noqa: BLE001 - a bug in a check fails its own request, not the batch
                refused[index] = (f"{name}: {type(error).__name__}: {error}", pb.TritonError.INTERNAL)
        return checked, refused

    def _inputs(self, request) -> dict[str, np.ndarray]:
        inputs = {}
        for port in self.served.inputs:
            tensor = self.pb_utils.get_input_tensor_by_name(request, port.name)
            if tensor is not None:
                inputs[port.name] = tensor.as_numpy()
        return inputs

    def _error(self, message: str, code):
        return self.pb_utils.InferenceResponse(error=self.pb_utils.TritonError(message, code))

    def _run(self, checked: dict[int, PipelineRequest], on_step=None) -> dict[int, dict[str, np.ndarray] | Exception]:
        """{request index: {output name: array}, or the exception that stopped that request}.

        on_step (the streaming models', streaming.py): called after every denoising step of a group as
        `on_step(members, step_index, total_steps, latents)`, members the group's (request index, row) in the
        order of the latents' rows; an exception it raises stops that group's loop and is its outcome.

        Exceptions are caught broadly on purpose: whatever fails is reported to the requests it
        concerns as an error response, instead of being raised into Triton (which fails the whole call)."""
        if not checked:
            return {}
        # Images (rows) of all requests, in order, as (request index, row)
        rows = [(index, row) for index, request in checked.items() for row in range(request.n)]
        try:
            if self.model == "vilex_tokenize":
                return self._tokenize(checked, rows)
            if self.model == "vilex_reconstruct":
                all_tokens = self.pipeline.tokenize([checked[i].images[r] for i, r in rows])  # (rows, N, D)
                tokens = {row: all_tokens[j] for j, row in enumerate(rows)}
            else:
                tokens = {(i, r): torch.from_numpy(np.array(checked[i].vilex_tokens[r])) for i, r in rows}
        except Exception as error:  # noqa: BLE001 - see the docstring
            return {index: error for index in checked}

        # Rows whose shared settings are all equal (token count, steps, guidance, text guidance, order, size)
        # run as one generate() call; prompts, negative prompts and seeds are per row (one generator each,
        # so a row's noise does not depend on the others).
        groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for i, r in rows:
            groups[checked[i].shared_settings(r)].append((i, r))
        outcomes: dict[int, dict[str, np.ndarray] | Exception] = {}
        generated: dict[tuple[int, int], np.ndarray] = {}
        for (k, steps, guidance, text_guidance, order, height, width), members in groups.items():
            try:
                images = self.pipeline.generate(
                    torch.stack([tokens[m][:k] for m in members]),  # (b, k, D)
                    prompt=[checked[i].prompts[r] for i, r in members],
                    negative_prompt=[checked[i].negative_prompts[r] for i, r in members],
                    num_inference_steps=steps, guidance_scale=guidance, text_guidance_scale=text_guidance,
                    order=order, height=height, width=width,
                    generator=seeded_generators([checked[i].seeds[r] for i, r in members]),
                    output_type="pil", progress=False,
                    callback_on_step_end=None if on_step is None else _step_callback(on_step, members)).images
            except Exception as error:  # noqa: BLE001 - see the docstring
                for i, _ in members:
                    outcomes.setdefault(i, error)
                continue
            for member, image in zip(members, images):
                generated[member] = np.asarray(image, dtype=np.uint8)  # (H, W, 3), as a PNG would hold it
        for i, request in checked.items():
            if i not in outcomes:
                outcomes[i] = {"IMAGE": np.stack([generated[(i, r)] for r in range(request.n)])}  # (n, H, W, 3)
        return outcomes

    def _tokenize(self, checked: dict[int, PipelineRequest], rows: list[tuple[int, int]]) -> dict[int, dict[str, np.ndarray]]:
        all_tokens = self.pipeline.tokenize([checked[i].images[r] for i, r in rows]).numpy()  # (rows, N, D)
        outputs, start = {}, 0
        for index, request in checked.items():
            k = request.num_tokens[0]  # one k per request (checked)
            outputs[index] = {"VILEX_TOKENS": all_tokens[start:start + request.n, :k]}  # (n, k, D)
            start += request.n
        return outputs


def _step_callback(on_step, members: list[tuple[int, int]]):
    """The pipeline's callback_on_step_end for one group: on_step(members, step index, total steps, latents)."""
    def callback(pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        on_step(members, step_index, len(pipeline.scheduler.timesteps), callback_kwargs["latents"])
        return callback_kwargs

    return callback
