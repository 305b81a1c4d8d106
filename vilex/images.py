"""Reading user images into RGB PIL images, and writing results.

Every mode Pillow can open is converted explicitly rather than through `Image.convert("RGB")`, which
clips 16-bit images to white and drops alpha onto black.

What is refused rather than guessed at (an ImageInputError naming the image): more than
MAX_IMAGE_PIXELS pixels, with one message of ours whatever the size (Pillow's own decompression-bomb
warning and error, above its larger limits, never reach the caller); no pixels; an animation or a multi-page file (GIF, APNG, WebP, TIFF), whose
first frame would silently stand for the rest (MPO, a JPEG with a preview or depth image after the
photo, is read as its first image, the photo); float pixels (mode F) that are NaN or infinite, which
would otherwise become 0 and 255 without a word.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageInputError

# Reject decompression bombs with our own error instead of PIL's warning/exception.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Pillow's decoders raise more than OSError/ValueError on damaged input: its AVIF plugin raises
# RuntimeError ("Failed to decode image: Missing or empty image item"), others EOFError or struct.error.
# Whatever a decoder raises on bytes a caller sent is that caller's unreadable image, so load_image and
# decode_image turn any Exception into an ImageInputError (MemoryError included: a file that needs more
# memory than there is to decode is refused, not a crash).
DECODER_ERRORS = Exception


def check_pixel_count(name: str, width: int, height: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    """The size rule for every image, encoded or raw: at least 1x1 and at most `limit` pixels."""
    if width * height > limit:
        raise ImageInputError(too_many_pixels(name, f"{width}x{height}", limit))
    if width < 1 or height < 1:
        raise ImageInputError(f"{name}: {width}x{height} pixels; an image must have at least 1x1")


def too_many_pixels(name: str, size: str, limit: int = MAX_IMAGE_PIXELS) -> str:
    return f"{name}: {size} pixels is above the limit of {limit} pixels"


@contextlib.contextmanager
def open_image(source, name: str, limit: int = MAX_IMAGE_PIXELS):
    """`with Image.open(source)` (a path or a binary file), with Pillow's decompression-bomb checks answered by ours.

    Pillow warns above Image.MAX_IMAGE_PIXELS (89 M pixels) and refuses above twice that, in Image.open (and
    for a GIF's later frames, when they are read); ours (`limit`, lower) is checked from the header by
    check_decodable. So the warning is silenced (such an image is refused anyway) and the error becomes our
    message, which can only say "more than" then: Pillow refuses before the size reaches us. catch_warnings
    sets the process's warning filters while the block runs (not thread-safe: other threads miss only this
    one warning category meanwhile).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as image:
                yield image
        except Image.DecompressionBombError:
            raise ImageInputError(too_many_pixels(name, f"more than {2 * Image.MAX_IMAGE_PIXELS}", limit)) from None


def unreadable(error: Exception) -> str:
    """A decoder's error as a reason. Pillow's "cannot identify image file <_io.BytesIO object at 0x...>"
    names a file object of ours, which means nothing to the caller."""
    if isinstance(error, UnidentifiedImageError):
        return "Pillow recognizes no image format in it"
    return str(error) or type(error).__name__


def check_decodable(image: Image.Image, name: str = "image", limit: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse, from the header alone, what to_rgb would decode wrongly or at a cost out of proportion."""
    check_pixel_count(name, image.width, image.height, limit)
    # is_animated is cheap (GIF reads ahead one frame header; APNG, WebP and TIFF count from headers).
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise ImageInputError(f"{name}: animated or multi-page {image.format} ({_frames(image)}); "
                              "send one still image")


def _frames(image: Image.Image) -> str:
    # n_frames walks a GIF's frame headers; bounded by the file's size, which the caller already holds.
    try:
        return f"{image.n_frames} frames"
    except Exception:  # noqa: BLE001 - a damaged later frame: the image is refused either way
        return "more than one frame"


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparent pixels are composited onto white."""
    check_decodable(image, name)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageInputError(f"{name}: float pixels contain NaN or infinite values "
                                  f"({int((~np.isfinite(values)).sum())} of {values.size})")
        gray = np.clip(np.round(values * 255.0 if values.max() <= 1.0 else values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an ImageInputError naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"IMAGE '{path}': no such file")
    name = f"IMAGE '{path}'"
    try:
        with open_image(path, name) as image:
            check_decodable(image, name=name)
            image.load()
            return to_rgb(image, name=name)
    except ImageInputError:
        raise
    except DECODER_ERRORS as error:  # noqa: BLE001 - any decoder failure is an unreadable image
        raise ImageInputError(
            f"{name}: not a readable image (PNG, JPEG, WebP, BMP, TIFF, GIF ...): {unreadable(error)}"
        ) from None


def decode_image(data: bytes, name: str = "IMAGE", limit: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG/JPEG/...) to RGB, with an ImageInputError naming `name`."""
    try:
        with open_image(io.BytesIO(data), name, limit) as image:
            check_decodable(image, name=name, limit=limit)  # before image.load(): nothing is decoded yet
            image.load()
            return to_rgb(image, name=name)
    except ImageInputError:
        raise
    except DECODER_ERRORS as error:  # noqa: BLE001 - any decoder failure is an unreadable image
        raise ImageInputError(f"{name}: bytes are not a readable image (PNG, JPEG, WebP ...): {unreadable(error)}") from None


def make_grid(rows: list[list[Image.Image]], pad: int = 2, labels: list[str] | None = None,
              scale: int = 1) -> Image.Image:
    """Paste rows of equally sized images into one grid image on a white background; `labels` names the
    columns in a header line; `scale` enlarges every cell (nearest neighbour, for small images)."""
    width, height = (v * scale for v in rows[0][0].size)
    columns = max(len(row) for row in rows)
    top = 14 if labels else 0
    grid = Image.new("RGB", (columns * (width + pad) + pad, top + len(rows) * (height + pad) + pad), "white")
    if labels:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(grid)
        for c, label in enumerate(labels):
            draw.text((pad + c * (width + pad), 1), label[: max(1, width // 6)], fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            cell = image.resize((width, height), Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
            grid.paste(cell, (pad + c * (width + pad), top + pad + r * (height + pad)))
    return grid
