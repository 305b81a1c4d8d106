"""A client for the served pipeline models, over HTTP or gRPC through tritonclient.

    client = TritonClient("localhost:8000")                         # or ("localhost:8001", "grpc")
    tokens = client.tokenize([open("cat.png", "rb").read()], num_tokens=16)    # (1, 16, D) float32
    images = client.generate(tokens, prompt="a watercolor", seed=0)           # (1, H, W, 3) uint8
    images = client.reconstruct([pil_image], steps=25, seed=0)               # raw pixels travel as IMAGE_RGB
    images = client.generate(tokens, prompt="a watercolor", text_guidance=3.0, negative_prompt="blurry",
                             order="text_first")                 # height=, width=: within the export's bounds

    client = TritonClient("localhost:8001", "grpc")                  # streaming: gRPC only
    with client.generate_stream(tokens, steps=25, seed=0, preview_every=5) as events:
        for event in events:                                          # leaving the block early cancels
            print(event.step, event.total_steps)                      # 1, 25 ... 25, 25; then the image
            if event.images is not None:
                images = event.images                                 # the same as generate(...) returns

Every option of `generate` and `reconstruct` is one of the pipeline models' GENERATION_OPTIONS
(interface.py), sent as an (n, 1) input for the n images of the request; None leaves it out, and the
server's default applies.

One `TritonClient` holds one tritonclient connection, which must not be shared between threads
(tritonclient's HTTP client runs on gevent and fails with "Cannot switch to a different thread"):
`map_concurrently` gives every worker thread its own.

`generate_stream` and `reconstruct_stream` send one request to the streaming model (`vilex_generate_stream`,
`vilex_reconstruct_stream`) over a gRPC stream and yield a `StreamEvent` per denoising step, then one with
the images. Closing the stream early (`close()`, or leaving its `with` block) cancels the request: the gRPC stream is
closed with `stop_stream(cancel_requests=True)` and the server stops at its next step.

Errors: a 400 (gRPC INVALID_ARGUMENT) from the server is a `ServedRequestError`, a ViLexUsageError with
the server's message, which names the input; no server at --url, or a port of the other protocol (HTTP sent
to the gRPC port, or the reverse), is a ViLexUsageError naming --url and the --protocol such a port needs; any
other failure is a `ServingError`. On a stream (which carries messages without status codes) a streaming
model's INVALID_ARG is still a ServedRequestError (its message says so, interface.STREAM_INVALID_ARG_PREFIX);
Triton's own dtype and shape checks come as a ServingError with Triton's message, which names the input.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import PIL.Image

from vilex.errors import ViLexUsageError

from .interface import PER_IMAGE_PORTS, PIPELINE_OUTPUTS, STREAM_INVALID_ARG_PREFIX

PROTOCOLS = ("http", "grpc")


class ServingError(RuntimeError):
    """The server failed a request (not the caller's mistake), or answered something unexpected."""


class ServedRequestError(ViLexUsageError):
    """The server rejected a request as invalid (HTTP 400 / gRPC INVALID_ARGUMENT); the message names the input."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status  # "400" over HTTP, "StatusCode.INVALID_ARGUMENT" over gRPC, "INVALID_ARG" on a stream


Image = bytes | np.ndarray | PIL.Image.Image


@dataclass(frozen=True)
class StreamEvent:
    """One response of a streaming model: progress after `step` of `total_steps` denoising steps, or (the last
    event, step == total_steps) the result."""

    step: int  # denoising steps done, 1..total_steps
    total_steps: int
    preview: np.ndarray | None = None  # (n, H, W, 3) uint8: the current latents decoded, every preview_every steps
    images: np.ndarray | None = None  # (n, H, W, 3) uint8: the result, on the last event only


class TritonClient:
    """One connection to a server running the vilex model repository (not thread-safe: one per thread)."""

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0, headers: dict | None = None):
        if protocol not in PROTOCOLS:
            raise ViLexUsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if "://" in url:
            raise ViLexUsageError(f"--url must be HOST:PORT without a scheme, got {url!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.headers = headers
        if protocol == "http":
            import tritonclient.http as module

            # A generation on CPU can take minutes; the defaults (60 s) would cut it off.
            self._client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(url)
        self._module = module
        self.last_latency_s: float | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- raw requests ----------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One request with these arrays as they are (dtype and shape included); returns the outputs."""
        tensors = self._tensors(inputs)
        names = list(outputs or [PIPELINE_OUTPUTS[model]])
        requested = [self._module.InferRequestedOutput(name) for name in names]
        start = time.perf_counter()
        result = self._call(lambda: self._client.infer(model, tensors, outputs=requested, headers=self.headers,
                                                       **({"client_timeout": self.timeout_s} if self.protocol == "grpc" else {})))
        self.last_latency_s = time.perf_counter() - start
        return {name: result.as_numpy(name) for name in names}

    def stream(self, model: str, inputs: dict[str, np.ndarray]) -> "EventStream":
        """One request to a streaming model over a gRPC stream: an iterator of a StreamEvent per denoising step,
        then one with the images (the server's final flag then ends it). Closing it before that (`close()`, or
        leaving its `with` block) cancels the request on the server."""
        if self.protocol != "grpc":
            raise ViLexUsageError(f"streaming needs --protocol grpc (Triton streams responses over gRPC only), "
                                  f"got --protocol {self.protocol}")
        if not self._call(lambda: self._client.is_model_ready(model, headers=self.headers)):
            raise ViLexUsageError(f"--url {self.url}: the server has no {model} model; streaming needs a repository "
                                  f"written with `vilex triton-repo ENGINES --out DIR --stream`")
        return EventStream(self._stream_events(model, self._tensors(inputs)))

    def _stream_events(self, model: str, tensors: list) -> Iterator[StreamEvent]:
        responses: queue.Queue = queue.Queue()
        self._call(lambda: self._client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                                     headers=self.headers))
        finished = False
        try:
            start = time.perf_counter()
            self._call(lambda: self._client.async_stream_infer(model, tensors, enable_empty_final_response=True))
            step = total = 0
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServingError(f"{self.protocol}://{self.url}: no response from {model} in "
                                       f"{self.timeout_s:g} s") from None
                if error is not None:
                    finished = True  # the server ended this request (its error is its last response)
                    raise self._stream_error(error)
                response = result.get_response()
                if "triton_final_response" in response.parameters and \
                        response.parameters["triton_final_response"].bool_param:
                    finished = True
                    self.last_latency_s = time.perf_counter() - start
                    return
                images = result.as_numpy("IMAGE")
                if images is not None:
                    yield StreamEvent(step, total, images=images)
                    continue
                step, total = int(result.as_numpy("STEP")[0, 0]), int(result.as_numpy("TOTAL_STEPS")[0, 0])
                yield StreamEvent(step, total, preview=result.as_numpy("PREVIEW"))
        finally:
            # Not finished: the caller left early; cancel_requests=True tells the server to stop the request.
            self._client.stop_stream(cancel_requests=not finished)

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list:
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, array in inputs.items():
            array = np.asarray(array)
            tensor = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def _call(self, request: Callable):
        from tritonclient.utils import InferenceServerException

        try:
            return request()
        except InferenceServerException as error:
            raise self._error(error) from None
        except (ConnectionError, OSError) as error:
            raise ViLexUsageError(f"--url {self.url}: no tritonserver answers over {self.protocol} ({error})") from None
        except http.client.HTTPException as error:
            from geventhttpclient.response import HTTPConnectionClosed

            if not isinstance(error, HTTPConnectionClosed):
                # What answered is not HTTP/1.1 (geventhttpclient's HTTPParseError): a gRPC port answers an HTTP
                # request with an HTTP/2 frame ("Expected HTTP/"). The reverse mistake is _error's.
                reason = error.args[0] if error.args else error  # args: (message, offset in the response)
                raise ViLexUsageError(f"--url {self.url}: no tritonserver answers over http (what answers is not "
                                      f"HTTP/1.1: {reason}); a gRPC port needs --protocol grpc") from None
            raise ServingError(f"{self.protocol}://{self.url}: the server closed the connection ({error!r})") from None

    def _stream_error(self, error) -> Exception:
        """The exception for an error response on a stream, which carries its message only (no status code)."""
        message = str(error.message() or "")
        if error.status() is None and message.startswith(STREAM_INVALID_ARG_PREFIX):
            return ServedRequestError(message[len(STREAM_INVALID_ARG_PREFIX):], "INVALID_ARG")
        return self._error(error)

    def _error(self, error) -> Exception:
        """The exception to raise for tritonclient's InferenceServerException `error`."""
        status = str(error.status() or "")
        if status in ("400", "StatusCode.INVALID_ARGUMENT"):
            return ServedRequestError(error.message(), status)
        if status == "StatusCode.UNAVAILABLE" and "connect" in str(error.message()).lower():
            # Something listens but does not speak gRPC: tritonserver's HTTP port closes the connection on gRPC's
            # HTTP/2 preface ("Socket closed"), other HTTP servers answer it ("Failed parsing HTTP/2").
            listening = "connection refused" not in str(error.message()).lower()
            hint = "; if it is an HTTP port, use --protocol http" if listening else ""
            return ViLexUsageError(f"--url {self.url}: no tritonserver answers over {self.protocol} "
                                   f"({error.message()}){hint}")
        return ServingError(f"{self.protocol}://{self.url}: {error.message()} (status {status or 'unknown'})")

    # ---- the pipeline models -----------------------------------------------------------------------------
    def tokenize(self, images: Sequence[Image], num_tokens: int | None = None) -> np.ndarray:
        """Images -> ViLex tokens (n, k, D) float32, in one request."""
        inputs = image_inputs(images)
        inputs.update(per_image_values(len(images), NUM_TOKENS=num_tokens))
        return self.infer("vilex_tokenize", inputs)["VILEX_TOKENS"]

    def generate(self, vilex_tokens: np.ndarray, prompt: str | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None, num_tokens: int | None = None,
                 negative_prompt: str | None = None, text_guidance: float | None = None, order: str | None = None,
                 height: int | None = None, width: int | None = None) -> np.ndarray:
        """ViLex tokens (n, k, D) [+ prompt] -> images (n, H, W, 3) uint8, in one request."""
        return self.infer("vilex_generate", generate_inputs(**_options(locals())))["IMAGE"]

    def reconstruct(self, images: Sequence[Image], num_tokens: int | None = None, prompt: str | None = None,
                    steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                    negative_prompt: str | None = None, text_guidance: float | None = None, order: str | None = None,
                    height: int | None = None, width: int | None = None) -> np.ndarray:
        """Images -> tokens -> images (n, H, W, 3) uint8, in one request."""
        return self.infer("vilex_reconstruct", reconstruct_inputs(**_options(locals())))["IMAGE"]

    def generate_stream(self, vilex_tokens: np.ndarray, prompt: str | None = None, steps: int | None = None,
                        guidance: float | None = None, seed: int | None = None, num_tokens: int | None = None,
                        negative_prompt: str | None = None, text_guidance: float | None = None,
                        order: str | None = None, height: int | None = None, width: int | None = None,
                        preview_every: int | None = None) -> EventStream:
        """generate(), streamed (gRPC): a StreamEvent per step (with a preview every `preview_every` steps), then one
        with the images. Closing the stream early cancels the request on the server."""
        options = _options(locals())
        preview_every = options.pop("preview_every")
        inputs = generate_inputs(**options)
        inputs.update(per_image_values(len(inputs["VILEX_TOKENS"]), PREVIEW_EVERY=preview_every))
        return self.stream("vilex_generate_stream", inputs)

    def reconstruct_stream(self, images: Sequence[Image], num_tokens: int | None = None, prompt: str | None = None,
                           steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                           negative_prompt: str | None = None, text_guidance: float | None = None,
                           order: str | None = None, height: int | None = None, width: int | None = None,
                           preview_every: int | None = None) -> EventStream:
        """reconstruct(), streamed (gRPC): as generate_stream."""
        options = _options(locals())
        preview_every = options.pop("preview_every")
        inputs = reconstruct_inputs(**options)
        inputs.update(per_image_values(len(images), PREVIEW_EVERY=preview_every))
        return self.stream("vilex_reconstruct_stream", inputs)

    # ---- the server ------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self.headers))
        except Exception:  # noqa: BLE001 - any failure to answer means not ready
            return False

    def statistics(self, model: str) -> dict:
        """The server's statistics for `model`: inferences (images or batch items), executions, mean queue
        time per request, mean compute time per execution, executions per batch size.

        Over either protocol the numbers are the same (gRPC's JSON carries 64-bit counts as strings)."""
        if self.protocol == "http":
            stats = self._call(lambda: self._client.get_inference_statistics(model, headers=self.headers))
        else:
            stats = self._call(lambda: self._client.get_inference_statistics(model, headers=self.headers, as_json=True))
        summary = {"inferences": 0, "executions": 0, "queue_ms": 0.0, "compute_ms": 0.0, "batch_sizes": {}}
        queue_ns = queued = compute_ns = 0
        for model_stats in stats["model_stats"]:
            summary["inferences"] += int(model_stats.get("inference_count", 0))
            summary["executions"] += int(model_stats.get("execution_count", 0))
            queue = model_stats.get("inference_stats", {}).get("queue", {})
            queue_ns, queued = queue_ns + int(queue.get("ns", 0)), queued + int(queue.get("count", 0))
            # batch_stats count executions (not requests): compute time per execution, at each batch size.
            for entry in model_stats.get("batch_stats", []):
                size, count = int(entry["batch_size"]), int(entry["compute_infer"]["count"])
                summary["batch_sizes"][size] = summary["batch_sizes"].get(size, 0) + count
                compute_ns += sum(int(entry.get(part, {}).get("ns", 0))
                                  for part in ("compute_input", "compute_infer", "compute_output"))
        if queued:
            summary["queue_ms"] = queue_ns / queued / 1e6  # per request
        executions = sum(summary["batch_sizes"].values())
        if executions:
            summary["compute_ms"] = compute_ns / executions / 1e6  # per execution
        return summary

    def batch_sizes(self, model: str) -> dict[int, int]:
        """{batch size: executions} from the server's statistics for `model`."""
        return self.statistics(model)["batch_sizes"]


class EventStream:
    """The events of one streamed request (TritonClient.stream): iterate it, and close it to cancel the request
    (leaving a `with` block closes it)."""

    def __init__(self, events: Iterator[StreamEvent]):
        self._events = events

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        """Cancel the request if it has not finished (the gRPC stream closes with cancel_requests=True)."""
        self._events.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- building inputs -------------------------------------------------------------------------------------
def _options(arguments: dict) -> dict:
    """A method's arguments (its locals()) without self."""
    return {name: value for name, value in arguments.items() if name != "self"}


def generate_inputs(vilex_tokens, num_tokens=None, prompt=None, negative_prompt=None, steps=None, guidance=None,
                    text_guidance=None, order=None, height=None, width=None, seed=None) -> dict[str, np.ndarray]:
    """The inputs of vilex_generate (and vilex_generate_stream) for tokens (n, k, D) and these options."""
    vilex_tokens = np.ascontiguousarray(vilex_tokens, dtype=np.float32)
    inputs = {"VILEX_TOKENS": vilex_tokens}
    inputs.update(per_image_values(len(vilex_tokens), NUM_TOKENS=num_tokens, PROMPT=prompt,
                                   NEGATIVE_PROMPT=negative_prompt, STEPS=steps, GUIDANCE=guidance,
                                   TEXT_GUIDANCE=text_guidance, ORDER=order, HEIGHT=height, WIDTH=width, SEED=seed))
    return inputs


def reconstruct_inputs(images, num_tokens=None, prompt=None, negative_prompt=None, steps=None, guidance=None,
                       text_guidance=None, order=None, height=None, width=None, seed=None) -> dict[str, np.ndarray]:
    """The inputs of vilex_reconstruct (and vilex_reconstruct_stream) for these images and options."""
    inputs = image_inputs(images)
    inputs.update(per_image_values(len(images), NUM_TOKENS=num_tokens, PROMPT=prompt,
                                   NEGATIVE_PROMPT=negative_prompt, STEPS=steps, GUIDANCE=guidance,
                                   TEXT_GUIDANCE=text_guidance, ORDER=order, HEIGHT=height, WIDTH=width, SEED=seed))
    return inputs


def per_image_values(n: int, **values) -> dict[str, np.ndarray]:
    """(n, 1) arrays for the optional per-image inputs given, in their declared dtypes (None: not sent, the
    server's default applies). Text (TYPE_STRING) travels as UTF-8 bytes."""
    arrays = {}
    for name, value in values.items():
        if value is None:
            continue
        port = PER_IMAGE_PORTS[name]
        if port.triton_dtype == "TYPE_STRING":
            value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        arrays[name] = np.full((n, 1), value, dtype=port.numpy_dtype)
    return arrays


def image_inputs(images: Sequence[Image]) -> dict[str, np.ndarray]:
    """Encoded bytes -> IMAGE (n, 1); PIL images or uint8 (H, W, 3) arrays of one size -> IMAGE_RGB (n, H, W, 3)."""
    if not images:
        raise ViLexUsageError("give at least one image")
    if all(isinstance(image, (bytes, bytearray)) for image in images):
        encoded = np.empty((len(images), 1), dtype=object)
        for i, image in enumerate(images):
            encoded[i, 0] = bytes(image)
        return {"IMAGE": encoded}
    if any(isinstance(image, (bytes, bytearray)) for image in images):
        raise ViLexUsageError("images of one request must be all encoded bytes or all pixels, not a mix")
    pixels = [np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image) for image in images]
    if len({p.shape for p in pixels}) > 1:
        raise ViLexUsageError(f"raw images of one request must have one size, got {sorted({p.shape for p in pixels})}")
    return {"IMAGE_RGB": np.ascontiguousarray(np.stack(pixels), dtype=np.uint8)}


def map_concurrently(url: str, protocol: str, work: Callable, items: Sequence, workers: int,
                     headers: dict | None = None) -> list:
    """[work(client, item) for item in items] on `workers` threads, each thread with its own TritonClient."""
    local = threading.local()
    clients: list[TritonClient] = []
    lock = threading.Lock()

    def run(item):
        if not hasattr(local, "client"):
            local.client = TritonClient(url, protocol, headers=headers)
            with lock:
                clients.append(local.client)
        return work(local.client, item)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(run, items))
    finally:
        for client in clients:
            client.close()
