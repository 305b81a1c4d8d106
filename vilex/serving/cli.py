"""`vilex triton-repo`, `vilex serve`, and the `--backend triton` path of tokenize / generate / reconstruct.

`add_parser` is registered through vilex.cli.COMMAND_MODULES.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

from vilex.errors import ViLexUsageError

from .config import DEFAULT_MAX_STEPS, PLATFORMS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("triton-repo", help="export folder -> Triton model repository (graphs + pipeline models)")
    p.add_argument("engines", metavar="ENGINES", help="an export folder from `vilex export` (engines/NAME)")
    p.add_argument("--out", required=True, help="the model repository folder to write")
    p.add_argument("--platform", default="python-ort",
                   help=f"how the graphs run: {', '.join(PLATFORMS)} (default python-ort: the CPU server in "
                        f"nvidia-pytriton; onnxruntime/tensorrt: NVIDIA's container on a GPU host)")
    p.add_argument("--max-batch", type=int, default=None, help="images per batch, 1..the export's --max-batch (default: that)")
    p.add_argument("--instances", type=int, default=1, help="instances of every model, 1..64 (default 1)")
    p.add_argument("--max-queue", type=int, default=None, help="requests queued per model before rejecting (default: 8 batches)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"the most denoising steps one request may ask for, 1..1000 (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--replace", action="store_true", help="replace an existing repository at --out (atomically)")
    p.set_defaults(func=cmd_triton_repo)

    p = subparsers.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C / SIGTERM")
    p.add_argument("repository", metavar="DIR", help="a model repository from `vilex triton-repo`")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
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
                           replace=args.replace)
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
    if len({ports.http, ports.grpc, ports.metrics}) < 3:
        raise ViLexUsageError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    if args.docker:
        read_repository(args.repository)
        print("# NVIDIA's Triton container on a GPU host. The pipeline models import vilex (with torch, diffusers,")
        print("# transformers): use an image built FROM the one below with `pip install vilex`, and pass it with --image.")
        print(f"# The restricted APIs answer callers that send the header vilex-admin-key: $VILEX_TRITON_ADMIN_KEY.")
        print(shlex.join(docker_command(args.repository, ports, args.image or CONTAINER_IMAGE)))
        return

    server = TritonServer(args.repository, ports=ports, address=args.address, log=args.log)
    # SIGTERM (docker stop, systemd, kill) stops the server the same way Ctrl-C does. SIGINT is set too:
    # a shell starts background commands with SIGINT ignored, and Python then keeps ignoring it.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"starting tritonserver on {server.repository} ...", flush=True)
        server.start(timeout_s=args.timeout)
        print(f"tritonserver ready (pid {server.pid}): http {server.url('http')}, grpc {server.url('grpc')}, "
              f"metrics {server.address}:{ports.metrics}; log {server.log_path}", flush=True)
        print("models: " + ", ".join(server.info["models"]["pipeline"] + server.info["models"]["graphs"]), flush=True)
        print("stop with Ctrl-C", flush=True)
        while server.process.poll() is None:
            try:
                server.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        print(f"tritonserver exited on its own with code {server.process.returncode}:\n{server.log_tail()}",
              file=sys.stderr, flush=True)
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


# ---- --backend triton for tokenize / generate / reconstruct ------------------------------------------------
UNSUPPORTED_REMOTE = (("text_guidance", "--text-guidance", None), ("height", "--height", None),
                      ("width", "--width", None), ("order", "--order", "vilex_first"), ("engines", "--engines", None))


def remote_args(args, takes_images: bool) -> list[str]:
    """Check a `--backend triton` command line and return its image paths (there is no CKPT: the server
    holds the model, so every positional is an image)."""
    if not getattr(args, "url", None):
        raise ViLexUsageError("--backend triton needs --url HOST:PORT (the server from `vilex serve`)")
    for attribute, flag, default in UNSUPPORTED_REMOTE:
        if getattr(args, attribute, default) != default:
            raise ViLexUsageError(f"{flag} is not available with --backend triton (the served models take "
                                  f"NUM_TOKENS, PROMPT, STEPS, GUIDANCE and SEED)")
    positionals = [p for p in ([args.ckpt] + list(getattr(args, "images", []) or [])) if p is not None]
    if positionals and (Path(positionals[0]) / "model_index.json").is_file():
        raise ViLexUsageError(f"with --backend triton the server holds the model: drop CKPT '{positionals[0]}'")
    if takes_images and not positionals:
        raise ViLexUsageError("give at least one IMAGE")
    if not takes_images and positionals:
        raise ViLexUsageError(f"with --backend triton the server holds the model: drop CKPT '{positionals[0]}'")
    return positionals


def read_image_files(paths: list[str]) -> list[bytes]:
    """Check each file locally (a clear error before any request), then send its encoded bytes as they are."""
    from vilex.images import load_image

    for path in paths:
        load_image(path)
    return [Path(path).read_bytes() for path in paths]


def remote_tokenize(args) -> None:
    import numpy as np
    import torch

    from vilex.outputs import save_tokens

    from .client import map_concurrently

    paths = remote_args(args, takes_images=True)
    images = read_image_files(paths)
    if args.tokens is not None and args.tokens < 1:
        raise ViLexUsageError(f"--tokens must be >= 1, got {args.tokens}")
    # One request per image, sent together: the server batches them.
    tokens = map_concurrently(args.url, args.protocol, lambda c, image: c.tokenize([image], num_tokens=args.tokens),
                              images, workers=len(images))
    vilex_tokens = torch.from_numpy(np.concatenate(tokens))  # (n, k, D)
    save_tokens(args.out, vilex_tokens, {"images": paths, "num_tokens": int(vilex_tokens.shape[1]),
                                         "server": f"{args.protocol}://{args.url}"})
    print(f"wrote {tuple(vilex_tokens.shape)} ViLex tokens to {args.out} (served by {args.url})")


def remote_generate(args) -> None:
    import PIL.Image

    from vilex.outputs import atomic_folder, load_tokens

    from .client import map_concurrently

    remote_args(args, takes_images=False)
    vilex_tokens = load_tokens(args.tokens).float().numpy()  # (n, k, D)
    # Each image is generated as if alone with --seed (results do not depend on batching).
    images = map_concurrently(args.url, args.protocol,
                              lambda c, t: c.generate(t[None], prompt=args.prompt, steps=args.steps,
                                                      guidance=args.guidance, seed=args.seed)[0],
                              list(vilex_tokens), workers=len(vilex_tokens))
    with atomic_folder(args.out) as staging:
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(staging / f"{i:03d}.png")
    print(f"wrote {len(images)} images ({images[0].shape[1]}x{images[0].shape[0]}) to {args.out} (served by {args.url})")


def remote_reconstruct(args) -> None:
    import PIL.Image

    from vilex.cli import output_names
    from vilex.outputs import atomic_folder

    from .client import map_concurrently

    paths = remote_args(args, takes_images=True)
    encoded = read_image_files(paths)
    results = map_concurrently(args.url, args.protocol,
                               lambda c, image: c.reconstruct([image], num_tokens=args.tokens, prompt=args.prompt,
                                                              steps=args.steps, guidance=args.guidance,
                                                              seed=args.seed)[0],
                               encoded, workers=len(encoded))
    with atomic_folder(args.out) as staging:
        for name, image in zip(output_names(paths), results):
            PIL.Image.fromarray(image).save(staging / name)
    print(f"wrote {len(results)} reconstructions ({results[0].shape[1]}x{results[0].shape[0]}) to {args.out} "
          f"(served by {args.url})")

