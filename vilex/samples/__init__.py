"""Sample images for `vilex demo`: four 96x96 PNGs drawn procedurally (a sunset, shapes, a checkerboard, waves)."""

from importlib.resources import files
from pathlib import Path


def sample_paths() -> list[Path]:
    return sorted(Path(str(p)) for p in files(__name__).iterdir() if str(p).endswith(".png"))
