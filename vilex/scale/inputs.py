"""What `vilex tokenize-dataset` reads: INPUT resolved to files of one format, and a Ray Data dataset of rows
(source, key, image bytes) over them, read by Ray Data's own readers.

    images      a folder of image files, searched recursively (hidden files and folders skipped; other files,
                such as captions, ignored). source: the file's path under INPUT; key: "".
    parquet     .parquet files (one, a folder of them, or a brace pattern) with an image column (--image-column,
                default `image`): a struct with a `bytes` field, the layout Hugging Face datasets writes
                ({bytes, path}), or a plain binary column. source: the file; key: the --id-column value, or
                `sha256:` and the image bytes' SHA-256 (a content id: stable across reruns and row orders).
    webdataset  .tar shards (one, a folder of them, or a brace pattern `shards/{000000..000009}.tar`). source:
                the shard; key: the sample's key; the image: its member with an image extension
                (--image-column EXT picks one when samples hold several).

Sources are POSIX paths relative to INPUT's folder (a pattern's folder, or a single file's), so an output
stays valid when the dataset moves. Decoding is not done here: the tokenizer decodes with vilex.images, the
decoder `vilex tokenize` uses.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError

FORMATS = ("auto", "images", "parquet", "webdataset")
# What Pillow decodes and vilex.images accepts; a member or file with another extension is not an image.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
FORMAT_EXTENSIONS = {"images": IMAGE_EXTENSIONS, "parquet": ("parquet",), "webdataset": ("tar",)}
DEFAULT_PARQUET_IMAGE_COLUMN = "image"  # what Hugging Face datasets names an Image feature by default
# The columns every reader's rows are brought to before the tokenizer (a row that cannot be tokenized carries
# its reason in `error` and no image).
ROW_COLUMNS = ("source", "key", "image", "error")


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    source: str  # relative to DatasetInput.root, POSIX
    size: int
    mtime_ns: int


@dataclass
class DatasetInput:
    spec: str  # INPUT as typed
    root: Path  # the folder that sources are relative to
    format: str  # images | parquet | webdataset
    files: list[InputFile]
    image_column: str | None = None
    id_column: str | None = None

    def describe(self) -> str:
        kind = {"images": "image file", "parquet": "parquet file", "webdataset": "tar shard"}[self.format]
        return f"{len(self.files)} {kind}{'s' * (len(self.files) != 1)} under {self.root}"


# ---- INPUT -> files ------------------------------------------------------------------------------------------
def is_pattern(spec: str) -> bool:
    return "{" in spec and "}" in spec


def expand_pattern(spec: str) -> list[str]:
    """`shards/{000000..000002}.tar` -> shards/000000.tar ... (zero padding kept), `{a,b}` -> a, b: the brace
    syntax WebDataset and the shell use, by the braceexpand package WebDataset itself uses."""
    from braceexpand import braceexpand

    names = list(braceexpand(spec))
    if not names or names == [spec]:
        raise ViLexUsageError(f"INPUT '{spec}': not a brace pattern (expected e.g. shards/{{000000..000009}}.tar "
                              f"or {{a,b}}.parquet)")
    return names


def kind_of(name: str) -> str | None:
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    return next((kind for kind, extensions in FORMAT_EXTENSIONS.items() if extension in extensions), None)


def _walk(folder: Path) -> list[Path]:
    """Every file under `folder`, hidden files and folders skipped, sorted (os.walk does not follow links to
    folders, so a link cycle cannot loop)."""
    found = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(directory) / name for name in sorted(names) if not name.startswith(".")]
    return found


def resolve_input(spec: str, format: str = "auto", image_column: str | None = None,
                  id_column: str | None = None) -> DatasetInput:
    """INPUT and its flags -> the files to read, every mistake a ViLexUsageError naming INPUT or the flag."""
    if format not in FORMATS:
        raise ViLexUsageError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    # 1. The candidate files and the folder their sources are relative to.
    if is_pattern(spec):
        names = expand_pattern(spec)
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise ViLexUsageError(f"INPUT '{spec}': {len(missing)} of the {len(names)} files it names do not exist "
                                  f"(first: {missing[0]})")
        root = Path(os.path.dirname(spec[:spec.index("{")]) or ".")
        candidates = [Path(n) for n in names]
    elif Path(spec).is_dir():
        root, candidates = Path(spec), _walk(Path(spec))
    elif Path(spec).is_file():
        root, candidates = Path(spec).parent, [Path(spec)]
    else:
        raise ViLexUsageError(f"INPUT '{spec}': no such file, folder or brace pattern")
    # 2. The format: as given, or the one kind of file INPUT holds.
    kinds: dict[str, list[Path]] = {}
    for path in candidates:
        kind = kind_of(path.name)
        if kind is not None:
            kinds.setdefault(kind, []).append(path)
    wanted = ", ".join(f".{e}" for e in FORMAT_EXTENSIONS.get(format, ()))
    if format == "auto":
        if len(kinds) != 1:
            held = ", ".join(f"{len(paths)} {kind}" for kind, paths in sorted(kinds.items()))
            held = held or "no image, .parquet or .tar files"
            raise ViLexUsageError(f"INPUT '{spec}' holds {held}: "
                                  + ("give --format images|parquet|webdataset" if kinds else
                                     f"expected images ({', '.join(IMAGE_EXTENSIONS)}), .parquet files or .tar shards"))
        format = next(iter(kinds))
    elif not kinds.get(format):
        raise ViLexUsageError(f"INPUT '{spec}' holds no {format} files ({wanted})")
    # 3. The flags that only some formats take.
    if format == "images" and image_column:
        raise ViLexUsageError(f"--image-column is for parquet and webdataset input; INPUT '{spec}' holds image files")
    if format != "parquet" and id_column:
        raise ViLexUsageError(f"--id-column is for parquet input; INPUT '{spec}' holds {format} files, whose ids are "
                              + ("their paths" if format == "images" else "their shards and sample keys"))
    if format == "webdataset" and image_column and image_column.lower() not in IMAGE_EXTENSIONS:
        raise ViLexUsageError(f"--image-column for WebDataset shards is the image member's extension, one of "
                              f"{', '.join(IMAGE_EXTENSIONS)}; got {image_column!r}")
    if format == "parquet":
        image_column = image_column or DEFAULT_PARQUET_IMAGE_COLUMN
    files = []
    for path in kinds[format]:
        stat = path.stat()
        files.append(InputFile(str(path.resolve()), Path(os.path.relpath(path, root)).as_posix(), stat.st_size,
                               stat.st_mtime_ns))
    dataset_input = DatasetInput(spec, root.resolve(), format, files, image_column, id_column)
    if format == "parquet":
        check_parquet_columns(dataset_input)
    if format == "webdataset":
        check_tar_headers(dataset_input)
    return dataset_input


def check_tar_headers(dataset_input: DatasetInput) -> None:
    """Every shard opens as a tar (its first header only: a shard cut short further in still fails the job)."""
    import tarfile

    for file in dataset_input.files:
        try:
            with tarfile.open(file.path, "r|*") as shard:  # as Ray Data's reader opens it: a stream, any compression
                next(iter(shard), None)
        except (OSError, tarfile.TarError) as error:
            raise ViLexUsageError(f"INPUT file '{file.source}' is not a readable tar shard: {error}") from None


def check_parquet_columns(dataset_input: DatasetInput) -> None:
    """The image (and id) column exist with a usable type, checked on every file's schema (footers only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in dataset_input.files:
        try:
            schema = pq.read_schema(file.path)
        except (OSError, pa.ArrowException) as error:
            raise ViLexUsageError(f"INPUT file '{file.source}' is not a readable parquet file: {error}") from None
        column = dataset_input.image_column
        if column not in schema.names:
            raise ViLexUsageError(f"--image-column {column!r} is not a column of '{file.source}' "
                                  f"(it has {', '.join(schema.names)})")
        kind = schema.field(column).type
        is_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and \
            _is_binary(kind.field(kind.get_field_index("bytes")).type)
        if not (is_struct or _is_binary(kind)):
            raise ViLexUsageError(f"--image-column {column!r} of '{file.source}' is {kind}: expected encoded image "
                                  f"bytes, a binary column or a struct with a `bytes` field (Hugging Face's Image)")
        if dataset_input.id_column and dataset_input.id_column not in schema.names:
            raise ViLexUsageError(f"--id-column {dataset_input.id_column!r} is not a column of '{file.source}' "
                                  f"(it has {', '.join(schema.names)})")


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


# ---- files -> a Ray Data dataset of rows ---------------------------------------------------------------------
def read_rows(dataset_input: DatasetInput, files: list[InputFile], done: set[tuple[str, str]], read_cpus: float,
              batch_size: int):
    """A Ray Data dataset over `files` with the columns ROW_COLUMNS, without the rows whose (source, key) is in
    `done` (those a previous run of the same OUT committed)."""
    import ray.data

    paths = [f.path for f in files]
    if dataset_input.format == "images":
        # Ray Data hands an actor whole blocks: about one batch of files per block, so that every actor gets work
        # (left to itself, Ray reads a small folder as one block, which one actor then tokenizes alone).
        blocks = max(1, -(-len(paths) // batch_size))
        dataset = ray.data.read_binary_files(paths, include_paths=True, num_cpus=read_cpus, override_num_blocks=blocks)
    elif dataset_input.format == "parquet":
        columns = [dataset_input.image_column] + ([dataset_input.id_column] if dataset_input.id_column else [])
        dataset = ray.data.read_parquet(paths, include_paths=True, num_cpus=read_cpus).select_columns(columns + ["path"])
    else:
        # decoder=None: members stay bytes (vilex.images decodes); suffixes: only image members are carried.
        dataset = ray.data.read_webdataset(paths, decoder=None, suffixes=ImageMembers(dataset_input.image_column),
                                           num_cpus=read_cpus)
    sources = {f.path: f.source for f in files}
    return dataset.map_batches(to_image_rows, batch_format="pyarrow", num_cpus=read_cpus,
                               fn_kwargs=dict(format=dataset_input.format, sources=sources,
                                              image_column=dataset_input.image_column,
                                              id_column=dataset_input.id_column, done=done))


class ImageMembers:
    """read_webdataset's `suffixes`: which members of a sample are kept (a class, so workers import it)."""

    def __init__(self, extension: str | None):
        self.extensions = (extension.lower(),) if extension else IMAGE_EXTENSIONS

    def __call__(self, suffix: str) -> bool:
        return suffix.lower() in self.extensions


def _source(path: str, sources: dict[str, str]) -> str:
    """A reader's path column -> the file's source (readers may drop a leading `/` or add a scheme)."""
    return sources.get(path) or sources.get("/" + path.lstrip("/")) or sources.get(path.partition("://")[2], path)


def to_image_rows(batch, format: str, sources: dict[str, str], image_column: str | None, id_column: str | None,
                  done: set[tuple[str, str]]):
    """One reader's batch (a pyarrow Table) -> the columns ROW_COLUMNS, done rows dropped."""
    import pyarrow as pa

    columns = batch.column_names
    count = batch.num_rows
    errors: list[str | None] = [None] * count
    if format == "images":
        paths, images = batch["path"].to_pylist(), batch["bytes"].to_pylist()
        keys = [""] * count
    elif format == "parquet":
        paths = batch["path"].to_pylist()
        column = batch[image_column]
        if pa.types.is_struct(column.type):
            column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], column.type.field("bytes").type)
        images = column.to_pylist()
        if id_column:
            keys = ["" if v is None else str(v) for v in batch[id_column].to_pylist()]
        else:
            keys = ["" if data is None else "sha256:" + hashlib.sha256(data).hexdigest() for data in images]
        for i, data in enumerate(images):
            if data is None:
                errors[i] = f"no image bytes (column {image_column!r} is null)"
    else:
        paths, keys = batch["__url__"].to_pylist(), batch["__key__"].to_pylist()
        members = [c for c in columns if ImageMembers(image_column)(c)]
        images = [None] * count
        for i in range(count):
            # Several image members in one sample: the first in IMAGE_EXTENSIONS order (--image-column picks one).
            present = sorted((m for m in members if batch[m][i].is_valid), key=lambda m: _member_rank(m))
            if present:
                images[i] = batch[present[0]][i].as_py()
            else:
                wanted = f".{image_column}" if image_column else "an image extension (" + ", ".join(IMAGE_EXTENSIONS) + ")"
                errors[i] = f"no member with {wanted} in this sample"
    rows = [(_source(p, sources), k, data, error) for p, k, data, error in zip(paths, keys, images, errors)
            if (_source(p, sources), k) not in done]
    return pa.table({"source": pa.array([r[0] for r in rows], pa.string()),
                     "key": pa.array([r[1] for r in rows], pa.string()),
                     "image": pa.array([r[2] for r in rows], pa.large_binary()),  # a batch may pass 2 GiB
                     "error": pa.array([r[3] for r in rows], pa.string())})


def _member_rank(member: str) -> int:
    lowered = member.lower()
    return IMAGE_EXTENSIONS.index(lowered) if lowered in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS)
