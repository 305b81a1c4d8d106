"""`vilex train`: the command line of the trainer.

    vilex train CKPT --data DIR --out RUN_DIR [options]
    vilex train --resume RUN_DIR [--num-workers N ...]

Options default to None on the parser so that a resumed run can tell which ones were given: those
fall back to TrainConfig's defaults for a new run, and must match the saved run (or be among the
harmless ones) for a resumed one.

Ctrl-C stops a run with exit code 130 and says where it can resume from (no traceback).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from ..errors import ViLexUsageError
from ..toyworld.shipped import checkpoint_argument

# (flag, TrainConfig field, type, help); booleans are flags (with --no-X for the ones on by default)
VALUE_OPTIONS = (
    ("--max-steps", "max_steps", int, "optimizer steps (default 10000)"),
    ("--batch-size", "batch_size", int, "images per process and micro-batch (default 8)"),
    ("--gradient-accumulation-steps", "gradient_accumulation_steps", int, "micro-batches per optimizer step (default 1)"),
    ("--pooler-lr", "pooler_lr", float, "learning rate of the attention pooler (default 3e-4)"),
    ("--vision-lr", "vision_lr", float, "learning rate of the vision encoder with --train-vision (default 1e-5)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on weight matrices (default 0.01)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps before the cosine decay, 0..max-steps "
                                            "(default: 5%% of --max-steps, at most 500)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm, 0 = off (default 1.0)"),
    ("--mixed-precision", "mixed_precision", str, "no | bf16 | fp16 (fp16 needs CUDA; default no)"),
    ("--ema-decay", "ema_decay", float, "EMA decay with --ema (default 0.9999)"),
    ("--snr-gamma", "snr_gamma", float, "min-SNR loss weighting gamma, e.g. 5.0 (default off)"),
    ("--taildrop-prob", "taildrop_prob", float, "probability that TailDrop shortens a sample (default: the checkpoint's)"),
    ("--caption-prob", "caption_prob", float, "share of captioned samples trained as ViLex + text (default 0.5)"),
    ("--caption-word-drop", "caption_word_drop", float, "drop each word of a caption trained beside the tokens "
                                                        "with this probability, at least one word kept, the "
                                                        "rest in order (default 0: the whole caption)"),
    ("--edit-prob", "edit_prob", float, "share of samples with an edit (name.edit.png + name.edit.txt beside "
                                        "name.png) trained as the edit: the tokens of name.edit.png + its words "
                                        "re-create name.png (default 0)"),
    ("--mix-adapter", "mix_adapter", int, "train only a mixing adapter of this hidden width (e.g. 256), which the "
                                          "tokens pass through when words stand beside them; the encoder stays "
                                          "frozen (default 0: none)"),
    ("--resolution", "resolution", int, "VAE input size in pixels (default: the UNet's native size)"),
    ("--num-workers", "num_workers", int, "data loader worker processes (default 2); with shards each is a reader "
                                          "of its own shards"),
    ("--shuffle-buffer", "shuffle_buffer", int, "shards: samples each reader shuffles among, 0 = shard order "
                                                "(default 1000)"),
    ("--image-column", "image_column", str, "parquet: the column of encoded images, binary or {bytes, path} "
                                            "(default image)"),
    ("--caption-column", "caption_column", str, "parquet: the caption column (default: text, else caption, else "
                                                "none)"),
    ("--seed", "seed", int, "seed of data order, noise, timesteps and TailDrop (default 0)"),
    ("--holdout", "holdout", int, "images kept out of training for the preview grids (default 4)"),
    ("--preview-every", "preview_every", int, "steps between preview grids, 0 = only at the end (default 1000)"),
    ("--preview-steps", "preview_steps", int, "denoising steps of the previews (default 25)"),
    ("--preview-guidance", "preview_guidance", float, "guidance scale of the previews (default 7.5)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints, 0 = only at the end (default 1000)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "newest checkpoints kept, 0 = all (default 2)"),
    ("--log-every", "log_every", int, "steps per metrics.jsonl line (default 10)"),
)
FLAG_OPTIONS = (
    ("--train-vision", "train_vision", True, "train the vision encoder too (at --vision-lr)"),
    ("--gradient-checkpointing", "gradient_checkpointing", True, "recompute the frozen UNet's and text encoder's activations"),
    ("--ema", "ema", True, "keep an EMA of the trainable weights; the final pipeline gets the EMA weights"),
    ("--no-taildrop", "taildrop", False, "train with all N tokens always"),
    ("--random-crop", "random_crop", True, "random instead of centre crops"),
    ("--random-flip", "random_flip", True, "random horizontal flips"),
    ("--mix-adapter-words", "mix_adapter_words", True, "the mixing adapter also reads the words beside the tokens "
                                                       "(the mean of their embeddings), so it can rewrite what "
                                                       "they ask for"),
    ("--no-progress", "progress", False, "no progress bar"),
    ("--cpu", "cpu", True, "train on the CPU even when a GPU is there"),
    ("--log-samples", "log_samples", True, "write RUN_DIR/samples/rank-R.jsonl: the key of every sample each "
                                           "process consumed, per step"),
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a ViLex checkpoint on images (a folder, WebDataset shards, "
                                            "parquet)",
                              description="Train the ViLex pooler (and optionally the vision encoder) through the "
                                          "frozen diffusion model. Multi-GPU: accelerate launch -m vilex.cli train ...")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None, type=checkpoint_argument,
                   help="a ViLex checkpoint folder (`vilex init`), or 'toy' for the shipped toy checkpoint")
    p.add_argument("--data", metavar="DATA", default=None,
                   help="folder of .jpg/.jpeg/.png/.webp images (recursive; name.txt captions), or shards streamed "
                        "from a .tar/.parquet file or pattern: 'shards/{000000..000999}.tar' (WebDataset: KEY.jpg "
                        "+ KEY.txt), 'data/*.parquet' (an image-bytes column, an optional caption column)")
    p.add_argument("--out", metavar="RUN_DIR", default=None, help="RUN_DIR: a new or empty folder for checkpoints, metrics, previews")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    for flag, name, kind, help_text in VALUE_OPTIONS:
        p.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    for flag, name, value, help_text in FLAG_OPTIONS:
        p.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=help_text)
    p.set_defaults(func=cmd_train)


def given_options(args) -> dict:
    names = [name for _, name, _, _ in VALUE_OPTIONS] + [name for _, name, _, _ in FLAG_OPTIONS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def flag_of(name: str) -> str:
    for flag, field_name, *_ in VALUE_OPTIONS + FLAG_OPTIONS:
        if field_name == name:
            return flag
    return f"--{name.replace('_', '-')}"


def new_run_config(args):
    """The TrainConfig of a new run: the options given, TrainConfig's defaults for the rest (so without
    --warmup-steps the warmup is 5% of --max-steps, at most 500)."""
    from .config import TrainConfig

    missing = [name for name, value in (("CKPT", args.ckpt), ("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise ViLexUsageError(f"missing {', '.join(missing)}: use `vilex train CKPT --data DATA --out RUN_DIR` "
                              f"or `vilex train --resume RUN_DIR`")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(checkpoint=args.ckpt, data=args.data, out=args.out,
                       **{k: v for k, v in given_options(args).items() if k in known})


def cmd_train(args) -> None:
    from .config import RESUME_OVERRIDABLE, load_run_config
    from .trainer import resume, train

    options = given_options(args)
    if args.resume:
        if args.ckpt or args.data or args.out:
            raise ViLexUsageError("--resume RUN_DIR continues a run with its own CKPT, --data and --out; give none of them")
        saved = load_run_config(args.resume)
        changed = {k: v for k, v in options.items() if getattr(saved, k) != v}
        fixed = [k for k in changed if k not in RESUME_OVERRIDABLE]
        if fixed:
            details = ", ".join(f"{flag_of(k)} {changed[k]} (run: {getattr(saved, k)})" for k in fixed)
            raise ViLexUsageError(f"--resume keeps the run's options; these differ: {details}. Only "
                                  f"{', '.join(flag_of(k) for k in RESUME_OVERRIDABLE)} may change")
        run_dir = args.resume
    else:
        config = new_run_config(args)
        run_dir = config.out
    try:
        result = resume(run_dir, **changed) if args.resume else train(config)
    except KeyboardInterrupt:
        report_interrupted(run_dir)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process reports
        return
    print(f"trained {result.steps} steps: final loss {result.final_loss:.4f}, {result.images_per_s:.1f} images/s")
    if result.unreadable:
        first = next(iter(result.unreadable.items()))
        print(f"skipped {len(result.unreadable)} unreadable image files (e.g. {first[0]}: {first[1]}); "
              f"all are listed in {result.run_dir / 'report.json'}")
    else:
        print("skipped 0 unreadable image files")
    if result.captions_too_long:
        print(f"{result.captions_too_long} samples had captions too long to fit beside a ViLex token and were trained without text")
    print(f"wrote ViLex pipeline {result.pipeline} (use it as CKPT with any vilex command)")


def report_interrupted(run_dir) -> None:
    """After Ctrl-C: where the run can go on from, and the command that does it (instead of a traceback).
    Checkpoints are written atomically, so the newest complete one is what a resume starts from."""
    from accelerate import PartialState

    from .checkpoint import list_checkpoints
    from .config import CONFIG_FILE

    if not PartialState().is_main_process:  # under `accelerate launch`, one process reports
        return
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, folder = checkpoints[-1]
        where = f"the last checkpoint is {folder} (step {step})"
    elif (run_dir / CONFIG_FILE).is_file():
        where = f"{run_dir} has no checkpoint yet, so a resume starts it over from step 0"
    else:
        print(f"vilex train: interrupted before {run_dir} was set up: nothing to resume; run the same command again",
              file=sys.stderr)
        return
    print(f"vilex train: interrupted; {where}. Resume with: vilex train --resume {shlex.quote(str(run_dir))}",
          file=sys.stderr)
