"""Triton end to end: the served pipeline (`vilex_reconstruct`) over HTTP and gRPC, at each concurrency.

The benchmark builds a model repository from the export folder (the CPU `python-ort` platform, the
one the tritonserver of the nvidia-pytriton wheel runs), starts a real tritonserver on free ports,
and drives it with tritonclient: one client per thread (tritonclient clients must not be shared
between threads). Requests are image -> image with the same settings as the in-process end-to-end
measurement, so the two compare directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .measure import measure
from .runner import BenchSettings, Unavailable


def measure_triton(engines: Path | None, images, settings: BenchSettings, concurrency=(1, 2, 4),
                   protocols=("http", "grpc")):
    """Yield (protocol, Stats) per protocol and concurrency."""
    if engines is None:
        raise Unavailable("triton needs an export folder")
    try:
        import tritonclient  # noqa: F401

        from vilex.serving.client import TritonClient
        from vilex.serving.repository import build_repository
        from vilex.serving.server import Ports, TritonServer, pytriton_dir

        pytriton_dir()
    except Exception as error:  # missing tritonclient / nvidia-pytriton: say which
        raise Unavailable(f"triton: {error}") from None

    batch = list(images[: settings.e2e_batch])
    with tempfile.TemporaryDirectory(prefix="vilex-bench-triton-") as tmp:
        # The export's --max-batch bounds the served batch; more concurrent requests than that queue.
        repository = build_repository(engines, Path(tmp) / "repository")
        print(f"triton: serving {repository}")
        with TritonServer(repository, ports=Ports.free()) as server:
            for protocol in protocols:
                for workers in concurrency:
                    def make_call(protocol=protocol):
                        client = TritonClient(server.url(protocol), protocol=protocol)
                        return lambda: client.reconstruct(batch, num_tokens=settings.num_tokens, steps=settings.steps,
                                                          guidance=settings.guidance_scale, seed=settings.seed)

                    # Each window: every thread completes two requests back to back.
                    yield protocol, measure(make_call, items_per_call=len(batch), concurrency=workers,
                                            warmup_calls=3, window_s=0.0, min_calls=2 * workers,
                                            max_windows=min(settings.max_windows, 5), stability=settings.stability)
