"""`vilex eval`: the command line of `vilex.evaluation.evaluate`."""

from __future__ import annotations

from ..errors import ViLexUsageError
from ..settings import DEFAULT_GUIDANCE, DEFAULT_STEPS
from ..toyworld.shipped import checkpoint_argument


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _numbers(flag: str, text: str, kind: type = int) -> list:
    """Comma-separated integers (kind int) or numbers (kind float), or an error naming the flag."""
    try:
        return [kind(v) for v in _list(text)]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ViLexUsageError(f"{flag} takes comma-separated {what}, got {text!r}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="measure image -> tokens -> image on held-out inputs (PSNR, SSIM, probe agreement)",
        description="Reconstruct held-out toy scenes (or --images DIR) through each backend and measure them against "
                    "the inputs and against baselines (caption alone, unconditional, random tokens); writes "
                    "results.json, results.md, grid.png and tradeoff.png to --out.")
    p.add_argument("ckpt", metavar="CKPT", type=checkpoint_argument,
                   help="a ViLex checkpoint folder, or 'toy' for the shipped toy checkpoint")
    p.add_argument("--backend", default="torch",
                   help="comma-separated NAME or NAME=WHERE: torch, onnxruntime=ENGINES, tensorrt=ENGINES, "
                        "triton=HOST:PORT (default torch)")
    p.add_argument("--tokens", default="1,4,16,all", help="token counts to reconstruct with (default 1,4,16,all)")
    p.add_argument("--n", type=int, default=200, help="held-out images (default 200)")
    p.add_argument("--images", default=None, help="a folder of images instead of toy scenes (PSNR/SSIM only)")
    p.add_argument("--probe", default=None, help="attribute probe folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps of the main table (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    p.add_argument("--edit-guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"text-free guidance weight of the edit row (default {DEFAULT_GUIDANCE})")
    p.add_argument("--words", action="append", default=[], metavar="TEXT",
                   help="add a row of all tokens + TEXT (the same for every image; text-free guidance "
                        "--edit-guidance), measured against the input: what other words beside the tokens keep; "
                        "repeat for more rows")
    p.add_argument("--sweep-steps", default="10,25,50", help="steps of the trade-off sweep (default 10,25,50)")
    p.add_argument("--sweep-schedulers", default="ddim,dpm++", help="schedulers of the sweep (default ddim,dpm++)")
    p.add_argument("--sweep-guidance", default=None,
                   help="classifier-free guidance scales of the sweep, comma-separated (default: --guidance)")
    p.add_argument("--sweep-n", type=int, default=None,
                   help="images in the sweep, 0 = no sweep (default: 32, or --n when that is smaller)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="ViLex rows only: no caption, unconditional, random-token or edit rows")
    p.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default 50)")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"), help="for triton=HOST:PORT (default http)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="vilex-eval", help="folder for the results (default vilex-eval)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    from .evaluate import EvalConfig, run_eval

    config = EvalConfig(checkpoint=args.ckpt, out=args.out, backends=_list(args.backend), tokens=_list(args.tokens),
                        n=args.n, images=args.images, probe=args.probe, steps=args.steps, guidance=args.guidance,
                        edit_guidance=args.edit_guidance, words=args.words,
                        sweep_steps=_numbers("--sweep-steps", args.sweep_steps),
                        sweep_schedulers=_list(args.sweep_schedulers), sweep_n=args.sweep_n,
                        sweep_guidance=None if args.sweep_guidance is None else _numbers("--sweep-guidance",
                                                                                          args.sweep_guidance, float),
                        batch_size=args.batch_size, seed=args.seed, protocol=args.protocol,
                        baselines=args.baselines)
    run_eval(config)
    print(f"wrote {args.out}/results.json, results.md, grid.png" + (", tradeoff.png" if config.sweep_n else ""))
