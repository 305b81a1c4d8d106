"""The `vilex` command line. Usage errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import ViLexUsageError

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


# ---- shared helpers -------------------------------------------------------------------------------
def load_pipeline(ckpt: str):
    import diffusers
    import transformers

    from .pipeline import ViLexPipeline

    # Loading a few-MB checkpoint should not print three progress bars; our own loop keeps its bar.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    pipeline = ViLexPipeline.from_pretrained(ckpt)
    pipeline.set_progress_bar_config(leave=False)
    return pipeline


def make_backend(args, pipeline):
    """The stage backend named by --backend (PyTorch unless asked otherwise).

    onnxruntime and tensorrt run the graphs of the export folder --engines, which must have been
    exported from CKPT (checked by content hash: other graphs would run with this checkpoint's
    tokenizer and embedding table and give wrong images without an error)."""
    from .backends import TorchBackend

    if args.backend not in BACKENDS:
        raise ViLexUsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.backend == "torch":
        return TorchBackend(pipeline)
    if args.backend == "triton":  # whole requests go to the server (vilex/serving/cli.py), not stages
        raise ViLexUsageError("--backend triton runs on a server: it has no local stage backend")
    if not args.engines:
        raise ViLexUsageError(f"--backend {args.backend} needs --engines engines/NAME "
                              f"(make one with `vilex export {args.ckpt} --out engines/NAME`)")
    from .engines.folder import EngineFolder

    engines = EngineFolder.open(args.engines)
    engines.check_source(args.ckpt)
    if args.backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engines)
    from .backends.tensorrt import TensorRTBackend

    return TensorRTBackend(engines)


BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="torch", help=f"how stages run: {', '.join(BACKENDS)}")
    parser.add_argument("--engines", default=None, help="export folder (engines/NAME) for --backend onnxruntime/tensorrt")
    parser.add_argument("--url", default=None, help="HOST:PORT of a `vilex serve` server, for --backend triton (no CKPT then)")
    parser.add_argument("--protocol", default="http", choices=("http", "grpc"), help="with --backend triton (default http)")


def check_positionals(args, takes_images: bool) -> None:
    """CKPT (and IMAGE...) are optional in the parser because --backend triton has no CKPT; locally they are not."""
    if args.ckpt is None:
        raise ViLexUsageError("CKPT is required (a checkpoint folder; only --backend triton goes without)")
    if takes_images and not args.images:
        raise ViLexUsageError("give at least one IMAGE after CKPT")


def load_images(paths: list[str]):
    from .images import load_image

    return [load_image(p) for p in paths]


def output_names(paths: list[str]) -> list[str]:
    """`name.png` per input image; repeated stems get `-2`, `-3`."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


def check_generation_args(args, pipeline) -> None:
    from .errors import check_range

    check_range("--steps", args.steps, 1, 1000)
    check_range("--guidance", args.guidance, 0.0, 100.0)


def generation_kwargs(args) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, text_guidance_scale=args.text_guidance,
                order=args.order, height=args.height, width=args.width, seed=args.seed)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=None, help="text mixed with the ViLex tokens")
    parser.add_argument("--order", default="vilex_first", choices=("vilex_first", "text_first"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps, >= 1 (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale (<= 1: off)")
    parser.add_argument("--text-guidance", type=float, default=None, help="text-free guidance weight when --prompt is given")
    parser.add_argument("--height", type=int, default=None, help="output height in pixels (default: the UNet's size)")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    add_backend_args(parser)


# ---- commands ---------------------------------------------------------------------------------------
def cmd_init(args) -> None:
    from .outputs import atomic_folder
    from .presets import build_preset, from_local

    if args.preset and args.base:
        raise ViLexUsageError("give either --preset or --base/--vision, not both")
    if args.base or args.vision:
        if not (args.base and args.vision):
            raise ViLexUsageError("--base SD_DIR needs --vision VISION_DIR (and the other way round)")
        pipeline = from_local(args.base, args.vision, num_queries=args.num_queries, seed=args.seed)
    else:
        pipeline = build_preset(args.preset or "tiny", seed=args.seed)
    with atomic_folder(args.out, must_be_new=True) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote ViLex checkpoint {args.out} ({size / 1e6:.1f} MB, {pipeline.num_queries} queries)")


def cmd_tokenize(args) -> None:
    from .errors import check_range
    from .outputs import save_tokens

    if args.backend == "triton":
        from .serving.cli import remote_tokenize

        return remote_tokenize(args)
    check_positionals(args, takes_images=True)
    images = load_images(args.images)
    pipeline = load_pipeline(args.ckpt)
    k = pipeline.num_queries if args.tokens is None else args.tokens
    check_range("--tokens", k, 1, pipeline.num_queries)
    pipeline.set_backend(make_backend(args, pipeline))
    vilex_tokens = pipeline.tokenize(images, num_tokens=k)
    save_tokens(args.out, vilex_tokens, {"images": [str(p) for p in args.images], "num_tokens": k,
                                         "checkpoint": str(args.ckpt)})
    print(f"wrote {tuple(vilex_tokens.shape)} ViLex tokens to {args.out}")


def cmd_generate(args) -> None:
    from .outputs import atomic_folder, load_tokens

    if args.backend == "triton":
        from .serving.cli import remote_generate

        return remote_generate(args)
    check_positionals(args, takes_images=False)
    pipeline = load_pipeline(args.ckpt)
    check_generation_args(args, pipeline)
    vilex_tokens = load_tokens(args.tokens)
    pipeline.set_backend(make_backend(args, pipeline))
    images = pipeline.generate(vilex_tokens, prompt=args.prompt, **generation_kwargs(args)).images
    with atomic_folder(args.out) as staging:
        for i, image in enumerate(images):
            image.save(staging / f"{i:03d}.png")
    print(f"wrote {len(images)} images ({images[0].width}x{images[0].height}) to {args.out}")


def cmd_reconstruct(args) -> None:
    from .errors import check_range
    from .outputs import atomic_folder

    if args.backend == "triton":
        from .serving.cli import remote_reconstruct

        return remote_reconstruct(args)
    check_positionals(args, takes_images=True)
    images = load_images(args.images)
    pipeline = load_pipeline(args.ckpt)
    check_generation_args(args, pipeline)
    k = pipeline.num_queries if args.tokens is None else args.tokens
    check_range("--tokens", k, 1, pipeline.num_queries)
    pipeline.set_backend(make_backend(args, pipeline))
    result = pipeline(images, num_tokens=k, prompt=args.prompt, **generation_kwargs(args)).images
    with atomic_folder(args.out) as staging:
        for name, image in zip(output_names(args.images), result):
            image.save(staging / name)
    print(f"wrote {len(result)} reconstructions ({result[0].width}x{result[0].height}, {k} tokens) to {args.out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out=Path(args.out), cache=Path(args.cache), steps=args.steps, checkpoint=args.checkpoint,
             eval_images=args.eval_images)


# Commands that live with their own part of the project: each module has `add_parser(subparsers)`,
# which registers the subcommand and sets `func`.
COMMAND_MODULES: tuple[str, ...] = ("vilex.export.cli", "vilex.benchmarks.cli", "vilex.serving.cli",
                                   "vilex.training.cli", "vilex.toyworld.cli",
                                   "vilex.evaluation.cli")


# ---- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilex", description="ViLex: images as visual words for a frozen text-to-image model")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="make a new, untrained ViLex checkpoint")
    p.add_argument("out")
    p.add_argument("--preset", choices=("toy", "tiny", "small", "sd15"), default=None,
                   help="built-in preset (default tiny); toy is the shipped trained toy-world checkpoint")
    p.add_argument("--base", default=None, help="local Stable Diffusion 1.x/2.x folder (diffusers layout)")
    p.add_argument("--vision", default=None, help="local transformers vision model folder (SigLIP, CLIP)")
    p.add_argument("--num-queries", type=int, default=75, help="maximum token count N, 1..75")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("tokenize", help="images -> ViLex tokens (.safetensors)")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (none with --backend triton: all positionals are images)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=None, help="keep the first K tokens, 1..N (default N)")
    add_backend_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", help="ViLex tokens (+ text) -> images")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None, help="checkpoint folder (none with --backend triton)")
    p.add_argument("--tokens", required=True, help="a .safetensors file from `vilex tokenize`")
    p.add_argument("--out", required=True)
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reconstruct", help="images -> tokens -> images")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (none with --backend triton: all positionals are images)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=None, help="use the first K tokens, 1..N (default N)")
    add_generation_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("demo", help="the main job on the shipped, trained toy checkpoint")
    p.add_argument("--out", default="vilex-demo")
    p.add_argument("--checkpoint", default="toy", choices=("toy", "tiny"),
                   help="toy: the trained toy-world checkpoint (default); tiny: the random preset (fast)")
    p.add_argument("--eval-images", type=int, default=32, help="held-out scenes in the printed fidelity table (default 32)")
    p.add_argument("--cache", default=os.environ.get("VILEX_CACHE", str(Path.home() / ".cache" / "vilex")))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.set_defaults(func=cmd_demo)

    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ViLexUsageError as error:
        print(f"vilex {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
