"""Triton end to end: the served pipeline (`vilex_reconstruct`) over HTTP and gRPC, at each concurrency, for
each UNet placement asked for (`vilex triton-repo --unet bls|local`).

The benchmark builds a model repository from the export folder (the CPU `python-ort` platform, the
one the tritonserver of the nvidia-pytriton wheel runs), starts a real tritonserver on free ports,
and drives it with tritonclient: one client per thread (tritonclient clients must not be shared
between threads). Requests are image -> image with the same settings as the in-process end-to-end
measurement, so the two compare directly.

Around every measurement the server's own statistics are read (before and after, so the figures are that
measurement's alone), giving per request where the time went:

    pipeline_ms     the pipeline model's queue + compute (what the server spent on the request)
    stages_ms       the graph models' own runs (compute_infer of vilex_encoder, text_encoder, vae_decoder, and
                    the UNet: the `unet` model's with `bls`, the pipeline's custom metric
                    `vilex_local_unet_duration_us` with `local`)
    overhead_ms     pipeline_ms - stages_ms: queue, hops, copies, image decoding and the loop's own Python
    unet_queue_ms, unet_io_ms   with `bls`: the `unet` model's queue and input/output copies per UNet call

and once per placement, the serving overhead per denoising step: requests one at a time at `steps` and at
2 x `steps` steps, overhead_per_step_ms = (overhead_ms at 2 x steps - overhead_ms at steps) / steps. The
difference takes out what a request costs once (decoding the image, the encoder and text-encoder hops, the
VAE), leaving what every step adds outside the UNet's own run.
"""

from __future__ import annotations

import re
import tempfile
import urllib.request
from pathlib import Path

from .measure import measure
from .runner import BenchSettings, Unavailable

PIPELINE_MODEL = "vilex_reconstruct"
GRAPH_MODELS = ("vilex_encoder", "text_encoder", "unet", "vae_decoder")
LOCAL_UNET_METRIC = re.compile(r'^vilex_local_unet_(duration_us|runs)\{[^}]*model="' + PIPELINE_MODEL + r'"[^}]*\}\s+(\S+)$')


def measure_triton(engines: Path | None, images, settings: BenchSettings, concurrency=(1, 2, 4),
                   protocols=("http", "grpc"), placements: tuple[str, ...] | None = None, isolation=None):
    """Yield (placement, protocol, Stats, server breakdown) per placement, protocol and concurrency. Each
    placement's server starts here and is stopped before the next one starts; with an isolation.Isolation,
    every measurement records what else of the run was alive beside that server."""
    if engines is None:
        raise Unavailable("triton needs an export folder")
    try:
        import tritonclient  # noqa: F401

        from vilex.serving.client import TritonClient
        from vilex.serving.config import DEFAULT_UNET
        from vilex.serving.repository import build_repository
        from vilex.serving.server import Ports, TritonServer, pytriton_dir

        pytriton_dir()
    except Exception as error:  # missing tritonclient / nvidia-pytriton: say which
        raise Unavailable(f"triton: {error}") from None

    batch = list(images[: settings.e2e_batch])
    for placement in placements or (DEFAULT_UNET,):
        with tempfile.TemporaryDirectory(prefix="vilex-bench-triton-") as tmp:
            # The export's --max-batch bounds the served batch; more concurrent requests than that queue.
            repository = build_repository(engines, Path(tmp) / "repository", unet=placement)
            print(f"triton: serving {repository} (--unet {placement})")
            with TritonServer(repository, ports=Ports.free()) as server:
                per_step = step_overhead(server, batch, settings)
                print(f"triton --unet {placement}: serving overhead {per_step['overhead_per_step_ms']:.3f} ms per step")
                for protocol in protocols:
                    for workers in concurrency:
                        def make_call(protocol=protocol):
                            client = TritonClient(server.url(protocol), protocol=protocol)
                            return lambda: client.reconstruct(batch, num_tokens=settings.num_tokens,
                                                              steps=settings.steps, guidance=settings.guidance_scale,
                                                              seed=settings.seed)

                        before = settled_counters(server)
                        # Each window: every thread completes two requests back to back.
                        watch = None if isolation is None else isolation.watch("triton", own_pids=(server.pid,))
                        stats = measure(make_call, items_per_call=len(batch), concurrency=workers, warmup_calls=3,
                                        window_s=0.0, min_calls=2 * workers, max_windows=min(settings.max_windows, 5),
                                        stability=settings.stability, watch=watch)
                        yield placement, protocol, stats, {**breakdown(before, settled_counters(server)), **per_step}


def server_counters(server=None, http_url: str | None = None, metrics_port: int | None = None) -> dict:
    """Cumulative counts and nanoseconds from the server (a TritonServer, or its HTTP HOST:PORT and metrics
    port): Triton's statistics of the pipeline and graph models, and the local UNet's custom metric (absent
    with `bls`)."""
    import tritonclient.http as httpclient

    http_url = http_url or server.url("http")
    metrics_port = metrics_port or server.ports.metrics
    client = httpclient.InferenceServerClient(http_url)
    try:
        counters = {}
        for model in (PIPELINE_MODEL,) + GRAPH_MODELS:
            (stats,) = client.get_inference_statistics(model)["model_stats"]
            inference = stats["inference_stats"]
            counters[model] = {part: int(inference[part]["ns"]) for part in
                               ("queue", "compute_input", "compute_infer", "compute_output")}
            counters[model]["requests"] = int(inference["success"]["count"])
            counters[model]["executions"] = int(stats["execution_count"])
    finally:
        client.close()
    with urllib.request.urlopen(f"http://{http_url.rsplit(':', 1)[0]}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    local = {"duration_us": 0.0, "runs": 0.0}
    for line in text.splitlines():
        match = LOCAL_UNET_METRIC.match(line)
        if match:
            local[match.group(1)] += float(match.group(2))
    counters["local_unet"] = local
    return counters


def settled_counters(server=None, http_url: str | None = None, metrics_port: int | None = None,
                     timeout_s: float = 10.0) -> dict:
    """server_counters once two readings 0.2 s apart agree: Triton records an execution's statistics just after
    its responses are sent, while the local UNet's metric counts during the execution, so a reading taken as
    the last response arrives can hold a step count without its execution."""
    import time

    reading = server_counters(server, http_url, metrics_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = server_counters(server, http_url, metrics_port)
        if again == reading:
            break
        reading = again
    return reading


def breakdown(before: dict, after: dict) -> dict:
    """Per pipeline request, from two `server_counters` readings (see the module docstring)."""
    delta = {model: {key: after[model][key] - before[model][key] for key in after[model]} for model in after}
    requests = delta[PIPELINE_MODEL]["requests"]
    if not requests:
        return {}
    pipeline = delta[PIPELINE_MODEL]
    pipeline_ns = pipeline["queue"] + pipeline["compute_input"] + pipeline["compute_infer"] + pipeline["compute_output"]
    local = delta["local_unet"]
    unet_ns = delta["unet"]["compute_infer"] + local["duration_us"] * 1000
    stages_ns = sum(delta[m]["compute_infer"] for m in GRAPH_MODELS if m != "unet") + unet_ns
    per = 1e6 * requests
    result = {"requests": requests, "executions": pipeline["executions"], "pipeline_ms": pipeline_ns / per,
              "stages_ms": stages_ns / per, "overhead_ms": (pipeline_ns - stages_ns) / per,
              "pipeline_queue_ms": pipeline["queue"] / per, "unet_ms": unet_ns / per,
              "unet_calls": int(delta["unet"]["requests"] + local["runs"]),
              "unet_placement": "local" if local["runs"] else "bls"}
    if delta["unet"]["requests"]:
        unet, calls = delta["unet"], 1e6 * delta["unet"]["requests"]
        result["unet_queue_ms"] = unet["queue"] / calls
        result["unet_io_ms"] = (unet["compute_input"] + unet["compute_output"]) / calls
    return result


def step_overhead(server, batch, settings: BenchSettings, requests: int = 4) -> dict:
    """The serving overhead each denoising step adds (see the module docstring): `requests` requests one at a
    time over HTTP at `steps` and at 2 x `steps`, after one of each as a warm-up."""
    from vilex.serving.client import TritonClient

    overhead = {}
    with TritonClient(server.url("http")) as client:
        for steps in (settings.steps, 2 * settings.steps):
            def call():
                client.reconstruct(batch, num_tokens=settings.num_tokens, steps=steps,
                                   guidance=settings.guidance_scale, seed=settings.seed)

            call()
            before = settled_counters(server)
            for _ in range(requests):
                call()
            overhead[steps] = breakdown(before, settled_counters(server))["overhead_ms"]
    return {"overhead_per_step_ms": (overhead[2 * settings.steps] - overhead[settings.steps]) / settings.steps,
            "overhead_ms_by_steps": overhead}
