"""The trained toy-world weights shipped inside the package (safetensors only; see MODEL_CARD.md there).

    weights/pipeline   the ViLex checkpoint: toy base (VAE, CLIP text encoder, UNet) + trained ViLex encoder
    weights/probe      the attribute probe `vilex eval` reads scenes with
"""

from __future__ import annotations

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


def probe_path() -> Path:
    return _shipped("probe")
