"""Training data: a folder of images (with optional caption sidecars), or shards -> batches for the objective.

    DIR/**/name.{jpg,jpeg,png,webp}     an image (searched recursively)
    DIR/**/name.txt                     its caption (optional): the sample may be trained as ViLex + text
    DIR/**/name.edit.{png,...} + name.edit.txt
                                        an edit that ends in name.png (optional, both or neither): the image
                                        before it and the words that turn it into name.png; with --edit-prob
                                        the sample may be trained as the tokens of name.edit.png + the words,
                                        re-creating name.png (not itself a training image)
    'shards/{000000..000999}.tar'       WebDataset tar shards, or parquet files: streamed (shards.py reads them)

Each image is resized (shorter side to the VAE resolution) and cropped square once; that square is
both the VAE's input, in [-1, 1], and the input of the vision encoder's own image processor, so the
encoder sees exactly what the diffusion model is asked to re-create. An edit's image must have the same
size as its target; it is cropped and flipped as its target is.

Sample order is a stream of (epoch, index) keys: epoch e is a permutation of the images seeded by
(seed, e), and rank r of w processes takes every w-th key. A run that resumes after b batches starts
the stream at key b * batch_size and so sees exactly the samples an uninterrupted run would.
Augmentations are seeded by (seed, epoch, index), so they do not depend on which worker ran them.

Shards are streamed (`ShardStream`, an IterableDataset), never loaded whole, with the folder's rule lifted
from images to pieces. A piece is a tar shard or a parquet row group; a reader is one DataLoader worker of
one process (the process itself with --num-workers 0): W processes x K workers make R = W * K readers, and
reader k * W + r is worker k of rank r. The pieces form an endless sequence, epoch after epoch, epoch e's
P pieces in an order seeded by (seed, e) at global positions e * P ... e * P + P - 1, and reader i takes
global positions i, i + R, i + 2R, ... (so rank r takes every W-th piece, its workers every K-th of those).
Within an epoch no piece, hence no sample, goes to two readers, and together they read all of them. When
R does not divide P, a reader's share of an epoch is P // R or P // R + 1 pieces, and which readers get the
extra one moves on from epoch to epoch: readers stay within one piece of each other (for equal pieces),
and an epoch's last pieces overlap the next epoch's first ones by at most one piece per reader. (P < R
works too: a reader then has no piece in some epochs and goes on to the next.) Each reader's stream is
endless, so every process always has its next batch, all stop at the same step count and none waits for
another: DDP cannot hang on data. A reader reads its pieces of an epoch in order through a shuffle buffer
(--shuffle-buffer samples, seeded by (seed, e, reader), drained when its share of the epoch ends) and
decodes only what leaves the buffer.
Each sample carries its reader's position after it, (reader, epoch, samples of that epoch); the trainer
keeps the position of each reader's last consumed batch, and a resume restarts each reader there
(replaying its epoch up to that point without decoding), with the DataLoader's round robin over workers
rotated so that the next batch comes from the reader that was next. Augmentations are seeded by
(seed, epoch, sample key).

Unreadable files are not a crash: the dataset returns a "skipped" record, `collate` drops it from the
batch, and the trainer counts the file in its final report. For shards the same holds for an undecodable
image, a sample with no image, a null parquet cell and a shard or row group that cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from ..errors import ImageInputError, ViLexUsageError
from ..images import decode_image, load_image
from .shards import SHARD_SUFFIXES, RawSample, ShardSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"
EDIT_STEM = ".edit"  # name.edit.png + name.edit.txt: an edit that ends in name.png


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption_path: Path | None  # the `name.txt` sidecar, when there is one
    edit_path: Path | None = None  # `name.edit.png` (any image suffix): the image before an edit, when there is one
    edit_text_path: Path | None = None  # `name.edit.txt`: the words of that edit


def is_edit_image(path: Path) -> bool:
    return Path(path.stem).suffix == EDIT_STEM


def find_images(root: str | os.PathLike) -> list[ImageRecord]:
    """Every image under `root` (recursive, sorted), with its caption sidecar if present."""
    root = Path(root)
    if not root.is_dir():
        raise ViLexUsageError(f"--data '{root}' is not a folder of images, a .tar or .parquet file, or a shard "
                              f"pattern such as 'shards/{{000000..000999}}.tar' or 'data/*.parquet'")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    paths = [p for p in found if not is_edit_image(p)]
    edit_images: dict[Path, list[Path]] = {}  # DIR/name -> its name.edit.<suffix> files
    for p in found:
        if is_edit_image(p):
            edit_images.setdefault(p.with_suffix("").with_suffix(""), []).append(p)
    targets = {p.with_suffix("") for p in paths}
    orphans = [p for name, edits in edit_images.items() if name not in targets for p in edits]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise ViLexUsageError(f"--data: {orphans[0]}{more} is named as an edit (name{EDIT_STEM}.png) but no image of "
                              f"that name is beside it; rename it to train on it as an image")
    if not paths:
        shards = sorted({p.suffix.lower() for p in root.glob("*") if p.suffix.lower() in SHARD_SUFFIXES})
        hint = f"; for the {' and '.join(shards)} files in it give a pattern: --data '{root}/*{shards[0]}'" \
            if shards else ""
        raise ViLexUsageError(
            f"--data '{root}' holds no images: expected {', '.join(IMAGE_SUFFIXES)} files (searched recursively)"
            f"{hint}"
        )
    records = []
    for path in paths:
        caption = path.with_suffix(CAPTION_SUFFIX)
        edit = find_edit(path, edit_images.get(path.with_suffix(""), []))
        records.append(ImageRecord(path, caption if caption.is_file() else None, *edit))
    return records


def find_edit(path: Path, images: Sequence[Path]) -> tuple[Path | None, Path | None]:
    """(name.edit.<image suffix>, name.edit.txt) of the image `path`, given the edit images found beside it, or
    (None, None); one without the other, or two edit images, is a usage error."""
    stem = path.with_suffix("").name + EDIT_STEM
    text = path.with_name(stem + CAPTION_SUFFIX)
    if not images and not text.is_file():
        return None, None
    if len(images) > 1:
        raise ViLexUsageError(f"--data: {path} has {len(images)} edit images ({', '.join(p.name for p in images)}); "
                              f"an image has at most one")
    if not images or not text.is_file():
        have, missing = (images[0], text.name) if images else (text, f"{stem}{{{','.join(IMAGE_SUFFIXES)}}}")
        raise ViLexUsageError(f"--data: {have} has no {missing} beside it: an edit is the image before it "
                              f"({stem}.png, ...) and its words ({stem}{CAPTION_SUFFIX}), both or neither")
    return images[0], text


def read_edit(record: ImageRecord) -> str | None:
    """The edit's words (whitespace stripped), or None when the image has no edit; empty words are a usage error."""
    if record.edit_text_path is None:
        return None
    text = record.edit_text_path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise ViLexUsageError(f"--data: {record.edit_text_path} is empty; an edit needs its words")
    return text


def read_caption(record: ImageRecord) -> str | None:
    """The sidecar's text with surrounding whitespace removed; None when absent or empty."""
    if record.caption_path is None:
        return None
    text = record.caption_path.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def crop_square(image: PIL.Image.Image, resolution: int, offset: tuple[float, float] = (0.5, 0.5)) -> PIL.Image.Image:
    """Resize the shorter side to `resolution`, then crop a resolution x resolution square.

    offset (fx, fy) in [0, 1] places the crop: (0.5, 0.5) is the centre.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = image.resize(size, PIL.Image.Resampling.BICUBIC)  # PIL filters when it shrinks (no aliasing)
    left = round((size[0] - resolution) * offset[0])
    top = round((size[1] - resolution) * offset[1])
    return resized.crop((left, top, left + resolution, top + resolution))


def to_vae_pixels(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in 0..255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def prepare_sample(image: PIL.Image.Image, rng: np.random.Generator, resolution: int, image_processor,
                   random_crop: bool, random_flip: bool, edit_image: PIL.Image.Image | None = None) -> dict:
    """One RGB image -> {"pixel_values" (3, S, S) for the vision encoder, "vae_pixels" (3, R, R)}: the same
    square, cropped once, for both; rng draws the crop offset and the flip. With an edit's image (the size of
    `image`), also its "edit_pixel_values" (3, S, S), cropped and flipped as `image` is."""
    offset = (float(rng.random()), float(rng.random())) if random_crop else (0.5, 0.5)
    flip = random_flip and rng.random() < 0.5
    squares = []
    for picture in (image,) if edit_image is None else (image, edit_image):
        square = crop_square(picture, resolution, offset)
        squares.append(square.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) if flip else square)
    pixel_values = image_processor(images=squares, return_tensors="pt")["pixel_values"]  # (1 or 2, 3, S, S)
    sample = {"pixel_values": pixel_values[0], "vae_pixels": to_vae_pixels(squares[0])}
    if edit_image is not None:
        sample["edit_pixel_values"] = pixel_values[1]
    return sample


class ImageFolderDataset(Dataset):
    """Indexed by (epoch, index) keys from `TrainingStream`; returns one preprocessed sample.

    A sample is a dict with `pixel_values` (3, S, S) for the vision encoder, `vae_pixels` (3, R, R),
    `caption` (str or None) and `path`, and for an image with an edit `edit_pixel_values` (3, S, S) and
    `edit_text`; an unreadable file (or an edit image of another size) gives {"skipped": path, "reason": message}.
    """

    def __init__(self, records: Sequence[ImageRecord], image_processor, resolution: int, seed: int = 0,
                 random_crop: bool = False, random_flip: bool = False):
        self.records = list(records)
        self.image_processor = image_processor
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        record = self.records[index]
        seen = (str(record.path), epoch)
        try:
            image = load_image(record.path)
            edit_image = None if record.edit_path is None else load_image(record.edit_path)
        except ImageInputError as error:
            return {"skipped": str(record.path), "reason": str(error), "seen": seen}
        if edit_image is not None and edit_image.size != image.size:
            return {"skipped": str(record.path), "seen": seen,
                    "reason": f"its edit image {record.edit_path.name} is {edit_image.size[0]}x{edit_image.size[1]}, "
                              f"the image {image.size[0]}x{image.size[1]}: an edit's image must have its target's size"}
        # Seeded by (seed, epoch, index): the same augmentation whichever worker loads it, and on resume.
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = prepare_sample(image, rng, self.resolution, self.image_processor, self.random_crop, self.random_flip,
                                edit_image)
        if edit_image is not None:
            sample["edit_text"] = read_edit(record)
        return {**sample, "caption": read_caption(record), "path": str(record.path), "seen": seen}


def collate(samples: list[dict]) -> dict:
    """Stack the readable samples; unreadable ones are listed under `skipped` as (path, reason).

    pixel_values (b, 3, S, S) and vae_pixels (b, 3, R, R) are None when no sample of the batch was readable.
    When a sample of the batch has an edit, edit_pixel_values (b, 3, S, S) holds each edit's image (a sample
    without one: its own pixel_values) and edit_texts its words (None without one); else they are None and [].
    `seen` lists every sample of the batch, readable or not, as (path or key, epoch); `position` is, for
    shards, the position of the reader after the batch's last sample (all of a batch comes from one reader).
    """
    good = [s for s in samples if "skipped" not in s]
    skipped = [(s["skipped"], s["reason"]) for s in samples if "skipped" in s]
    common = {"skipped": skipped, "seen": [s["seen"] for s in samples if "seen" in s],
              "position": samples[-1].get("position") if samples else None}
    if not good:
        return {"pixel_values": None, "vae_pixels": None, "captions": [], "paths": [], "edit_pixel_values": None,
                "edit_texts": [], **common}
    edits = any("edit_text" in s for s in good)
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]),
        "vae_pixels": torch.stack([s["vae_pixels"] for s in good]),
        "captions": [s["caption"] for s in good],
        "paths": [s["path"] for s in good],
        "edit_pixel_values": torch.stack([s.get("edit_pixel_values", s["pixel_values"]) for s in good])
        if edits else None,
        "edit_texts": [s.get("edit_text") for s in good] if edits else [],
        **common,
    }


class TrainingStream(Sampler):
    """Endless stream of (epoch, index) keys for one rank, starting after `start` keys of that rank.

    Global position g = p * world_size + rank (p = this rank's position); epoch = g // n, and the
    index is the (g % n)-th entry of that epoch's permutation, seeded by (seed, epoch).
    """

    def __init__(self, num_records: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_records < 1:
            raise ValueError("TrainingStream needs at least one record")
        self.num_records = num_records
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start = int(start)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch, order = -1, None
        while True:
            g = position * self.world_size + self.rank
            if g // self.num_records != epoch:
                epoch = g // self.num_records
                order = self.permutation(epoch)
            yield epoch, int(order[g % self.num_records])
            position += 1


def pick_holdout(records: Sequence[ImageRecord], count: int, seed: int):
    """Choose `count` readable images (seeded order) to keep out of training for the preview grids.

    Returns (training records, held-out records, held-out images (RGB PIL), unreadable files met as
    [(path, reason)]). Reads files until it has `count` readable ones (all files at most), so a folder of
    only unreadable files is reported here, before training starts, even with count=0.
    """
    # [seed, 2**20]: a stream of its own, apart from the epoch permutations seeded by [seed, epoch]
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(records))
    chosen, images, unreadable = [], [], []
    wanted = max(count, 1)  # with count=0 still find one readable image, to fail early on all-corrupt data
    for i in order:
        try:
            image = load_image(records[i].path)
        except ImageInputError as error:
            unreadable.append((str(records[i].path), str(error)))
            continue
        chosen.append(int(i))
        images.append(image)
        if len(chosen) == wanted:
            break
    if not chosen:
        example = unreadable[0][1] if unreadable else ""
        raise ViLexUsageError(
            f"--data: none of the {len(records)} image files could be read, so there is nothing to train on "
            f"(first error: {example})"
        )
    chosen, images = chosen[:count], images[:count]
    if count and len(records) - len(unreadable) - count < 1:
        raise ViLexUsageError(
            f"--holdout {count} keeps {count} images out of training for the preview grids, but --data has "
            f"only {len(records) - len(unreadable)} readable images checked so far ({len(records)} files): "
            f"use --holdout 0..{max(len(records) - len(unreadable) - 1, 0)}"
        )
    held = set(chosen)
    training = [r for i, r in enumerate(records) if i not in held]
    return training, [records[i] for i in chosen], images, unreadable


# ---- shards: the streamed form of the same samples ------------------------------------------------------
# Seeds of their own: [seed, epoch] orders a folder's images, [seed, 1 << 20] picks its holdout.
_PIECE_ORDER, _SHUFFLE_BUFFER = 1 << 21, 1 << 22


def pieces_of_reader(num_pieces: int, seed: int, epoch: int, reader: int, num_readers: int) -> list[int]:
    """The pieces (indices) reader `reader` of `num_readers` reads in `epoch`, in the order it reads them:
    those at the global positions g = epoch * num_pieces + j (j: the place in the epoch's order) with
    g % num_readers == reader."""
    order = np.random.default_rng([seed, _PIECE_ORDER, epoch]).permutation(num_pieces)
    return [int(i) for i in order[(reader - epoch * num_pieces) % num_readers::num_readers]]


def shuffle_buffer(samples: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Bounded shuffle: fill a buffer of `size`, then for each new sample yield a random buffered one and
    put the new one in its place; at the end, drain the buffer in random order. size <= 1 keeps the order."""
    buffer = []
    for sample in samples:
        if size <= 1:
            yield sample
        elif len(buffer) < size:
            buffer.append(sample)
        else:
            j = int(rng.integers(size))
            yield buffer[j]
            buffer[j] = sample
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class ShardStream(IterableDataset):
    """One process's endless stream of samples from shards (see the module's docstring for the split).

    Yields the same sample dicts as ImageFolderDataset (`path` is the sample's key, FILE:KEY or FILE:ROW),
    each also with `position` (reader, epoch, samples of that epoch the reader has yielded after this one).
    `resume_at` sets where each reader starts before the DataLoader is made.
    """

    def __init__(self, source: ShardSource, image_processor, resolution: int, seed: int = 0,
                 random_crop: bool = False, random_flip: bool = False, holdout_keys: Iterable[str] = (),
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, buffer_size: int = 1000):
        self.source = source
        self.image_processor = image_processor
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.holdout_keys = frozenset(holdout_keys)
        self.rank, self.world_size = rank, world_size
        self.readers_per_rank = max(1, num_workers)  # --num-workers 0: the process itself is the one reader
        self.num_readers = world_size * self.readers_per_rank
        self.buffer_size = int(buffer_size)
        self.positions: dict[int, tuple[int, int]] = {}  # reader of this rank -> (epoch, samples yielded)
        self.rotation = 0  # the reader that DataLoader worker 0 plays

    def resume_at(self, positions: dict[int, tuple[int, int]], batches_consumed: int) -> None:
        """Start each reader at its saved (epoch, samples yielded); after b batches the DataLoader's round robin
        has handed out b batches, so the next one is reader b % K's."""
        self.positions = {int(k): (int(e), int(n)) for k, (e, n) in positions.items()}
        self.rotation = batches_consumed % self.readers_per_rank

    def reader_id(self, reader: int) -> int:
        """Global reader number of this rank's reader `reader`."""
        return reader * self.world_size + self.rank

    def raw_epoch(self, epoch: int, reader: int) -> Iterator[RawSample]:
        """Reader `reader`'s samples of `epoch`, undecoded, in shuffled order (held-out samples left out)."""
        global_reader = self.reader_id(reader)
        pieces = pieces_of_reader(len(self.source.pieces), self.seed, epoch, global_reader, self.num_readers)
        samples = (raw for i in pieces for raw in self.source.read_piece(self.source.pieces[i])
                   if raw.key not in self.holdout_keys)
        rng = np.random.default_rng([self.seed, _SHUFFLE_BUFFER, epoch, global_reader])
        return shuffle_buffer(samples, self.buffer_size, rng)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.readers_per_rank:
            raise RuntimeError(f"ShardStream was set up for {self.readers_per_rank} readers per process, "
                               f"the DataLoader has {workers}")
        reader = (worker + self.rotation) % workers
        epoch, start = self.positions.get(reader, (0, 0))
        empty_epochs = 0
        while True:
            count = 0
            for count, raw in enumerate(self.raw_epoch(epoch, reader), start=1):
                if count > start:  # resuming: samples before `start` were trained on; replayed, not decoded
                    yield self.sample(raw, epoch, (reader, epoch, count))
            # Within R epochs every reader is dealt a piece, and a piece yields at least one record: R empty
            # epochs in a row mean its pieces hold nothing but held-out samples (an endless loop otherwise).
            empty_epochs = empty_epochs + 1 if count == 0 else 0
            if empty_epochs > self.num_readers:
                raise ViLexUsageError(f"--data '{self.source.pattern}': reader {self.reader_id(reader)} found no "
                                      f"sample in {empty_epochs} epochs (its pieces hold only held-out samples)")
            epoch, start = epoch + 1, 0

    def sample(self, raw: RawSample, epoch: int, position: tuple[int, int, int]) -> dict:
        seen, common = (raw.key, epoch), {"position": position}
        if raw.error is not None:
            return {"skipped": raw.key, "reason": raw.error, "seen": seen, **common}
        try:
            image = decode_image(raw.image, name=raw.key)
        except ImageInputError as error:
            return {"skipped": raw.key, "reason": str(error), "seen": seen, **common}
        rng = np.random.default_rng([self.seed, epoch, _key_seed(raw.key)])
        sample = prepare_sample(image, rng, self.resolution, self.image_processor, self.random_crop, self.random_flip)
        return {**sample, "caption": raw.caption, "path": raw.key, "seen": seen, **common}


def pick_shard_holdout(source: ShardSource, count: int):
    """The first `count` readable samples in pattern order (from the first shard, usually) for the preview
    grids; the stream leaves them out. Returns (keys, images (RGB PIL), unreadable met as [(key, reason)]).
    Like pick_holdout, reads until one readable sample is found even with count=0, so data where nothing can
    be read is a usage error before training starts."""
    keys, images, unreadable = [], [], []
    wanted = max(count, 1)
    for piece in source.pieces:
        for raw in source.read_piece(piece):
            if raw.error is not None:
                unreadable.append((raw.key, raw.error))
                continue
            try:
                images.append(decode_image(raw.image, name=raw.key))
            except ImageInputError as error:
                unreadable.append((raw.key, str(error)))
                continue
            keys.append(raw.key)
            if len(keys) == wanted:
                return keys[:count], images[:count], unreadable
    if not keys:
        example = unreadable[0][1] if unreadable else ""
        raise ViLexUsageError(f"--data '{source.pattern}': none of the samples in its {source.describe()} could be "
                              f"read, so there is nothing to train on (first error: {example})")
    raise ViLexUsageError(f"--holdout {count} keeps {count} samples out of training for the preview grids, but "
                          f"--data '{source.pattern}' has only {len(keys)} readable ones: use --holdout "
                          f"0..{len(keys) - 1}")


class SampleLog:
    """RUN_DIR/samples/rank-R.jsonl with --log-samples: one line per micro-batch a process consumed,
    {"step": the optimizer step it went into, "reader": the shard reader (null for a folder), "samples":
    [[path or key, epoch], ...] in batch order, unreadable ones included, "skipped": [their keys]}.
    A resumed run first drops the lines past the step it resumes from, as metrics.jsonl does."""

    FOLDER = "samples"

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None = None):
        self.path = Path(run_dir) / self.FOLDER / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            staging = self.path.with_name(f".{self.path.name}.partial")
            staging.write_text("".join(line + "\n" for line in kept))
            os.replace(staging, self.path)
        self.file = open(self.path, "a", buffering=1)  # line-buffered

    def write(self, step: int, batch: dict) -> None:
        reader = batch["position"][0] if batch.get("position") else None
        self.file.write(json.dumps({"step": step, "reader": reader, "samples": [list(s) for s in batch["seen"]],
                                    "skipped": [key for key, _ in batch["skipped"]]}) + "\n")

    def close(self) -> None:
        self.file.close()
