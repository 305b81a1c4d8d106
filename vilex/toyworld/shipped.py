"""The trained toy-world weights shipped inside the package (safetensors only; see MODEL_CARD.md there).

    weights/pipeline   the ViLex checkpoint: toy base (VAE, CLIP text encoder, UNet) + trained ViLex encoder
    weights/probe      the attribute probe `vilex eval` reads scenes with
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ViLexUsageError

WEIGHTS = Path(__file__).parent / "weights"


def _shipped(name: str) -> Path:
    path = WEIGHTS / name
    if not path.is_dir():
        raise ViLexUsageError(f"the toy world's {name} weights are not in this installation ({path}); reinstall "
                              f"vilex, or train them: see vilex/toyworld/weights/MODEL_CARD.md")
    return path


def checkpoint_path() -> Path:
    return _shipped("pipeline")


# The name a command's CKPT argument takes for the shipped checkpoint (`vilex reconstruct toy a.png ...`).
SHIPPED_NAME = "toy"


def resolve_checkpoint(name: str | None) -> str | None:
    """A command's CKPT as a folder: SHIPPED_NAME is the shipped toy checkpoint unless a folder of that name is
    there (a local folder comes first, as in diffusers' from_pretrained); anything else is returned as given."""
    if name == SHIPPED_NAME and not Path(name).exists():
        return str(checkpoint_path())
    return name


def checkpoint_argument(name: str) -> str:
    """`resolve_checkpoint` as an argparse `type`: argparse turns a ValueError of a type into "invalid
    checkpoint_argument value: 'toy'", so a missing shipped checkpoint is raised as its ArgumentTypeError, whose
    message argparse prints as it is."""
    try:
        return resolve_checkpoint(name)
    except ViLexUsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def probe_path() -> Path:
    return _shipped("probe")
