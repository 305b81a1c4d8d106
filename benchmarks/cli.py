"""`vilex bench`: latency and throughput per stage and end to end, on every available backend; `vilex stress`:
hostile input, soak and overload against a running `vilex serve` (benchmarks/stress.py)."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
from pathlib import Path

from vilex import settings as generation_settings
from vilex.errors import ViLexUsageError, check_range
from vilex.settings import DEFAULT_STEPS
from vilex.toyworld.shipped import checkpoint_argument

STRESS_PARTS = ("hostile", "soak", "overload")  # as benchmarks/stress.py runs them; here to keep the parser cheap


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_parser(subparsers) -> None:
    from . import ALL_BACKENDS

    p = subparsers.add_parser("bench", help="measure latency/throughput per stage and end to end on each backend")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None, type=checkpoint_argument,
                   help="a ViLex checkpoint folder, or 'toy' for the shipped toy checkpoint (default: --preset)")
    p.add_argument("--preset", default="small", choices=("tiny", "small", "sd15"), help="preset to measure without CKPT")
    p.add_argument("--backends", default="torch,onnxruntime", help=f"comma-separated, from: {', '.join(ALL_BACKENDS)}")
    p.add_argument("--engines", default=None, help="an export folder of CKPT (default: export into OUT/engines)")
    from vilex.engines.contract import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="export precision when exporting")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 2, 4), help="image batch sizes for the stages")
    p.add_argument("--stages", default=None, help="comma-separated stages to measure (default: all four; empty: none)")
    p.add_argument("--tokens", type=int, default=16, help="ViLex tokens end to end")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps end to end (default {DEFAULT_STEPS}, as vilex generate and the server)")
    p.add_argument("--e2e-batch", type=int, default=1, help="images per end-to-end request")
    p.add_argument("--no-e2e", action="store_true", help="skip end-to-end measurements")
    p.add_argument("--concurrency", type=int_list, default=(1, 2, 4), help="Triton concurrency sweep")
    p.add_argument("--unet", default=None,
                   help="Triton UNet placements to measure, comma-separated from bls, local (default: the repository's "
                        "default); each gets its own repository and server")
    p.add_argument("--window", type=float, default=0.5, help="seconds per measurement window (stages)")
    p.add_argument("--stability", type=float, default=0.10, help="windows agree within this fraction")
    p.add_argument("--compare", action="store_true", help="print latency ratios between backends")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots")
    p.add_argument("--cache", default=os.environ.get("VILEX_CACHE", str(Path.home() / ".cache" / "vilex")))
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("stress", help="hostile input, soak and overload against a running `vilex serve` (loopback)")
    p.add_argument("url", metavar="URL", help="HOST:PORT of the server's HTTP or gRPC port, on loopback")
    p.add_argument("--protocol", default="both", choices=("http", "grpc", "both"))
    p.add_argument("--parts", default=",".join(STRESS_PARTS), help=f"comma-separated, from {', '.join(STRESS_PARTS)}")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds the whole run may take (default 1800)")
    p.add_argument("--concurrency", type=int, default=8, help="soak client threads (default 8)")
    p.add_argument("--requests", type=int, default=200, help="soak requests after the warm-up (default 200)")
    p.add_argument("--warmup", type=int, default=None, help="soak warm-up requests (default: max(2 C, N/10))")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of soak requests (default 2)")
    p.add_argument("--overload-steps", type=int, default=None,
                   help="denoising steps of overload requests, long enough to fill the queue (default min(20, max_steps))")
    p.add_argument("--quick", action="store_true", help="leave out the hostile cases that cost seconds of server "
                   "time, and send the batched ones over the first protocol only")
    p.add_argument("--server-pid", type=int, default=None, help="tritonserver's pid (default: found by URL's port)")
    p.add_argument("--repository", default=None, help="the model repository, to read config.pbtxt (default: the server's)")
    p.add_argument("--admin-key", default=os.environ.get("VILEX_TRITON_ADMIN_KEY"),
                   help="read the model config over the restricted API instead (default: $VILEX_TRITON_ADMIN_KEY)")
    p.add_argument("--out", default="stress-results", help="folder for results.json and results.md")
    p.set_defaults(func=cmd_stress)


def cmd_bench(args) -> None:
    from vilex.stages import STAGE_NAMES

    from . import ALL_BACKENDS
    from .runner import BenchSettings
    from .suite import run_bench

    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown or not backends:
        raise ViLexUsageError(f"--backends must be a comma-separated list from {', '.join(ALL_BACKENDS)}, got {args.backends!r}")
    stages = STAGE_NAMES if args.stages is None else tuple(s for s in args.stages.split(",") if s)
    if any(s not in STAGE_NAMES for s in stages):
        raise ViLexUsageError(f"--stages must be from {', '.join(STAGE_NAMES)}, got {args.stages!r}")
    check_range("--tokens", args.tokens, 1, 75)
    generation_settings.check_steps(args.steps, "--steps")
    check_range("--e2e-batch", args.e2e_batch, 1, generation_settings.MAX_IMAGES_PER_PROMPT)
    check_range("--window", args.window, 0)
    if not 0 < args.stability < 1 or args.window < 0:
        raise ViLexUsageError(f"--stability must be in (0, 1) and --window >= 0, got {args.stability}, {args.window}")
    unet = None
    if args.unet is not None:
        from vilex.serving.config import UNET_PLACEMENTS

        unet = tuple(dict.fromkeys(u for u in args.unet.split(",") if u))
        if not unet or any(u not in UNET_PLACEMENTS for u in unet):
            raise ViLexUsageError(f"--unet must be a comma-separated list from {', '.join(UNET_PLACEMENTS)}, got {args.unet!r}")
    settings = BenchSettings(batch_sizes=args.batch_sizes, num_tokens=args.tokens, steps=args.steps,
                             e2e_batch=args.e2e_batch, stages=stages, end_to_end=not args.no_e2e,
                             window_s=args.window, stability=args.stability)
    command = "vilex " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("vilex") else \
        "vilex bench ..."
    # SIGTERM (`timeout`, kill) and SIGHUP (a closed terminal) end the run as Ctrl-C does, so that the tritonserver
    # it started is stopped on the way out. Python's default for them ends the process on the spot, and the
    # server, in a session of its own that the terminal's signals do not reach, kept running beside whatever was
    # measured next.
    # A signal the caller ignores (SIGHUP under `nohup`) stays ignored.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        run_bench(ckpt=args.ckpt, preset=args.preset, cache=Path(args.cache), backends=backends, settings=settings,
                  out=Path(args.out), engines=Path(args.engines) if args.engines else None, precision=args.precision,
                  concurrency=args.concurrency, compare=args.compare, command=command,
                  date=datetime.date.today().isoformat(), unet=unet)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def cmd_stress(args) -> None:
    from .stress import run_stress

    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in STRESS_PARTS for p in parts):
        raise ViLexUsageError(f"--parts must be a comma-separated list from {', '.join(STRESS_PARTS)}, got {args.parts!r}")
    check_range("--duration", args.duration, 1, 86400)
    check_range("--concurrency", args.concurrency, 1, 256)
    check_range("--requests", args.requests, 1, 1_000_000)
    check_range("--steps", args.steps, 1, 1000)
    if args.warmup is not None:
        check_range("--warmup", args.warmup, 0, 1_000_000)
    if args.overload_steps is not None:
        check_range("--overload-steps", args.overload_steps, 1, 1000)
    protocols = ["http", "grpc"] if args.protocol == "both" else [args.protocol]
    # As typed (`vilex stress ...` or `python -m vilex.cli stress ...`): the report says how it was made.
    command = "vilex " + shlex.join(sys.argv[1:]) if "stress" in sys.argv[1:2] else "vilex stress ..."
    report = run_stress(args.url, protocols, parts, Path(args.out), duration_s=args.duration, concurrency=args.concurrency,
                        requests=args.requests, steps=args.steps, warmup=args.warmup, overload_steps=args.overload_steps,
                        server_pid=args.server_pid, repository=args.repository, admin_key=args.admin_key,
                        quick=args.quick, command=command)
    if not report["passed"]:
        raise SystemExit(1)
