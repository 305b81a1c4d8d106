"""Shard data for `vilex train`: WebDataset tar shards and parquet files, read one piece at a time.

    --data 'shards/{000000..000999}.tar'   WebDataset: members KEY.jpg|jpeg|png|webp and an optional KEY.txt
                                            caption, a sample's members next to each other in the tar
    --data 'data/train-*.parquet'          parquet: an image column holding the encoded bytes, either plain
                                            binary or the struct {bytes, path} Hugging Face datasets writes,
                                            and an optional caption column (`text`, else `caption`)

A pattern is brace-expanded (`{000000..000999}`, `{a,b}`, as WebDataset and the shell do), then each name
with `*`, `?` or `[` is globbed (sorted). Every file must exist and all must be `.tar` or all `.parquet`.

A *piece* is what the stream (data.py, `ShardStream`) deals out to its readers: one tar shard, or one
parquet row group (found in the files' footers, so listing costs no image reads). `read_piece` yields a
piece's samples in file order as `RawSample`s: the undecoded image bytes and the caption, keyed
`FILE:KEY` (tar) or `FILE:ROW` (parquet). Nothing unreadable is dropped: a sample without an image, a
null image, or a shard that cannot be read (from where it breaks) comes out as a RawSample with `error`
set, and the trainer lists it with the unreadable images. A piece always yields at least one RawSample
(an empty shard is one error record), so every reader always makes progress.

Why Python's tarfile and not the `webdataset` package: its split_by_node / split_by_worker deal out the
same shards in every epoch, its shuffle is seeded from the process id and time unless given a seed, it has
no position a run can resume from, and its error handlers drop a broken sample with a warning. What is
left once those are replaced is grouping a tar's members by key, a few lines here.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ViLexUsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a tar member KEY.<ext> that is the sample's image
CAPTION_EXTENSION = "txt"
SHARD_SUFFIXES = {".tar": "webdataset", ".parquet": "parquet"}
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMNS = ("text", "caption")  # the first one a parquet file has, when --caption-column is not given
# WebDataset's own rule (webdataset.tariterators.base_plus_ext): the key is the member's path up to the first
# dot of its file name, the extension everything after it ("a/b.seg.png" -> key "a/b", extension "seg.png").
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
SCALE_INSTALL = "pip install 'vilex[scale]'"


@dataclass(frozen=True)
class Piece:
    """One unit of the stream: a tar shard, or one row group of a parquet file."""

    path: str  # the file, as the pattern spelled it
    row_group: int | None = None  # parquet: which row group; None for a tar shard
    first_row: int = 0  # parquet: the file's row index of the row group's first row
    rows: int | None = None  # parquet: rows in the row group (from the footer)

    @property
    def name(self) -> str:
        return self.path if self.row_group is None else f"{self.path}#row-group-{self.row_group}"


@dataclass(frozen=True)
class RawSample:
    """A sample as stored: `image` is the encoded bytes (decoded later, after the shuffle buffer)."""

    key: str  # FILE:KEY (tar) or FILE:ROW (parquet); a broken shard's record is keyed by the shard alone
    image: bytes | None = None
    caption: str | None = None
    error: str | None = None  # why this sample cannot be trained on; None when `image` holds bytes


def is_shard_pattern(data: str) -> bool:
    """True for --data that names shards (a .tar / .parquet file or pattern) rather than an image folder."""
    return not Path(data).is_dir() and (bool(_GLOB_CHARACTERS.search(data)) or "{" in data
                                        or Path(data).suffix.lower() in SHARD_SUFFIXES)


def expand_pattern(pattern: str) -> list[str]:
    """The files a --data pattern names, in pattern order (globs sorted); a usage error if any is missing."""
    if "{" in pattern:
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise ViLexUsageError(f"--data '{pattern}': brace patterns need the braceexpand package: "
                                  f"{SCALE_INSTALL}") from None
        names = list(braceexpand(pattern))
    else:
        names = [pattern]
    paths, missing = [], []
    for name in names:
        if _GLOB_CHARACTERS.search(name):
            matches = sorted(glob.glob(name))
            if matches:
                paths.extend(matches)
            else:
                missing.append(name)
        elif Path(name).is_file():
            paths.append(name)
        else:
            missing.append(name)
    if missing:
        raise ViLexUsageError(f"--data '{pattern}': {len(missing)} of {len(names)} names match no file "
                              f"(first: '{missing[0]}')")
    kinds = {Path(p).suffix.lower() for p in paths}
    if not kinds <= set(SHARD_SUFFIXES) or len(kinds) != 1:
        raise ViLexUsageError(f"--data '{pattern}' must name .tar (WebDataset) or .parquet files, all of one kind "
                              f"(or be a folder of images); it names {', '.join(sorted(kinds))} files")
    if len(set(paths)) != len(paths):
        repeated = next(p for p in paths if paths.count(p) > 1)
        raise ViLexUsageError(f"--data '{pattern}' names '{repeated}' more than once; each shard must appear once")
    return paths


class ShardSource:
    """The files of a --data pattern, cut into pieces; reads a piece's samples (in any process)."""

    def __init__(self, pattern: str, image_column: str | None = None, caption_column: str | None = None):
        self.pattern = pattern
        self.paths = expand_pattern(pattern)
        self.format = SHARD_SUFFIXES[Path(self.paths[0]).suffix.lower()]
        self._parquet_file = None  # (path, pyarrow ParquetFile): the last one read, opened in the reading process
        if self.format == "webdataset":
            for flag, value in (("--image-column", image_column), ("--caption-column", caption_column)):
                if value is not None:
                    raise ViLexUsageError(f"{flag} names a parquet column; --data '{pattern}' is WebDataset tar "
                                          f"shards, whose images are KEY.{'|'.join(IMAGE_EXTENSIONS)} members and "
                                          f"captions KEY.{CAPTION_EXTENSION}")
            self.image_column = self.caption_column = None
            self.pieces = [Piece(path) for path in self.paths]
        else:
            self.image_column, self.caption_column, self.pieces = _parquet_pieces(
                self.paths, image_column or DEFAULT_IMAGE_COLUMN, caption_column)

    def __getstate__(self):  # DataLoader workers get a copy: open files stay behind
        return {**self.__dict__, "_parquet_file": None}

    def describe(self) -> str:
        unit = "shards" if self.format == "webdataset" else f"row groups in {len(self.paths)} parquet files"
        return f"{len(self.pieces)} {unit}"

    def fingerprint(self) -> str:
        """SHA-256 of what the sample order depends on: the pieces (names relative to their common folder,
        sizes in bytes, parquet row counts) and the columns read."""
        root = os.path.commonpath([os.path.abspath(p) for p in self.paths])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        sizes = {p: os.path.getsize(p) for p in self.paths}
        lines = [f"{self.format} image={self.image_column} caption={self.caption_column}"]
        lines += [f"{os.path.relpath(os.path.abspath(p.path), root)} {sizes[p.path]} {p.row_group} {p.rows}"
                  for p in self.pieces]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def read_piece(self, piece: Piece) -> Iterator[RawSample]:
        """The piece's samples in file order; at least one RawSample (an error record if nothing else)."""
        if self.format == "webdataset":
            return read_tar(piece.path)
        return self._read_row_group(piece)

    # ---- parquet -------------------------------------------------------------------------------------------
    def _read_row_group(self, piece: Piece) -> Iterator[RawSample]:
        import pyarrow.parquet as pq

        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        try:
            if self._parquet_file is None or self._parquet_file[0] != piece.path:  # one open file per reader
                self._parquet_file = (piece.path, pq.ParquetFile(piece.path))
            table = self._parquet_file[1].read_row_group(piece.row_group, columns=columns)
            images = table.column(self.image_column).to_pylist()
            captions = table.column(self.caption_column).to_pylist() if self.caption_column else [None] * len(images)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types on a damaged file
            yield RawSample(key=piece.name, error=f"{piece.name}: parquet row group unreadable: {error}")
            return
        folder = Path(piece.path).parent
        for row, (image, caption) in enumerate(zip(images, captions), start=piece.first_row):
            key = f"{piece.path}:{row}"
            data, error = _parquet_image_bytes(image, folder, self.image_column)
            caption = (caption.strip() or None) if isinstance(caption, str) else None
            yield RawSample(key=key, image=data, caption=caption, error=error and f"{key}: {error}")


def read_tar(path: str) -> Iterator[RawSample]:
    """A WebDataset shard's samples, in tar order: consecutive members with the same key are one sample."""
    count, key, members = 0, None, {}
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:  # one sequential read
            for member in tar:
                match = _KEY_AND_EXTENSION.match(member.name) if member.isfile() else None
                if match is None:  # folders, links and files without an extension are not sample members
                    continue
                if match.group(1) != key:
                    if key is not None:
                        count += 1
                        yield _tar_sample(path, key, members)
                    key, members = match.group(1), {}
                members[match.group(2).lower()] = tar.extractfile(member).read()
            # tarfile takes a header cut off mid-way for the end of the archive and stops without a word (the
            # sample it was in would lose members): a whole tar ends with two zero blocks, so look for them.
            file.seek(tar.offset)
            end = file.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
                raise tarfile.ReadError("it stops before the end-of-archive marker (cut off?)")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        where = f"after {count} samples" + (f", in sample '{key}'" if key is not None else "")
        yield RawSample(key=path, error=f"{path}: tar shard unreadable {where}: {error}")
        return
    if key is not None:
        yield _tar_sample(path, key, members)
    elif count == 0:
        yield RawSample(key=path, error=f"{path}: tar shard holds no samples")


def _tar_sample(path: str, key: str, members: dict[str, bytes]) -> RawSample:
    name = f"{path}:{key}"
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members.get(CAPTION_EXTENSION)
    caption = (caption.decode("utf-8", errors="replace").strip() or None) if caption is not None else None
    if image is None:
        found = ", ".join(f".{e}" for e in sorted(members))
        return RawSample(key=name, caption=caption, error=f"{name}: no image member (.{', .'.join(IMAGE_EXTENSIONS)}); "
                                                          f"it has {found}")
    return RawSample(key=name, image=image, caption=caption)


def _parquet_image_bytes(value, folder: Path, column: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, why): a binary cell, or a {bytes, path} struct whose bytes may be null when
    the dataset refers to an image file instead (a relative path is taken from the parquet file's folder)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"]), None
        if value.get("path"):
            path = Path(value["path"]) if Path(value["path"]).is_absolute() else folder / value["path"]
            try:
                return path.read_bytes(), None
            except OSError as error:
                return None, f"column '{column}' has no bytes and its path cannot be read: {error}"
        return None, f"column '{column}' has neither bytes nor a path"
    return None, f"column '{column}' is null"


def _parquet_pieces(paths: list[str], image_column: str, caption_column: str | None):
    """Check every file's columns and list its non-empty row groups. Returns (image column, caption column
    or None, pieces)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ViLexUsageError(f"--data '{paths[0]}': parquet needs pyarrow: {SCALE_INSTALL}") from None
    chosen_caption, pieces = caption_column, []
    for path in paths:
        try:
            metadata = pq.ParquetFile(path).metadata
            schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # noqa: BLE001 - not a parquet file: nothing can be listed, so stop here
            raise ViLexUsageError(f"--data: '{path}' is not a readable parquet file: {error}") from None
        names = schema.names
        if image_column not in names:
            raise ViLexUsageError(f"--image-column: '{path}' has no column '{image_column}'; its columns are "
                                  f"{', '.join(names)}")
        kind = schema.field(image_column).type
        is_bytes = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
        struct_of_bytes = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and \
            is_bytes(kind.field("bytes").type)
        if not (is_bytes(kind) or struct_of_bytes):
            raise ViLexUsageError(f"--image-column '{image_column}' of '{path}' is {kind}; it must hold encoded "
                                  f"image bytes: binary, or a struct with a binary 'bytes' field (Hugging Face "
                                  f"datasets' Image feature)")
        if caption_column is None and chosen_caption is None and path == paths[0]:
            chosen_caption = next((c for c in DEFAULT_CAPTION_COLUMNS if c in names), None)
        if chosen_caption is not None:
            if chosen_caption not in names:
                raise ViLexUsageError(f"--caption-column: '{path}' has no column '{chosen_caption}'; its columns are "
                                      f"{', '.join(names)}")
            text = schema.field(chosen_caption).type
            if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
                raise ViLexUsageError(f"--caption-column '{chosen_caption}' of '{path}' is {text}; it must be text")
        first_row = 0
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:  # an empty row group holds nothing to read
                pieces.append(Piece(path, row_group=index, first_row=first_row, rows=rows))
            first_row += rows
    if not pieces:
        raise ViLexUsageError(f"--data: the {len(paths)} parquet files hold no rows")
    return image_column, chosen_caption, pieces
