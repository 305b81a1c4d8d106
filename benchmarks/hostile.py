"""Part 1 of `vilex stress`: malformed requests to every pipeline model, over HTTP and gRPC.

After Triton's L0_input_validation and L0_http_fuzz. Each case is one request and what it must get:

    REJECT    HTTP 400 / gRPC INVALID_ARGUMENT whose message matches `names` (it names the input)
    SERVE     a well-formed request that looks odd (a 1x4096 image, a bomb just at the pixel limit): it must
              be served, and its latency is recorded
    FRONTEND  bytes that never reach a model (broken JSON, a bad Inference-Header-Content-Length, a
              protobuf that does not parse): Triton's own frontend answers; any error status in time
              passes (what it answered is recorded: 2.51 answers several of these with 400, some with 500)

After every case a valid request to the same model over the same protocol must succeed, so a case that
breaks the server fails there even when its own answer looked right.

Cases are data (`tensor_cases`, `raw_http_cases`, `raw_grpc_cases`), built from what the server says it
takes (`Served`), so the same list runs against any checkpoint.
"""

from __future__ import annotations

import http.client
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import hostile_images as images

REJECT, SERVE, FRONTEND = "reject", "serve", "frontend"
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
CASE_TIMEOUT_S = 120.0  # one case (an oversized body takes a few seconds on 2 busy cores)


@dataclass(frozen=True)
class Served:
    """What the pipeline models take, read from the server (see stress.read_served)."""

    hidden_size: int  # D: VILEX_TOKENS are (n, k, D)
    num_queries: int  # N: k is 1..N
    max_batch: int
    max_steps: int
    max_image_pixels: int = 64 * 1024 * 1024
    inputs: dict = field(default_factory=dict)  # {model: {input name: wire dtype}} from the model metadata


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    expect: str  # REJECT, SERVE or FRONTEND
    names: str = ""  # regex the error message must match (REJECT)
    inputs: dict | None = None  # tensor cases: {input name: array}, sent as they are
    send: Callable | None = None  # raw cases: send(host, port, timeout_s) -> (status, message)
    protocols: tuple[str, ...] = ("http", "grpc")
    note: str = ""
    heavy: bool = False  # seconds of server CPU or hundreds of MB: left out by --quick
    unknown: tuple[str, ...] = ()  # inputs sent on purpose although the model does not declare them


# ---- the tensor cases (tritonclient, both protocols) -----------------------------------------------------
def rows(*items: bytes) -> np.ndarray:
    return np.array([[item] for item in items], dtype=object)  # IMAGE / PROMPT: (n, 1) BYTES


def i32(value) -> np.ndarray:
    return np.array([[value]], np.int32)


def f32(value) -> np.ndarray:
    return np.array([[value]], np.float32)


def tensor_cases(served: Served) -> list[Case]:
    D, N, B = served.hidden_size, served.num_queries, served.max_batch
    png = images.line_png(40, 30)
    tokens = np.zeros((1, 4, D), np.float32)
    T, G, R = "vilex_tokenize", "vilex_generate", "vilex_reconstruct"
    nan, inf = float("nan"), float("inf")
    side = int(served.max_image_pixels ** 0.5)  # a square image exactly at the pixel limit
    cases = [
        # 1. dtypes and ranks (Triton checks these against config.pbtxt)
        Case("IMAGE_RGB as FP32", T, REJECT, r"'IMAGE_RGB' data-type is 'FP32'.*expects 'UINT8'",
             {"IMAGE_RGB": np.zeros((1, 8, 8, 3), np.float32)}),
        Case("IMAGE_RGB of rank 3", T, REJECT, r"unexpected shape for input 'IMAGE_RGB'",
             {"IMAGE_RGB": np.zeros((1, 8, 8), np.uint8)}),
        Case("IMAGE_RGB with 4 channels", R, REJECT, r"unexpected shape for input 'IMAGE_RGB'",
             {"IMAGE_RGB": np.zeros((1, 8, 8, 4), np.uint8)}),
        Case("IMAGE as UINT8", T, REJECT, r"'IMAGE' data-type is 'UINT8'.*expects 'BYTES'",
             {"IMAGE": np.zeros((1, 1), np.uint8)}),
        Case("VILEX_TOKENS as FP64", G, REJECT, r"'VILEX_TOKENS' data-type is 'FP64'.*expects 'FP32'",
             {"VILEX_TOKENS": tokens.astype(np.float64)}),
        Case("VILEX_TOKENS of rank 2", G, REJECT, r"unexpected shape for input 'VILEX_TOKENS'",
             {"VILEX_TOKENS": np.zeros((1, D), np.float32)}),
        Case("VILEX_TOKENS one too narrow", G, REJECT, r"unexpected shape for input 'VILEX_TOKENS'",
             {"VILEX_TOKENS": np.zeros((1, 4, D - 1), np.float32)}),
        Case("VILEX_TOKENS twice as wide", G, REJECT, r"unexpected shape for input 'VILEX_TOKENS'",
             {"VILEX_TOKENS": np.zeros((1, 4, 2 * D), np.float32)}),
        Case("NUM_TOKENS as INT64", R, REJECT, r"'NUM_TOKENS' data-type is 'INT64'.*expects 'INT32'",
             {"IMAGE": rows(png), "NUM_TOKENS": np.array([[4]], np.int64)}),
        Case("STEPS as FP32", G, REJECT, r"'STEPS' data-type is 'FP32'.*expects 'INT32'",
             {"VILEX_TOKENS": tokens, "STEPS": f32(2.5)}),
        Case("SEED as INT32", R, REJECT, r"'SEED' data-type is 'INT32'.*expects 'INT64'",
             {"IMAGE": rows(png), "SEED": i32(1)}),
        Case("GUIDANCE as FP64", G, REJECT, r"'GUIDANCE' data-type is 'FP64'.*expects 'FP32'",
             {"VILEX_TOKENS": tokens, "GUIDANCE": np.array([[7.5]], np.float64)}),
        Case("PROMPT as INT32", R, REJECT, r"'PROMPT' data-type is 'INT32'.*expects 'BYTES'",
             {"IMAGE": rows(png), "PROMPT": i32(3)}),
        Case("STEPS of rank 3", R, REJECT, r"unexpected shape for input 'STEPS'",
             {"IMAGE": rows(png), "STEPS": np.array([[[2]]], np.int32)}),
        # 2. missing and unknown inputs
        Case("no image", T, REJECT, r"exactly one of IMAGE .* and IMAGE_RGB", {"NUM_TOKENS": i32(2)}),
        Case("no VILEX_TOKENS", G, REJECT, r"VILEX_TOKENS", {"STEPS": i32(2)}),
        Case("IMAGE and IMAGE_RGB", R, REJECT, r"exactly one of IMAGE .* and IMAGE_RGB",
             {"IMAGE": rows(png), "IMAGE_RGB": np.zeros((1, 8, 8, 3), np.uint8)}),
        Case("unknown input STEPS on tokenize", T, REJECT, r"unexpected inference input 'STEPS'",
             {"IMAGE": rows(png), "STEPS": i32(3)}, unknown=("STEPS",)),
        Case("unknown input STRENGTH", G, REJECT, r"unexpected inference input 'STRENGTH'",
             {"VILEX_TOKENS": tokens, "STRENGTH": f32(0.5)}, unknown=("STRENGTH",)),
        # 3. empty and huge batches
        Case("empty batch of images", T, REJECT, r"input 'IMAGE'", {"IMAGE": np.empty((0, 1), dtype=object)}),
        Case("empty batch of tokens", G, REJECT, r"input 'VILEX_TOKENS'", {"VILEX_TOKENS": np.zeros((0, 4, D), np.float32)}),
        Case(f"batch of {B + 1} (max {B})", R, REJECT, rf"batch-size must be <= {B}", {"IMAGE": rows(*[png] * (B + 1))}),
        Case("batch of 256 tokens", G, REJECT, rf"batch-size must be <= {B}", {"VILEX_TOKENS": np.zeros((256, 4, D), np.float32)}),
        Case("rows differ between inputs", R, REJECT, r"input '\w+' batch size does not match",
             {"IMAGE": rows(png, png), "SEED": np.array([[1]], np.int64)}),
        Case("0 tokens per image", G, REJECT, r"VILEX_TOKENS must have 1\.\.", {"VILEX_TOKENS": np.zeros((1, 0, D), np.float32)}),
        Case(f"{N + 1} tokens per image", G, REJECT, rf"VILEX_TOKENS must have 1\.\.{N} tokens",
             {"VILEX_TOKENS": np.zeros((1, N + 1, D), np.float32)}),
        # 4. NaN, inf and extremes in every numeric input
        *[Case(f"VILEX_TOKENS {label}", G, REJECT, r"VILEX_TOKENS contains NaN or infinite",
               {"VILEX_TOKENS": np.where(np.arange(4 * D).reshape(1, 4, D) == 5, value, 0).astype(np.float32)})
          for label, value in (("one NaN", nan), ("one +inf", inf), ("one -inf", -inf))],
        *numeric_cases(served, {G: {"VILEX_TOKENS": tokens}, R: {"IMAGE": rows(png)}}),
        Case("GUIDANCE above 100", R, REJECT, r"GUIDANCE\[0\] must be in 0\.\.100, got 1\.0+\d*e\+30",
             {"IMAGE": rows(png), "GUIDANCE": f32(1e30)}),
        Case("NUM_TOKENS INT32 min", T, REJECT, r"NUM_TOKENS\[0\] must be in 1\.\.", {"IMAGE": rows(png), "NUM_TOKENS": i32(-2**31)}),
        Case("NUM_TOKENS above the tokens sent", G, REJECT, r"NUM_TOKENS\[0\] must be in 1\.\.4, got 5",
             {"VILEX_TOKENS": tokens, "NUM_TOKENS": i32(5)}),
        Case("NUM_TOKENS differ within a tokenize request", T, REJECT, r"NUM_TOKENS must be the same",
             {"IMAGE": rows(png, png), "NUM_TOKENS": np.array([[2], [3]], np.int32)}),
        Case("STEPS 0", G, REJECT, r"STEPS\[0\] must be in 1\.\.", {"VILEX_TOKENS": tokens, "STEPS": i32(0)}),
        # 5. prompts
        Case("PROMPT not UTF-8", R, REJECT, r"PROMPT\[0\] is not UTF-8", {"IMAGE": rows(png), "PROMPT": rows(b"\xff\xfe red")}),
        Case("PROMPT overlong UTF-8 encoding", G, REJECT, r"PROMPT\[0\] is not UTF-8",
             {"VILEX_TOKENS": tokens, "PROMPT": rows(b"\xc0\xaf")}),
        Case("PROMPT of 1 MB", G, REJECT, r"PROMPT\[0\] is too long: 1048576 bytes",
             {"VILEX_TOKENS": tokens, "PROMPT": rows(b"a" * 2**20)}),
        Case("PROMPT too long for the tokens", R, REJECT, r"PROMPT\[0\]: prompt is too long",
             {"IMAGE": rows(png), "NUM_TOKENS": i32(N), "PROMPT": rows(b"a small red house " * 20)}),
        # 6. images: empty, corrupt, truncated, bombs, animated, degenerate sizes
        Case("IMAGE empty bytes", T, REJECT, r"IMAGE\[0\]: empty bytes", {"IMAGE": rows(b"")}),
        Case("IMAGE random bytes", R, REJECT, r"IMAGE\[0\]: bytes are not a readable image",
             {"IMAGE": rows(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())}),
        Case("IMAGE second row corrupt", T, REJECT, r"IMAGE\[1\]: bytes are not a readable image",
             {"IMAGE": rows(png, b"GIF89a\x00")}),
        *[Case(f"{fmt} truncated", T if i % 2 else R, REJECT, r"IMAGE\[0\]: bytes are not a readable image",
               {"IMAGE": rows(images.truncated(fmt))}) for i, fmt in enumerate(images.truncatable_formats())],
        *[Case(f"{fmt} corrupt", R if i % 2 else T, REJECT, r"IMAGE\[0\]: bytes are not a readable image",
               {"IMAGE": rows(build())}) for i, (fmt, build) in enumerate(images.CORRUPT.items())
          if fmt in images.truncatable_formats()],
        Case("PNG bomb 20000x20000 (49 KB)", R, REJECT, r"IMAGE\[0\].*(above the limit|exceeds limit)",
             {"IMAGE": rows(images.png_bomb(20000))}),
        Case("GIF bomb 65535x65535 canvas (35 B)", T, REJECT, r"IMAGE\[0\].*(above the limit|exceeds limit)",
             {"IMAGE": rows(images.gif_bomb())}),
        Case("WebP bomb 16383x16383 (38 B)", R, REJECT, r"IMAGE\[0\].*(above the limit|exceeds limit)",
             {"IMAGE": rows(images.webp_bomb())}),
        Case("WebP bomb 9000x9000, between our limit and Pillow's", T, REJECT, r"IMAGE\[0\]: 9000x9000 pixels is above the limit",
             {"IMAGE": rows(images.webp_bomb(9000, 9000))}),
        Case(f"PNG {side}x{side} at the pixel limit (1-bit, {len(images.png_bomb(side)) // 1024} KB)", T, SERVE,
             inputs={"IMAGE": rows(images.png_bomb(side))}, note="served: within the documented pixel limit", heavy=True),
        Case(f"WebP {side}x{side} at the pixel limit (38 B)", T, SERVE, inputs={"IMAGE": rows(images.webp_bomb(side, side))},
             note="served: within the documented pixel limit", heavy=True),
        *[Case(f"animated {fmt} (3 frames)", T if fmt in ("GIF", "WEBP") else R, REJECT, r"IMAGE\[0\]: animated",
               {"IMAGE": rows(images.animated(fmt))}) for fmt in ("GIF", "PNG", "WEBP", "TIFF")],
        Case("PNG 0x0", T, REJECT, r"IMAGE\[0\]: bytes are not a readable image", {"IMAGE": rows(images.empty_png())}),
        Case("BMP 0x0", R, REJECT, r"IMAGE\[0\]: bytes are not a readable image", {"IMAGE": rows(images.empty_bmp())}),
        Case("IMAGE_RGB 0 pixels high", T, REJECT, r"IMAGE_RGB: \d+x0 pixels", {"IMAGE_RGB": np.zeros((1, 0, 8, 3), np.uint8)}),
        Case("TIFF of NaN floats", T, REJECT, r"IMAGE\[0\].*(NaN|not finite)", {"IMAGE": rows(images.float_tiff(nan))}),
        Case("TIFF of inf floats", R, REJECT, r"IMAGE\[0\].*(NaN|not finite)", {"IMAGE": rows(images.float_tiff(inf))}),
        Case("PNG 1x4096", R, SERVE, inputs={"IMAGE": rows(images.line_png(1, 4096)), "STEPS": i32(1)}),
        Case("PNG 4096x1", T, SERVE, inputs={"IMAGE": rows(images.line_png(4096, 1))}),
        Case("IMAGE_RGB 1x1", R, SERVE, inputs={"IMAGE_RGB": np.zeros((1, 1, 1, 3), np.uint8), "STEPS": i32(1)}),
        # 7. oversized bodies: 201 MB of raw pixels above the pixel limit; 64 MB of encoded bytes
        Case("IMAGE_RGB 8200x8200 (201 MB body)", T, REJECT, r"IMAGE_RGB: 8200x8200 pixels",
             {"IMAGE_RGB": np.zeros((1, 8200, 8200, 3), np.uint8)}, heavy=True),
        Case("IMAGE of 64 MB noise", T, REJECT, r"IMAGE\[0\]: bytes are not a readable image",
             {"IMAGE": rows(b"\x89PNG\r\n\x1a\n" + b"\x00" * (64 * 2**20))}, heavy=True),
    ]
    return [case for case in cases if declared(served, case)]


def declared(served: Served, case: Case) -> bool:
    """Whether the model declares every input the case sends (other than those it sends as unknown); a
    server without metadata (served.inputs empty) takes every case."""
    names = served.inputs.get(case.model)
    return names is None or all(name in names or name in case.unknown for name in case.inputs)


def numeric_cases(served: Served, base: dict[str, dict]) -> list[Case]:
    """NaN, +inf and -inf in every FP32 per-image input, and the extremes of every integer one, of each model in
    `base` ({model: the other inputs of a valid request}), as the model's metadata declares them."""
    nan, inf = float("nan"), float("inf")
    cases = []
    for model, inputs in base.items():
        for name, dtype in served.inputs.get(model, {}).items():
            if name in inputs or name in ("IMAGE", "IMAGE_RGB", "VILEX_TOKENS"):
                continue
            if dtype == "FP32":
                values = (("NaN", np.array([[nan]], np.float32)), ("+inf", np.array([[inf]], np.float32)),
                          ("-inf", np.array([[-inf]], np.float32)))
            elif dtype in ("INT32", "INT64"):
                kind = np.int32 if dtype == "INT32" else np.int64
                values = ((f"{dtype} min", np.array([[np.iinfo(kind).min]], kind)),
                          (f"{dtype} max", np.array([[np.iinfo(kind).max]], kind)))
            else:
                continue
            if name == "SEED":
                values = values[:1]  # the INT64 max is a valid seed
            cases += [Case(f"{name} {label} ({model[6:]})", model, REJECT, rf"{name}\b", {**inputs, name: value})
                      for label, value in values]
    return cases


# ---- raw HTTP: bytes Triton's frontend parses itself ---------------------------------------------------------
def http_post(path: str, body: bytes, headers: dict | None = None) -> Callable:
    def send(host: str, port: int, timeout_s: float) -> tuple[str, str]:
        connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return str(response.status), response.read().decode(errors="replace")
        finally:
            connection.close()
    return send


def raw_http_cases(served: Served) -> list[Case]:
    D = served.hidden_size
    infer = "/v2/models/{}/infer"
    tokens_json = {"name": "VILEX_TOKENS", "shape": [1, 4, D], "datatype": "FP32"}

    def case(name, model, body, headers=None, names=""):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Case(name, model, FRONTEND, names, send=http_post(infer.format(model), body, headers), protocols=("http",))

    # A binary request: JSON header, then the tensor's raw bytes; Inference-Header-Content-Length says
    # where the JSON ends.
    header = json.dumps({"inputs": [{**tokens_json, "parameters": {"binary_data_size": 4 * 4 * D}}]}).encode()
    payload = np.zeros((1, 4, D), np.float32).tobytes()
    return [
        case("HTTP: broken JSON", "vilex_tokenize", b'{"inputs": [{"name": "IMAGE", '),
        case("HTTP: JSON array, not an object", "vilex_generate", b"[1, 2, 3]"),
        case("HTTP: inputs is a number", "vilex_reconstruct", {"inputs": 3}),
        case("HTTP: unknown datatype FP99", "vilex_generate", {"inputs": [{**tokens_json, "datatype": "FP99", "data": [0.0] * 4 * D}]}),
        case("HTTP: negative shape", "vilex_generate", {"inputs": [{**tokens_json, "shape": [1, -4, D], "data": []}]}),
        case("HTTP: fewer values than the shape", "vilex_generate", {"inputs": [{**tokens_json, "data": [0.0] * 3}]}),
        case("HTTP: strings in FP32 data", "vilex_generate", {"inputs": [{**tokens_json, "data": ["x"] * 4 * D}]}),
        case("HTTP: NaN literal in JSON", "vilex_generate",
             b'{"inputs": [{"name": "VILEX_TOKENS", "shape": [1, 1, %d], "datatype": "FP32", "data": [NaN%s]}]}'
             % (D, b", 0" * (D - 1))),
        case("HTTP: Inference-Header-Content-Length beyond the body", "vilex_generate", header + payload,
             {"Inference-Header-Content-Length": str(len(header) + len(payload) + 1000)}),
        case("HTTP: Inference-Header-Content-Length not a number", "vilex_generate", header + payload,
             {"Inference-Header-Content-Length": "twelve"}),
        case("HTTP: Inference-Header-Content-Length negative", "vilex_generate", header + payload,
             {"Inference-Header-Content-Length": "-5"}),
        case("HTTP: Inference-Header-Content-Length cuts the JSON", "vilex_generate", header + payload,
             {"Inference-Header-Content-Length": str(len(header) // 2)}),
        case("HTTP: binary_data_size beyond the body", "vilex_generate", header + payload[:100],
             {"Inference-Header-Content-Length": str(len(header))}),
        case("HTTP: gzip Content-Encoding on plain bytes", "vilex_tokenize", b'{"inputs": []}',
             {"Content-Encoding": "gzip"}),
    ]


# ---- raw gRPC: a ModelInferRequest Triton's frontend parses itself -----------------------------------------------
def grpc_call(build: Callable) -> Callable:
    """build() -> the request's bytes (a serialized ModelInferRequest, or not)."""

    def send(host: str, port: int, timeout_s: float) -> tuple[str, str]:
        import grpc

        with grpc.insecure_channel(f"{host}:{port}") as channel:
            method = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            try:
                method(build(), timeout=timeout_s)
            except grpc.RpcError as error:
                return str(error.code()), error.details() or ""
            return "StatusCode.OK", ""
    return send


def raw_grpc_cases(served: Served) -> list[Case]:
    from tritonclient.grpc import service_pb2

    D = served.hidden_size

    def request(model: str, name: str, shape, datatype: str, raw: list[bytes], extra_inputs=()) -> Callable:
        def build() -> bytes:
            message = service_pb2.ModelInferRequest(model_name=model)
            for name_, dims, dtype in ((name, shape, datatype), *extra_inputs):
                tensor = message.inputs.add()
                tensor.name, tensor.datatype = name_, dtype
                tensor.shape.extend(dims)
            message.raw_input_contents.extend(raw)
            return message.SerializeToString()
        return build

    def case(name, model, build):
        return Case(name, model, FRONTEND, send=grpc_call(build), protocols=("grpc",))

    noise = np.random.default_rng(2).integers(0, 256, 512, dtype=np.uint8).tobytes()
    return [
        case("gRPC: not a protobuf", "vilex_generate", lambda: noise),
        case("gRPC: raw_input_contents shorter than the shape", "vilex_generate",
             request("vilex_generate", "VILEX_TOKENS", [1, 4, D], "FP32", [b"\x00" * 12])),
        case("gRPC: two inputs, one raw_input_contents", "vilex_generate",
             request("vilex_generate", "VILEX_TOKENS", [1, 4, D], "FP32", [b"\x00" * 16 * D], extra_inputs=[("STEPS", [1, 1], "INT32")])),
        case("gRPC: unknown datatype FP99", "vilex_generate", request("vilex_generate", "VILEX_TOKENS", [1, 4, D], "FP99", [b"\x00" * 16 * D])),
        case("gRPC: negative shape", "vilex_tokenize", request("vilex_tokenize", "IMAGE_RGB", [1, -8, 8, 3], "UINT8", [b""])),
        case("gRPC: BYTES element length beyond the buffer", "vilex_tokenize",
             request("vilex_tokenize", "IMAGE", [1, 1], "BYTES", [struct.pack("<I", 2**31) + b"abc"])),
    ]


# ---- running the cases -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: str
    protocol: str
    model: str
    expect: str
    status: str  # "200", "400", "StatusCode.INVALID_ARGUMENT", ..., "timeout", "no answer"
    message: str
    latency_s: float
    passed: bool
    reason: str = ""
    followup_ok: bool = True
    followup_latency_s: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def send_tensors(client, module, model: str, inputs: dict[str, np.ndarray], protocol: str,
                 timeout_s: float) -> tuple[str, str, dict]:
    """One tritonclient request with these arrays exactly as they are -> (status, message, outputs)."""
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    try:
        options = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        result = client.infer(model, tensors, **options)
    except InferenceServerException as error:
        status = str(error.status() or "")
        message = str(error.message() or "")
        if protocol == "grpc" and status == "StatusCode.DEADLINE_EXCEEDED":
            status = "timeout"
        return status or "error", message, {}
    except Exception as error:  # noqa: BLE001 - a socket timeout or a reset is an outcome to record
        return ("timeout" if "timed out" in str(error).lower() else "no answer"), f"{type(error).__name__}: {error}", {}
    response = result.get_response()
    names = [o["name"] for o in response["outputs"]] if isinstance(response, dict) else [o.name for o in response.outputs]
    return ("200" if protocol == "http" else "StatusCode.OK"), "", {n: result.as_numpy(n) for n in names}


def judge(case: Case, protocol: str, status: str, message: str, outputs: dict) -> tuple[bool, str]:
    ok_status = "200" if protocol == "http" else "StatusCode.OK"
    if status in ("timeout", "no answer"):
        return False, f"no answer in time ({message})"
    if case.expect == SERVE:
        if status != ok_status:
            return False, f"expected it served, got {status}"
        return (True, "") if outputs else (False, "served without outputs")
    if case.expect == FRONTEND:
        return (False, "accepted") if status == ok_status else (True, "")
    if status == ok_status:
        return False, "accepted (expected a rejection)"
    if status != INVALID[protocol]:
        return False, f"expected {INVALID[protocol]}, got {status}"
    if case.names and not re.search(case.names, message):
        return False, f"message does not match {case.names!r}"
    return True, ""


class Followup:
    """A valid request per model, each answered within `timeout_s`: the server still serves."""

    def __init__(self, served: Served):
        png = images.line_png(40, 30)
        self.inputs = {"vilex_tokenize": {"IMAGE": rows(png), "NUM_TOKENS": i32(2)},
                       "vilex_generate": {"VILEX_TOKENS": np.zeros((1, 2, served.hidden_size), np.float32), "STEPS": i32(1)},
                       "vilex_reconstruct": {"IMAGE": rows(png), "STEPS": i32(1), "NUM_TOKENS": i32(2)}}
        self.output = {"vilex_tokenize": (1, 2, served.hidden_size), "vilex_generate": None, "vilex_reconstruct": None}

    def check(self, client, module, model: str, protocol: str, timeout_s: float) -> tuple[bool, float, str]:
        start = time.perf_counter()
        status, message, outputs = send_tensors(client, module, model, self.inputs[model], protocol, timeout_s)
        latency = time.perf_counter() - start
        if not outputs:
            return False, latency, f"{status}: {message[:200]}"
        shape = next(iter(outputs.values())).shape
        expected = self.output[model]
        if expected is not None and shape != expected:
            return False, latency, f"output shape {shape}, expected {expected}"
        return True, latency, ""


# Cases that reach a model's execute(): each is also sent together with valid requests that have the same
# inputs (Triton batches only requests with the same set of inputs; so "no VILEX_TOKENS" cannot be here).
BATCHED_CASES = ("AVIF corrupt", "IMAGE random bytes", "animated GIF (3 frames)", "TIFF of NaN floats",
                 "PROMPT not UTF-8", "PNG bomb 20000x20000 (49 KB)")
NEIGHBOURS = 3


def neighbours_for(max_queue_size: int) -> int:
    """Valid requests sent with each bad one: NEIGHBOURS, or fewer where the queue holds less. The bad request
    and its neighbours all wait in the queue while the blocker runs, and a queue of M refuses the (M+1)-th at
    once with 503 / UNAVAILABLE, which is the queue working, not a wrong answer (0: no bound)."""
    return NEIGHBOURS if max_queue_size <= 0 else max(0, min(NEIGHBOURS, max_queue_size - 1))


def neighbour(case: Case) -> dict[str, np.ndarray]:
    """A valid request with the same inputs as `case` (so Triton may batch the two): its image and prompt
    replaced by good ones."""
    # An empty PROMPT is no prompt: valid next to all N tokens (any text would not fit next to N of them).
    good = {"IMAGE": rows(images.line_png(40, 30)), "PROMPT": rows(b"")}
    return {name: np.repeat(good[name], len(array), axis=0) if name in good else array
            for name, array in case.inputs.items()}


def blocker(served: Served, model: str) -> dict[str, np.ndarray]:
    """A valid request that keeps `model` busy for a while (about a second here), so that requests sent
    during it wait in the queue and run together in the next execute() call."""
    if model == "vilex_tokenize":
        return {"IMAGE_RGB": np.random.default_rng(3).integers(0, 256, (1, 2500, 2500, 3), dtype=np.uint8)}
    if model == "vilex_generate":
        return {"VILEX_TOKENS": np.zeros((1, 2, served.hidden_size), np.float32), "STEPS": i32(min(30, served.max_steps))}
    return {"IMAGE": rows(images.line_png(40, 30)), "STEPS": i32(min(30, served.max_steps))}


def run_batched(host: str, ports: dict[str, int], protocols: list[str], served: Served, log=print,
                max_queue_size: int = 0) -> list[dict]:
    """Each of BATCHED_CASES with up to NEIGHBOURS valid requests (as many as the pipeline models' queue,
    `max_queue_size`, holds beside it: neighbours_for), sent while a slow request keeps the model busy, so that
    they wait in the queue and Triton runs them as one batch (the model's statistics say whether it did). The
    bad one must get its own error and the valid ones must be served ("a bad request does not fail the
    requests batched with it")."""
    import threading

    from vilex.serving.client import TritonClient

    cases = {c.name: c for c in tensor_cases(served)}
    count = neighbours_for(max_queue_size)
    results = []
    for protocol in protocols:
        for name in (n for n in BATCHED_CASES if n in cases):
            case = cases[name]
            requests = [blocker(served, case.model), case.inputs] + [neighbour(case)] * count
            answers: list = [None] * len(requests)
            barrier = threading.Barrier(len(requests) - 1, timeout=60)

            def send(n: int):
                module, client = connect(protocol, host, ports[protocol], CASE_TIMEOUT_S)
                try:
                    if n > 0:
                        barrier.wait()
                    start = time.perf_counter()
                    status, message, outputs = send_tensors(client, module, case.model, requests[n], protocol, CASE_TIMEOUT_S)
                    answers[n] = (status, message, outputs, time.perf_counter() - start)
                finally:
                    client.close()

            with TritonClient(f"{host}:{ports['http']}") as stats:
                before = stats.batch_sizes(case.model)
                threads = [threading.Thread(target=send, args=(n,), daemon=True) for n in range(len(requests))]
                threads[0].start()
                time.sleep(0.3)  # the blocker is executing
                for thread in threads[1:]:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=2 * CASE_TIMEOUT_S)
                time.sleep(0.5)  # Triton records an execution's statistics just after its responses
                after = stats.batch_sizes(case.model)
            executions = {size: after.get(size, 0) - before.get(size, 0) for size in after if after.get(size, 0) > before.get(size, 0)}
            answers = [a or ("timeout", "no answer", {}, 0.0) for a in answers]
            passed, reason = judge(case, protocol, *answers[1][:3])
            neighbours_ok = sum(bool(a[2]) for a in answers[2:])
            if neighbours_ok < count:
                reason = (reason + "; " if reason else "") + \
                    f"{count - neighbours_ok} of {count} valid requests sent with it failed " \
                    f"({sorted({a[0] for a in answers[2:] if not a[2]})})"
                passed = False
            results.append({"case": name, "protocol": protocol, "model": case.model, "status": answers[1][0],
                            "message": answers[1][1].strip()[:300], "neighbours": count, "neighbours_served": neighbours_ok,
                            "neighbour_statuses": [a[0] for a in answers[2:]], "blocker_status": answers[0][0],
                            "executions_by_batch_size": executions, "passed": passed, "reason": reason})
            log(f"  {'ok  ' if passed else 'FAIL'} {protocol:4s} {case.model:17s} {('batched: ' + name)[:58]:58s} "
                f"{answers[1][0]:28s} {neighbours_ok}/{count} neighbours served, executions {executions}"
                f"{'  ' + reason if reason else ''}")
    return results


def connect(protocol: str, host: str, port: int, timeout_s: float):
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(f"{host}:{port}", connection_timeout=timeout_s,
                                                    network_timeout=timeout_s)
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(f"{host}:{port}")


def all_cases(served: Served, quick: bool = False) -> list[Case]:
    cases = tensor_cases(served) + raw_http_cases(served) + raw_grpc_cases(served)
    return [case for case in cases if not (quick and case.heavy)]


def run_hostile(host: str, ports: dict[str, int], protocols: list[str], served: Served, log=print,
                deadline: float | None = None, quick: bool = False) -> list[Outcome]:
    """Every case over every protocol asked for, each followed by a valid request. Bounded: one request per
    case and CASE_TIMEOUT_S each; stops early (and says so) at `deadline` (time.monotonic())."""
    cases = all_cases(served, quick)
    followup = Followup(served)
    outcomes: list[Outcome] = []
    for protocol in protocols:
        module, client = connect(protocol, host, ports[protocol], CASE_TIMEOUT_S)
        try:
            for case in (c for c in cases if protocol in c.protocols):
                if deadline is not None and time.monotonic() > deadline:
                    log(f"hostile: --duration reached; {protocol} stopped before '{case.name}'")
                    break
                start = time.perf_counter()
                if case.send is not None:
                    try:
                        status, message = case.send(host, ports[protocol], CASE_TIMEOUT_S)
                    except Exception as error:  # noqa: BLE001 - a reset or a timeout is what we record
                        status, message = ("timeout" if "timed out" in str(error) else "no answer"), f"{type(error).__name__}: {error}"
                    outputs = {}
                else:
                    status, message, outputs = send_tensors(client, module, case.model, case.inputs, protocol, CASE_TIMEOUT_S)
                latency = time.perf_counter() - start
                passed, reason = judge(case, protocol, status, message, outputs)
                ok, followup_latency, why = followup.check(client, module, case.model, protocol, CASE_TIMEOUT_S)
                if not ok:
                    # A broken connection on our side is not the server's failure: retry once on a new client.
                    client.close()
                    module, client = connect(protocol, host, ports[protocol], CASE_TIMEOUT_S)
                    ok, followup_latency, why = followup.check(client, module, case.model, protocol, CASE_TIMEOUT_S)
                if not ok:
                    passed, reason = False, (reason + "; " if reason else "") + f"the next valid request failed: {why}"
                outcome = Outcome(case.name, protocol, case.model, case.expect, status, message.strip()[:400],
                                  round(latency, 4), passed, reason, ok, round(followup_latency, 4), case.note)
                outcomes.append(outcome)
                log(f"  {'ok  ' if passed else 'FAIL'} {protocol:4s} {case.model:17s} {case.name[:58]:58s} "
                    f"{status:28s} {latency * 1e3:7.0f} ms{'  ' + reason if reason else ''}")
        finally:
            client.close()
    return outcomes
