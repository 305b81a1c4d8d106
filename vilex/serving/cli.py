"""`vilex triton-repo` and `vilex serve` (the `--backend triton` path of tokenize / generate / reconstruct is
`remote.RemotePipeline`, opened by `vilex.runtime.open_pipeline`).

`add_parser` is registered through vilex.cli.COMMAND_MODULES.
"""

from __future__ import annotations

import shlex
import signal
import sys

from vilex.errors import ViLexUsageError
from vilex.settings import MAX_STEPS

from .config import DEFAULT_MAX_STEPS, DEFAULT_UNET, GRAPH_QUEUE_DELAY_US, PLATFORMS, UNET_PLACEMENTS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("triton-repo", help="export folder -> Triton model repository (graphs + pipeline models)")
    p.add_argument("engines", metavar="ENGINES", help="an export folder from `vilex export` (engines/NAME)")
    p.add_argument("--out", required=True, help="the model repository folder to write")
    p.add_argument("--platform", default="python-ort",
                   help=f"how the graphs run: {', '.join(PLATFORMS)} (default python-ort: the CPU server in "
                        f"nvidia-pytriton; onnxruntime/tensorrt: NVIDIA's container on a GPU host)")
    p.add_argument("--max-batch", type=int, default=None, help="images per batch, 1..the export's --max-batch (default: that)")
    p.add_argument("--instances", type=int, default=1, help="instances of each graph model, 1..64 (default 1)")
    p.add_argument("--pipeline-instances", type=int, default=1,
                   help="instances of each pipeline model (vilex_tokenize, vilex_generate, vilex_reconstruct), "
                        "1..64 (default 1)")
    p.add_argument("--graph-queue-delay", type=int, default=GRAPH_QUEUE_DELAY_US, metavar="US",
                   help="microseconds a graph model waits to fill a batch, 0..1000000 (default 0: run what is "
                        "queued at once; more lets concurrent pipeline instances share a batch)")
    p.add_argument("--max-queue", type=int, default=None, help="requests queued per model before rejecting (default: 8 batches)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"the most denoising steps one request may ask for, 1..{MAX_STEPS} (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--unet", default=None, choices=UNET_PLACEMENTS,
                   help=f"where vilex_generate and vilex_reconstruct run the UNet: bls (each denoising step a request "
                        f"to the unet model) or local (an onnxruntime session in their own process; no per-step "
                        f"hop). Default {DEFAULT_UNET}; with --platform tensorrt bls, the only choice there "
                        f"(its UNet is the engine)")
    p.add_argument("--stream", action="store_true",
                   help="also write vilex_generate_stream and vilex_reconstruct_stream: decoupled models that send "
                        "progress per denoising step over gRPC (`vilex generate|reconstruct --stream`); each is one "
                        "more Python-backend process holding a pipeline")
    p.add_argument("--replace", action="store_true", help="replace an existing repository at --out (atomically)")
    p.set_defaults(func=cmd_triton_repo)

    p = subparsers.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C / SIGTERM")
    p.add_argument("repository", metavar="DIR", help="a model repository from `vilex triton-repo`")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--health-port", type=int, default=8003,
                   help="vilex's own readiness: GET /ready (200 only while every model can serve), /live "
                        "(default 8003; 0: a free port)")
    p.add_argument("--address", default="127.0.0.1",
                   help="where to listen (default 127.0.0.1: this host only; 0.0.0.0: every interface)")
    p.add_argument("--log", default=None, help="write the server's log to this file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--docker", action="store_true",
                   help="print the `docker run` command for NVIDIA's Triton container (GPU hosts) and exit")
    p.add_argument("--image", default=None, help="container image for --docker (default: NVIDIA's 24.10 image)")
    p.set_defaults(func=cmd_serve)


def cmd_triton_repo(args) -> None:
    from .repository import build_repository

    out = build_repository(args.engines, args.out, platform=args.platform, max_batch=args.max_batch,
                           instances=args.instances, max_queue=args.max_queue, max_steps=args.max_steps,
                           replace=args.replace, pipeline_instances=args.pipeline_instances,
                           graph_queue_delay_us=args.graph_queue_delay, unet=args.unet, streaming=args.stream)
    models = sorted(p.name for p in out.iterdir() if (p / "config.pbtxt").is_file())
    print(f"wrote model repository {out} ({args.platform}): {', '.join(models)}")
    print(f"serve it with: vilex serve {out}")


def cmd_serve(args) -> None:
    from .repository import read_repository
    from .server import CONTAINER_IMAGE, Ports, TritonServer, docker_command

    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    for flag, port in (("--http-port", ports.http), ("--grpc-port", ports.grpc), ("--metrics-port", ports.metrics)):
        if not 1 <= port <= 65535:
            raise ViLexUsageError(f"{flag} must be in 1..65535, got {port}")
    if not 0 <= args.health_port <= 65535:
        raise ViLexUsageError(f"--health-port must be in 0..65535 (0: a free port), got {args.health_port}")
    given = [ports.http, ports.grpc, ports.metrics] + ([args.health_port] if args.health_port else [])
    if len(set(given)) < len(given):
        raise ViLexUsageError(f"--http-port, --grpc-port, --metrics-port and --health-port must differ, got "
                              f"{', '.join(map(str, given))}")
    if args.docker:
        read_repository(args.repository)
        print("# NVIDIA's Triton container on a GPU host. The pipeline models import vilex (with torch, diffusers,")
        print("# transformers): use an image built FROM the one below with `pip install vilex`, and pass it with --image.")
        print("# The restricted APIs answer callers that send the header vilex-admin-key: $VILEX_TRITON_ADMIN_KEY.")
        print(shlex.join(docker_command(args.repository, ports, args.image or CONTAINER_IMAGE)))
        return

    server = TritonServer(args.repository, ports=ports, address=args.address, log=args.log,
                          health_port=args.health_port)
    # SIGTERM (docker stop, systemd, kill) stops the server the same way Ctrl-C does. SIGINT is set too:
    # a shell starts background commands with SIGINT ignored, and Python then keeps ignoring it.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"starting tritonserver on {server.repository} ...", flush=True)
        server.start(timeout_s=args.timeout)
        print(f"tritonserver ready (pid {server.pid}): http {server.url('http')}, grpc {server.url('grpc')}, "
              f"metrics {server.address}:{ports.metrics}; readiness {server.health_url()}/ready; "
              f"admin key in {server.admin_key_file or '$VILEX_TRITON_ADMIN_KEY'}; log {server.log_path}", flush=True)
        print("models: " + ", ".join(server.info["models"]["pipeline"] + server.info["models"]["graphs"]), flush=True)
        print("stop with Ctrl-C", flush=True)
        # The watchdog restarts tritonserver when a stub dies; wait() returns only when it gave up.
        code = server.wait()
        print(f"tritonserver ended for good (code {code}): {server.readiness_report()['reason']}\n"
              f"{server.log_tail()}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short (stop() is bounded by its timeouts).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = server.stop()
        if code is not None:
            print(f"tritonserver stopped (exit code {code})", flush=True)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
