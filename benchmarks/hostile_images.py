"""Malformed and hostile encoded images for `vilex stress` (part 1), built here from a fixed seed.

Every builder returns bytes a client could send as one `IMAGE` row. They are made by hand where Pillow
would refuse to write them (a 0x0 PNG, a GIF whose canvas is 65535x65535) and by patching a real file
where a decoder would accept the result (a WebP bomb is a 16x16 one-color lossless WebP whose header says
16383x16383: a single-symbol Huffman code spends no bits per pixel, so the same 38 bytes decode to 268
million pixels).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image

# Formats Pillow both writes and reads here, with the mode each is written in. JPEG 2000 and AVIF need
# their libraries; `truncatable_formats` keeps those this Pillow has.
WRITABLE_FORMATS = {"PNG": "RGB", "JPEG": "RGB", "GIF": "P", "WEBP": "RGB", "BMP": "RGB", "TIFF": "RGB",
                    "ICO": "RGBA", "PPM": "RGB", "TGA": "RGB", "PCX": "RGB", "SGI": "RGB", "JPEG2000": "RGB",
                    "AVIF": "RGB", "QOI": "RGB", "DDS": "RGB", "IM": "RGB", "SPIDER": "F", "MSP": "1", "XBM": "1"}


def picture(size=(24, 24)) -> PIL.Image.Image:
    """A small RGB gradient (structured enough that compressed formats have a real payload)."""
    gradient = np.asarray(PIL.Image.radial_gradient("L").resize(size))  # (H, W) uint8
    return PIL.Image.fromarray(np.stack([gradient, gradient[::-1], np.full_like(gradient, 90)], axis=-1))


def encode(image: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def truncatable_formats() -> list[str]:
    PIL.Image.init()
    available = []
    for fmt, mode in WRITABLE_FORMATS.items():
        if fmt in PIL.Image.SAVE and fmt in PIL.Image.OPEN:
            try:
                encode(picture().convert(mode), fmt)
            except (OSError, ValueError, KeyError):
                continue  # the codec is not compiled into this Pillow
            available.append(fmt)
    return available


def truncated(fmt: str) -> bytes:
    """The first half of a valid file: headers intact, pixel data cut."""
    data = encode(picture((64, 64)).convert(WRITABLE_FORMATS[fmt]), fmt)
    return data[: len(data) // 2]


# ---- corrupt payloads (header intact, the part after it broken in a way each decoder detects) --------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None = None,
                  idat: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk: IHDR as given, IDAT = zlib(raw) unless `idat` is given as is."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = idat if idat is not None else zlib.compress(raw or b"", 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """IHDR 24x24 RGB, an IDAT whose CRC is right but whose zlib stream is noise."""
    noise = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    return png_from_rows(24, 24, 8, 2, idat=b"\x78\x9c" + noise)


def corrupt_jpeg() -> bytes:
    """A baseline JPEG whose start-of-frame says 0 components (SOF0 at marker FFC0)."""
    data = bytearray(encode(picture(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 0  # FFC0, length(2), precision(1), height(2), width(2), components(1)
    return bytes(data)


def corrupt_gif() -> bytes:
    """A GIF whose image data starts with an LZW minimum code size of 15 (at most 12 is valid)."""
    data = bytearray(encode(picture().convert("P"), "GIF"))
    descriptor = data.index(b"\x2c")  # image separator; 10 bytes of descriptor follow, then the code size
    flags = data[descriptor + 9]
    local_table = 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0
    data[descriptor + 10 + local_table] = 15
    return bytes(data)


def corrupt_webp() -> bytes:
    """A lossy WebP whose VP8 bitstream after the frame header is overwritten with noise."""
    data = bytearray(encode(picture((64, 64)), "WEBP", quality=80))
    start = data.index(b"VP8 ") + 8 + 10  # chunk header, then the 10-byte key-frame header
    noise = np.random.default_rng(1).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    data[start:] = noise
    return bytes(data)


def corrupt_bmp() -> bytes:
    """A BMP that says 7 bits per pixel (BMP has 1, 4, 8, 16, 24 and 32)."""
    data = bytearray(encode(picture(), "BMP"))
    data[28:30] = struct.pack("<H", 7)
    return bytes(data)


def corrupt_tiff() -> bytes:
    """An uncompressed TIFF whose strip offset points far past the end of the file."""
    data = bytearray(encode(picture(), "TIFF"))
    # Little-endian TIFF: IFD offset at 4; entries of 12 bytes; tag 273 (StripOffsets), type LONG.
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:
            struct.pack_into("<I", data, at + 8, 0x7FFFFFF0)
    return bytes(data)


def corrupt_avif() -> bytes:
    """An AVIF with its item-location box renamed: libavif answers "Missing or empty image item"."""
    data = bytearray(encode(picture(), "AVIF"))
    at = data.index(b"iloc")
    data[at:at + 4] = b"xloc"
    return bytes(data)


CORRUPT = {"PNG": corrupt_png, "JPEG": corrupt_jpeg, "GIF": corrupt_gif, "WEBP": corrupt_webp, "BMP": corrupt_bmp,
           "TIFF": corrupt_tiff, "AVIF": corrupt_avif}


# ---- decompression bombs --------------------------------------------------------------------------------
def png_bomb(side: int = 20000) -> bytes:
    """A real side x side 1-bit grayscale PNG of zeros: about 60 KB for 20000x20000 (400 M pixels)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_from_rows(side, side, 1, 0, idat=idat)


def gif_bomb() -> bytes:
    """A 65535x65535 logical screen holding one 1x1 frame: a decoder allocates the whole canvas."""
    screen = struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def webp_bomb(width: int = 16383, height: int = 16383) -> bytes:
    """A one-color lossless WebP (38 bytes) whose VP8L header is patched to width x height."""
    data = bytearray(encode(PIL.Image.new("RGB", (16, 16), (10, 200, 30)), "WEBP", lossless=True))
    signature = data.index(b"VP8L") + 8
    bits = int.from_bytes(data[signature + 1:signature + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    data[signature + 1:signature + 5] = bits.to_bytes(4, "little")
    return bytes(data)


# ---- odd but well-formed ---------------------------------------------------------------------------------
def animated(fmt: str, frames: int = 3) -> bytes:
    images = [picture().convert("P" if fmt == "GIF" else "RGB").point(lambda v, i=i: (v + 60 * i) % 256)
              for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:])


def empty_png() -> bytes:
    """IHDR says 0x0 (the PNG standard forbids it)."""
    return png_from_rows(0, 0, 8, 0, raw=b"")


def empty_bmp() -> bytes:
    data = bytearray(encode(PIL.Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", 0, 0)
    return bytes(data)


def float_tiff(value: float) -> bytes:
    """A 32-bit float grayscale TIFF (Pillow mode F) filled with `value` (NaN, inf)."""
    return encode(PIL.Image.fromarray(np.full((8, 8), value, np.float32), mode="F"), "TIFF")


def line_png(width: int, height: int) -> bytes:
    return encode(picture((width, height)), "PNG")
