"""`vilex toyworld ...`: the miniature world where ViLex is trained and measured on a CPU.

    vilex toyworld make-data DIR [--n 20000] [--split train] [--edits] [--partial-captions]
                                                                 scenes as name.png + name.txt (captions)
    vilex toyworld train-base OUT [--vae-steps ...]              the text-to-image base, from scratch
    vilex toyworld new-vilex BASE OUT [--pooler cross|perceiver] [--pretrain-vision STEPS]
                                                                 a new ViLex encoder on a trained base
    vilex toyworld tune-vision CKPT OUT [--steps 1500]           a checkpoint's vision model fine-tuned on captions
    vilex toyworld train-probe OUT                               the attribute probe (a small CNN)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from ..errors import ViLexUsageError, check_range
from .shipped import checkpoint_argument

POOLERS = ("cross", "perceiver")


def add_parser(subparsers) -> None:
    toy = subparsers.add_parser("toyworld", help="the toy world: scenes, a base model trained from scratch, a probe")
    sub = toy.add_subparsers(dest="toyworld_command", required=True)

    p = sub.add_parser("make-data", help="write scenes as DIR/NNNNNN.png + .txt captions + scenes.jsonl")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--n", type=int, default=20_000, help="number of scenes (default 20000)")
    p.add_argument("--split", default="train", help="train | probe | heldout | test (each its own seeds; default train)")
    p.add_argument("--edits", action="store_true",
                   help="also write name.edit.png + name.edit.txt: the scene with its main object in another color, "
                        "and the color word that turns it back (for vilex train --edit-prob)")
    p.add_argument("--partial-captions", action="store_true",
                   help="name.txt holds part of the caption (each of size, color, shape, cell and background kept "
                        "with probability 1/2, drawn from the scene's seed) instead of the whole one")
    p.set_defaults(func=cmd_make_data)

    from .config import BaseConfig

    p = sub.add_parser("train-base", help="train the toy text-to-image base (VAE, text encoder, UNet) from scratch",
                       description="Train the VAE, then the CLIP text encoder and UNet on captions; resumable: run the "
                                   "same command again to continue. Writes OUT/pipeline, a ViLex checkpoint.")
    p.add_argument("out", metavar="OUT")
    for field in dataclasses.fields(BaseConfig):
        if field.name == "out":
            continue
        if isinstance(field.default, bool):
            p.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=field.default,
                           action=argparse.BooleanOptionalAction, help=f"(default {field.default})")
        else:
            p.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(field.default),
                           default=field.default, help=f"(default {field.default})")
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("new-vilex", help="an untrained ViLex encoder on a trained base's frozen components")
    p.add_argument("base", metavar="BASE", help="a ViLex checkpoint whose text encoder, UNet and VAE are used")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--pooler", default="cross", help="cross (queries attend to patches) | perceiver (to patches and "
                                                      "each other); default cross")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-vision", type=int, default=0, metavar="STEPS",
                   help="first pretrain the vision model for STEPS steps with SigLIP's sigmoid loss against the base's "
                        "frozen text encoder, as ViLex starts from a pretrained SigLIP (default 0: from scratch; the "
                        "shipped checkpoint used 1500)")
    p.add_argument("--pretrain-all-swaps", action="store_true",
                   help="every caption with one word swapped is a hard negative of its image at every step (default: "
                        "one swapped caption per word, drawn at random)")
    p.add_argument("--pretrain-captioning", type=float, default=0.0, metavar="WEIGHT",
                   help="add CapPa's parallel captioning loss (predict each caption token from the patch features) "
                        "with this weight (default 0: the sigmoid loss alone)")
    p.add_argument("--device", default="cpu", help="where --pretrain-vision trains: cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_new_vilex)

    p = sub.add_parser("tune-vision", help="fine-tune a ViLex checkpoint's vision model with a captioning loss",
                       description="Fine-tune the vision model of CKPT's ViLex encoder with CapPa's captioning loss "
                                   "alone (a small decoder, discarded after, predicts each caption token from the "
                                   "patch features) on toy-world scenes; everything else is copied as it is. Writes "
                                   "OUT, a ViLex checkpoint to go on training with `vilex train`.")
    p.add_argument("ckpt", metavar="CKPT", type=checkpoint_argument,
                   help="a toy-world ViLex checkpoint folder (64x64 images), or toy")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=128, help="(default 128)")
    p.add_argument("--lr", type=float, default=3e-4, help="the vision model's peak learning rate (default 3e-4)")
    p.add_argument("--decoder-lr", type=float, default=1e-3, help="the caption decoder's (default 1e-3)")
    p.add_argument("--scenes", type=int, default=20_000, help="train-split scenes drawn from (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=cmd_tune_vision)

    p = sub.add_parser("train-probe", help="train the attribute probe that `vilex eval` reads scenes with")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_probe)


def cmd_make_data(args) -> None:
    from ..outputs import atomic_folder
    from ..training.data import EDIT_STEM
    from .scenes import SPLITS, drawn_partial_caption, fingerprint, make_scenes, recolor_edit

    if args.split not in SPLITS:
        raise ViLexUsageError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    check_range("--n", args.n, 1, 10**6)
    scenes = make_scenes(args.n, SPLITS[args.split])
    with atomic_folder(args.out, must_be_new=True) as staging:
        lines = []
        for i, scene in enumerate(scenes):
            scene.render().save(staging / f"{i:06d}.png")
            caption = drawn_partial_caption(scene) if args.partial_captions else scene.caption
            (staging / f"{i:06d}.txt").write_text(caption + "\n")
            if args.edits:
                source, word = recolor_edit(scene)
                source.render().save(staging / f"{i:06d}{EDIT_STEM}.png")
                (staging / f"{i:06d}{EDIT_STEM}.txt").write_text(word + "\n")
            lines.append(json.dumps(scene.to_json()))
        (staging / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    extras = [what for what, given in (("partial captions", args.partial_captions), ("recolor edits", args.edits))
              if given]
    extras = f" with {' and '.join(extras)}" if extras else ""
    print(f"wrote {len(scenes)} {args.split} scenes{extras} to {args.out} (fingerprint {fingerprint(scenes)[:16]})")


def cmd_train_base(args) -> None:
    from .config import BaseConfig
    from .train_base import train_base

    names = [f.name for f in dataclasses.fields(BaseConfig)]
    train_base(BaseConfig(**{name: getattr(args, name) for name in names}))


def cmd_new_vilex(args) -> None:
    from .train_base import new_vilex_checkpoint

    if args.pooler not in POOLERS:
        raise ViLexUsageError(f"--pooler must be one of {', '.join(POOLERS)}, got {args.pooler!r}")
    check_range("--pretrain-vision", args.pretrain_vision, 0, 10**6)
    check_range("--pretrain-captioning", args.pretrain_captioning, 0.0, 100.0)
    if not args.pretrain_vision and (args.pretrain_all_swaps or args.pretrain_captioning):
        raise ViLexUsageError("--pretrain-all-swaps and --pretrain-captioning need --pretrain-vision STEPS > 0")
    _check_device(args.device)
    _check_new(args.out)
    out = new_vilex_checkpoint(args.base, args.out, pooler_self_attention=args.pooler == "perceiver", seed=args.seed,
                               pretrain_vision_steps=args.pretrain_vision, device=args.device,
                               all_swaps=args.pretrain_all_swaps, captioning=args.pretrain_captioning)
    vision = f"vision model pretrained {args.pretrain_vision} steps" if args.pretrain_vision else "untrained"
    print(f"wrote ViLex checkpoint {out} ({args.pooler} pooler, {vision}) on the base {args.base}")


def cmd_tune_vision(args) -> None:
    from .train_base import tune_vision_checkpoint

    check_range("--steps", args.steps, 1, 10**6)
    check_range("--batch-size", args.batch_size, 1, 10**5)
    check_range("--scenes", args.scenes, 1, 10**6)
    for name in ("lr", "decoder_lr"):
        check_range(f"--{name.replace('_', '-')}", getattr(args, name), 1e-8, 1.0)
    _check_device(args.device)
    _check_new(args.out)
    out = tune_vision_checkpoint(args.ckpt, args.out, args.steps, device=args.device, num_scenes=args.scenes,
                                 batch_size=args.batch_size, lr=args.lr, decoder_lr=args.decoder_lr, seed=args.seed)
    print(f"wrote ViLex checkpoint {out}: {args.ckpt} with its vision model fine-tuned {args.steps} steps on captions")


def _check_new(out: str) -> None:
    if Path(out).exists():  # atomic_folder refuses it too, but only once the training is done
        raise ViLexUsageError(f"OUT '{out}' already exists; choose a new folder")


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ViLexUsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def cmd_train_probe(args) -> None:
    from .probe import train_probe

    check_range("--steps", args.steps, 1)
    report = train_probe(args.out, steps=args.steps, seed=args.seed)
    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in report["test_accuracy"].items())
    print(f"wrote the probe to {args.out}; on 1000 held-out test scenes: {accuracy}")
