"""`vilex tokenize-dataset [CKPT] INPUT --out OUT`: a dataset's images -> ViLex tokens in parquet shards, on Ray Data.

Flags are checked in the order that costs least: their ranges, then Ray's presence, INPUT, the checkpoint or
export, and OUT, all before Ray starts. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import os

from vilex.errors import ViLexUsageError, check_range

from .inputs import FORMATS

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize-dataset", help="a dataset's images -> ViLex tokens in parquet shards, on Ray Data (needs vilex[scale])",
        usage="vilex tokenize-dataset [CKPT] INPUT --out OUT [--engines DIR] [options]",
        description="Tokenize an image folder, parquet files or WebDataset shards on Ray Data: one actor per device "
                    "holds the encoder; the tokens go to parquet shards in OUT. A rerun skips the images OUT holds. "
                    "See docs/scale.md.")
    p.add_argument("paths", nargs="+", metavar="[CKPT] INPUT",
                   help="CKPT: a checkpoint folder, or 'toy' for the shipped toy checkpoint (optional with "
                        "--engines); INPUT: a folder of images (recursive), a .parquet file, a folder of them or a "
                        "brace pattern, or WebDataset .tar shards (a folder, or a pattern such as "
                        "'shards/{000000..000009}.tar')")
    p.add_argument("--out", required=True, help="the output folder (created; a rerun on it skips what is done)")
    p.add_argument("--engines", default=None,
                   help="an export folder (engines/NAME): the actors run its graphs on --backend onnxruntime "
                        "(default with --engines) or tensorrt; CKPT is then optional and only checked against it")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="how the encoder runs: torch (default; CKPT's weights), onnxruntime or tensorrt (--engines)")
    p.add_argument("--tokens", type=int, default=None, help="keep the first K tokens, 1..N (default N)")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="what INPUT holds: auto (default: the one kind of file found), images, parquet or webdataset")
    p.add_argument("--image-column", default=None,
                   help="parquet: the column of encoded images, binary or Hugging Face's {bytes, path} struct "
                        "(default image); webdataset: the image member's extension (default: the first of png, jpg, "
                        "jpeg, webp, bmp, gif, tif, tiff in the sample)")
    p.add_argument("--id-column", default=None,
                   help="parquet: a column that identifies each row, written as its key (default: the SHA-256 of "
                        "the image bytes)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call in each actor (default 32)")
    p.add_argument("--actors", type=int, default=None,
                   help="tokenizer actors (default: one per GPU of the Ray cluster, num_gpus=1 each; 1 without GPUs)")
    p.add_argument("--cpus-per-actor", type=int, default=None,
                   help="CPUs (and PyTorch/onnxruntime threads) per actor (default: 1 with GPUs; without, the "
                        "cluster's CPUs less one for reading and writing, shared by the actors)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (auto, HOST:PORT or ray://HOST:10001; default: RAY_ADDRESS, which "
                        "`ray job submit` sets, else a local Ray is started)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray (default: the cores, or --actors x --cpus-per-actor when "
                        "more, + 1: a slot for reading and writing)")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines (default 10)")
    p.set_defaults(func=cmd_tokenize_dataset)


def job_options(args: argparse.Namespace):
    """The flags -> JobOptions, every range checked (nothing is read or started here)."""
    from ..toyworld.shipped import resolve_checkpoint
    from .tokenize_dataset import JobOptions

    check_range("--batch-size", args.batch_size, 1)
    for flag, value in (("--actors", args.actors), ("--cpus-per-actor", args.cpus_per_actor)):
        if value is not None:
            check_range(flag, value, 1)
    if args.num_cpus is not None:
        if args.address or os.environ.get("RAY_ADDRESS"):
            cluster = "--address" if args.address else "RAY_ADDRESS"
            raise ViLexUsageError(f"--num-cpus is for the local Ray; a cluster ({cluster}) has its own CPUs")
        check_range("--num-cpus", args.num_cpus, 2)  # one for an actor, one for reading and writing
    check_range("--progress-every", args.progress_every, 0.1, 3600)
    if args.tokens is not None:
        check_range("--tokens", args.tokens, 1, 75)  # 1..N once the checkpoint is known
    if len(args.paths) > 2:
        raise ViLexUsageError(f"expected [CKPT] INPUT, got {len(args.paths)} paths (a brace pattern must be quoted)")
    ckpt, data = (args.paths if len(args.paths) == 2 else (None, args.paths[0]))
    ckpt = resolve_checkpoint(ckpt)
    if ckpt is None and args.engines is None:
        raise ViLexUsageError("CKPT is required (a checkpoint folder) before INPUT; only --engines goes without")
    backend = args.backend or ("onnxruntime" if args.engines else "torch")
    options = JobOptions(ckpt=ckpt, engines=args.engines, backend=backend, num_tokens=args.tokens,
                         batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                         address=args.address, num_cpus=args.num_cpus, progress_every=args.progress_every)
    return options, data


def cmd_tokenize_dataset(args: argparse.Namespace) -> None:
    from .inputs import resolve_input
    from .tokenize_dataset import import_ray, tokenize_dataset

    options, data = job_options(args)
    import_ray()
    dataset_input = resolve_input(data, args.format, image_column=args.image_column, id_column=args.id_column)
    tokenize_dataset(dataset_input, args.out, options)
