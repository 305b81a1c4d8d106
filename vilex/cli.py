"""The `vilex` command line. Usage errors print one line and exit with code 2.

tokenize, generate and reconstruct check their arguments in the order that costs least: the flags against
the rules of every checkpoint (vilex/settings.py), then the input files (images, tokens, --out), and only
then open the pipeline, whose own bounds (N tokens, the sizes, the prompt's room) are checked before it runs.
Every error names the flag as typed: a server's, which names its inputs (NUM_TOKENS[0], HEIGHT[0]), too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .errors import ViLexUsageError, check_range
from .toyworld.shipped import checkpoint_argument

from . import settings
from .settings import (DEFAULT_GUIDANCE, DEFAULT_ORDER, DEFAULT_SERVED_MAX_STEPS, DEFAULT_STEPS, MAX_SIDE, MAX_STEPS,
                       MAX_VILEX_TOKENS, ORDERS)


# ---- shared helpers -------------------------------------------------------------------------------
BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="torch", help=f"how stages run: {', '.join(BACKENDS)}")
    parser.add_argument("--engines", default=None,
                        help="export folder (engines/NAME) for --backend onnxruntime/tensorrt; CKPT is then optional "
                             "and only checked against the checkpoint the folder was exported from")
    parser.add_argument("--url", default=None, help="HOST:PORT of a `vilex serve` server, for --backend triton (no CKPT then)")
    parser.add_argument("--protocol", default="http", choices=("http", "grpc"), help="with --backend triton (default http)")


class IntermixedArgumentParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options between its positionals (`vilex reconstruct CKPT a.png --tokens 4
    b.png`): argparse's parse_known_intermixed_args wherever the parser is asked to parse, which is how the
    subparsers action calls it. A parser with subcommands of its own (`vilex toyworld`) parses as usual, since
    argparse cannot intermix those."""

    _parsing = False  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.12)

    def parse_known_args(self, args=None, namespace=None):
        nested = any(action.nargs in (argparse.PARSER, argparse.REMAINDER) for action in self._get_positional_actions())
        if self._parsing or nested:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


# The served inputs a server's error names (vilex/serving/interface.py), as the flags they come from. Every image
# is a request of its own, so the row (NUM_TOKENS[0]) says nothing to the user and goes.
SERVED_INPUT_FLAGS = {"NUM_TOKENS": "--tokens", "PROMPT": "--prompt", "NEGATIVE_PROMPT": "--negative-prompt",
                      "STEPS": "--steps", "GUIDANCE": "--guidance", "TEXT_GUIDANCE": "--text-guidance",
                      "ORDER": "--order", "HEIGHT": "--height", "WIDTH": "--width", "SEED": "--seed"}


def with_flag_names(message: str, command: str) -> str:
    """A served error's message in the words of `vilex COMMAND`: `HEIGHT[0] must be ...` -> `--height must be ...`."""
    if command == "generate":  # its --tokens is the tokens file: fewer tokens are made by `vilex tokenize --tokens`
        message = re.sub(r"NUM_TOKENS\[\d+\] <= (\d+)", r"make the tokens with `vilex tokenize --tokens \1`", message)
    return re.sub(r"\b(" + "|".join(SERVED_INPUT_FLAGS) + r")\[\d+\]", lambda m: SERVED_INPUT_FLAGS[m.group(1)],
                  message)


def split_positionals(args, takes_images: bool) -> tuple[str | None, list[str]]:
    """(CKPT or None, IMAGE paths). CKPT is the first positional when it is a folder ('toy' already resolved to
    the shipped one by the parser); with --backend torch it is required, with --engines optional, with
    --backend triton refused (open_pipeline says so)."""
    positionals = [p for p in [args.ckpt] + list(getattr(args, "images", None) or []) if p is not None]
    ckpt = None
    if args.backend == "torch" or (positionals and Path(positionals[0]).is_dir()):
        if not positionals:
            raise ViLexUsageError("CKPT is required (a checkpoint folder, or 'toy' for the shipped toy checkpoint; "
                                  "only --engines and --backend triton go without)")
        ckpt, positionals = positionals[0], positionals[1:]
    if takes_images and not positionals:
        raise ViLexUsageError("give at least one IMAGE" + (" after CKPT" if ckpt else ""))
    if not takes_images and positionals:
        raise ViLexUsageError(f"unexpected argument '{positionals[0]}' (generate takes CKPT only, or nothing with "
                              f"--engines / --backend triton)")
    return ckpt, positionals


def open_command_pipeline(args, ckpt: str | None):
    """The pipeline the command runs, local or served: one object with one surface."""
    from .runtime import open_pipeline

    stream = getattr(args, "stream", False)
    if stream and args.backend != "triton":
        raise ViLexUsageError(f"--stream needs --backend triton (it streams a server's progress; --backend "
                              f"{args.backend} shows its progress bar without it)")
    pipeline = open_pipeline(ckpt, args.backend, engines=args.engines, url=args.url, protocol=args.protocol)
    # RemotePipeline.streaming() refuses --protocol http, naming --protocol.
    return pipeline.streaming() if stream else pipeline


def check_tokens_flag(args) -> int | None:
    """--tokens K of tokenize and reconstruct, before anything is loaded: 1..MAX_VILEX_TOKENS, the most any
    checkpoint has (its own N is checked once the pipeline is open, or by the server)."""
    if args.tokens is not None:
        check_range("--tokens", args.tokens, 1, MAX_VILEX_TOKENS)
    return args.tokens


def load_images(paths: list[str]):
    from .images import load_image

    return [load_image(p) for p in paths]


def check_generation_args(args) -> None:
    """The generation flags against the rules every checkpoint shares, before anything is loaded."""
    settings.check_steps(args.steps, "--steps")
    settings.check_guidance(args.guidance, "--guidance")
    settings.check_text_guidance(args.text_guidance, "--text-guidance")
    settings.check_seed(args.seed, "--seed")
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if side is not None:  # the multiple and an export's bounds are the checkpoint's: check_pipeline_args
            check_range(flag, side, 1, MAX_SIDE)
    if args.text_guidance is not None and not args.prompt:
        raise ViLexUsageError("--text-guidance needs --prompt (text-free guidance guides from the ViLex tokens "
                              "alone to the ViLex tokens and the prompt)")
    if args.negative_prompt and args.guidance <= 1.0:
        raise ViLexUsageError(f"--negative-prompt needs --guidance > 1 (it replaces the empty prompt of "
                              f"classifier-free guidance, which --guidance {args.guidance:g} turns off)")


def check_pipeline_args(args, pipeline, num_tokens: int) -> None:
    """The flags against the opened pipeline's own bounds, before it runs: --tokens in 1..N, --height and --width
    on its pixel multiple within its backend's bounds, and --prompt with room beside `num_tokens` ViLex tokens. A
    served pipeline knows none of these: its server checks them, and its errors name the same flags
    (with_flag_names)."""
    if pipeline.num_queries is None:  # served
        return
    from .pipeline import check_prompt_fits

    if getattr(args, "tokens", None) is not None and args.command != "generate":
        settings.check_num_tokens(args.tokens, pipeline.num_queries, "--tokens")
    if args.command == "tokenize":
        return
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if side is not None:
            settings.check_side(side, pipeline.size_multiple, flag, *pipeline.backend.side_range(flag[2:]))
    fewer = "make the tokens with `vilex tokenize --tokens {}`" if args.command == "generate" else "--tokens <= {}"
    check_prompt_fits(pipeline.prompt_builder, args.prompt, num_tokens, name="--prompt", fewer=fewer)
    check_prompt_fits(pipeline.prompt_builder, args.negative_prompt, 0, name="--negative-prompt")


def generation_kwargs(args) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                text_guidance_scale=args.text_guidance, order=args.order, height=args.height, width=args.width,
                seed=args.seed)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=None, help="text mixed with the ViLex tokens")
    parser.add_argument("--negative-prompt", default=None,
                        help="text in place of the empty prompt of classifier-free guidance (needs --guidance > 1)")
    parser.add_argument("--order", default=DEFAULT_ORDER, choices=ORDERS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"denoising steps, 1..{MAX_STEPS} (default {DEFAULT_STEPS}); a server takes at most its "
                             f"repository's --max-steps (default {DEFAULT_SERVED_MAX_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale, 0..100 (<= 1: off; default {DEFAULT_GUIDANCE})")
    parser.add_argument("--text-guidance", type=float, default=None,
                        help="text-free guidance weight when --prompt is given, 0..100")
    sides = (f"a multiple of the checkpoint's pixel step, which is the VAE's down-scaling times the UNet's (16 for "
             f"the toy checkpoint, 64 for Stable Diffusion 1.x/2.x), up to {MAX_SIDE}; with --engines or a server, "
             f"within the export's bounds (by default half to twice the native size)")
    parser.add_argument("--height", type=int, default=None,
                        help=f"output height in pixels (default: the checkpoint's native size): {sides}")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels: the same rule as --height")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial-noise seed, 0..2^63-1 (default 0). Every image draws its noise from a generator "
                             "of its own seeded with it, so an image comes out the same alone or with other images, "
                             "on every --backend")
    add_backend_args(parser)
    parser.add_argument("--stream", action="store_true",
                        help="with --backend triton --protocol grpc: stream the server's progress (a progress bar) "
                             "through its streaming models; the images are the same")


# ---- commands ---------------------------------------------------------------------------------------
def cmd_init(args) -> None:
    from .outputs import atomic_folder
    from .presets import build_preset, from_local

    if args.preset and args.base:
        raise ViLexUsageError("give either --preset or --base/--vision, not both")
    if Path(args.out).exists():  # atomic_folder refuses it too, but only once the model is built
        raise ViLexUsageError(f"OUT '{args.out}' already exists; choose a new folder")
    if args.base or args.vision:
        if not (args.base and args.vision):
            raise ViLexUsageError("--base SD_DIR needs --vision VISION_DIR (and the other way round)")
        num_queries = MAX_VILEX_TOKENS if args.num_queries is None else args.num_queries
        check_range("--num-queries", num_queries, 1, MAX_VILEX_TOKENS)  # before the folders load
        pipeline = from_local(args.base, args.vision, num_queries=num_queries, seed=args.seed)
    else:
        if args.num_queries is not None:  # a preset's N is its own
            raise ViLexUsageError("--num-queries is for --base/--vision; a --preset has its own token count")
        pipeline = build_preset(args.preset or "tiny", seed=args.seed)
    with atomic_folder(args.out, must_be_new=True) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote ViLex checkpoint {args.out} ({size / 1e6:.1f} MB, {pipeline.num_queries} queries)")


def cmd_tokenize(args) -> None:
    from .outputs import check_tokens_out, save_tokens

    k = check_tokens_flag(args)
    check_tokens_out(args.out)  # a new .safetensors file, before anything loads
    ckpt, paths = split_positionals(args, takes_images=True)
    images = load_images(paths)  # a missing or unreadable image is reported before the model loads
    pipeline = open_command_pipeline(args, ckpt)
    check_pipeline_args(args, pipeline, k)
    vilex_tokens = pipeline.tokenize(images, num_tokens=k)
    source = {"checkpoint": str(args.ckpt)} if args.backend != "triton" else {"server": f"{args.protocol}://{args.url}"}
    save_tokens(args.out, vilex_tokens, {"images": [str(p) for p in paths], "num_tokens": int(vilex_tokens.shape[1]),
                                         **source})
    print(f"wrote {tuple(vilex_tokens.shape)} ViLex tokens to {args.out}")


def cmd_generate(args) -> None:
    from .outputs import atomic_folder, load_tokens

    check_generation_args(args)
    vilex_tokens = load_tokens(args.tokens)  # (B, k, D)
    ckpt, _ = split_positionals(args, takes_images=False)
    pipeline = open_command_pipeline(args, ckpt)
    if pipeline.num_queries is not None:  # local: the file's tokens against this checkpoint (served: the server)
        check_range(f"the ViLex tokens per image in --tokens '{args.tokens}'", vilex_tokens.shape[1], 1,
                    pipeline.num_queries)
    check_pipeline_args(args, pipeline, vilex_tokens.shape[1])
    images = pipeline.generate(vilex_tokens, prompt=args.prompt, **generation_kwargs(args)).images
    with atomic_folder(args.out) as staging:
        for i, image in enumerate(images):
            image.save(staging / f"{i:03d}.png")
    print(f"wrote {len(images)} images ({images[0].width}x{images[0].height}) to {args.out}")


def cmd_reconstruct(args) -> None:
    from .outputs import atomic_folder, output_names

    check_generation_args(args)
    k = check_tokens_flag(args)
    ckpt, paths = split_positionals(args, takes_images=True)
    images = load_images(paths)  # a missing or unreadable image is reported before the model loads
    pipeline = open_command_pipeline(args, ckpt)
    check_pipeline_args(args, pipeline, k or pipeline.num_queries)
    result = pipeline(images, num_tokens=k, prompt=args.prompt, **generation_kwargs(args)).images
    with atomic_folder(args.out) as staging:
        for name, image in zip(output_names(paths), result):
            image.save(staging / name)
    tokens = f"{k or pipeline.num_queries or 'all'} tokens"
    print(f"wrote {len(result)} reconstructions ({result[0].width}x{result[0].height}, {tokens}) to {args.out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out=Path(args.out), cache=Path(args.cache), steps=args.steps, checkpoint=args.checkpoint,
             eval_images=args.eval_images)


# Commands that live with their own part of the project: each module has `add_parser(subparsers)`,
# which registers the subcommand and sets `func`.
COMMAND_MODULES: tuple[str, ...] = ("vilex.export.cli", "vilex.benchmarks.cli", "vilex.serving.cli",
                                   "vilex.training.cli", "vilex.toyworld.cli",
                                   "vilex.evaluation.cli",
                                   "vilex.scale.cli")


# ---- parser -------------------------------------------------------------------------------------------
def add_image_positionals(p: argparse.ArgumentParser, tokens_help: str) -> None:
    """[CKPT] IMAGE... --out --tokens, as tokenize and reconstruct take them."""
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None, type=checkpoint_argument,
                   help="checkpoint folder, or 'toy' for the shipped toy checkpoint (optional with --engines, none "
                        "with --backend triton: then every positional is an IMAGE)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=None, help=tokens_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilex", description="ViLex: images as visual words for a frozen text-to-image model")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedArgumentParser)

    p = sub.add_parser("init", help="make a new, untrained ViLex checkpoint")
    p.add_argument("out")
    p.add_argument("--preset", choices=("toy", "tiny", "small", "sd15"), default=None,
                   help="built-in preset (default tiny); toy is the shipped trained toy-world checkpoint")
    p.add_argument("--base", default=None, help="local Stable Diffusion 1.x/2.x folder (diffusers layout)")
    p.add_argument("--vision", default=None, help="local transformers vision model folder (SigLIP, CLIP)")
    p.add_argument("--num-queries", type=int, default=None,
                   help=f"with --base/--vision: the maximum token count N, 1..{MAX_VILEX_TOKENS} (default {MAX_VILEX_TOKENS})")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("tokenize", help="images -> ViLex tokens (.safetensors)")
    add_image_positionals(p, tokens_help=f"keep the first K tokens, 1..N (N: the checkpoint's, at most "
                                         f"{MAX_VILEX_TOKENS}; default N)")
    add_backend_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", help="ViLex tokens (+ text) -> images")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None, type=checkpoint_argument,
                   help="checkpoint folder, or 'toy' for the shipped toy checkpoint (optional with --engines, "
                        "none with --backend triton)")
    p.add_argument("--tokens", required=True, help="a .safetensors file from `vilex tokenize`")
    p.add_argument("--out", required=True)
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reconstruct", help="images -> tokens -> images")
    add_image_positionals(p, tokens_help=f"use the first K tokens, 1..N (N: the checkpoint's, at most "
                                         f"{MAX_VILEX_TOKENS}; default N). With --prompt, K and the prompt's text "
                                         f"tokens share the text encoder's {MAX_VILEX_TOKENS} places: pass a K "
                                         f"that leaves room (the error says the largest)")
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
        from .serving.client import ServedRequestError

        message = with_flag_names(str(error), args.command) if isinstance(error, ServedRequestError) else str(error)
        print(f"vilex {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
