"""Training data: a folder of images (with optional caption sidecars) -> batches for the objective.

    DIR/**/name.{jpg,jpeg,png,webp}     an image (searched recursively)
    DIR/**/name.txt                     its caption (optional): the sample may be trained as ViLex + text

Each image is resized (shorter side to the VAE resolution) and cropped square once; that square is
both the VAE's input, in [-1, 1], and the input of the vision encoder's own image processor, so the
encoder sees exactly what the diffusion model is asked to re-create.

Sample order is a stream of (epoch, index) keys: epoch e is a permutation of the images seeded by
(seed, e), and rank r of w processes takes every w-th key. A run that resumes after b batches starts
the stream at key b * batch_size and so sees exactly the samples an uninterrupted run would.
Augmentations are seeded by (seed, epoch, index), so they do not depend on which worker ran them.

Unreadable files are not a crash: the dataset returns a "skipped" record, `collate` drops it from the
batch, and the trainer counts the file in its final report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ImageInputError, ViLexUsageError
from ..images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption_path: Path | None  # the `name.txt` sidecar, when there is one


def find_images(root: str | os.PathLike) -> list[ImageRecord]:
    """Every image under `root` (recursive, sorted), with its caption sidecar if present."""
    root = Path(root)
    if not root.is_dir():
        raise ViLexUsageError(f"--data '{root}' is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ViLexUsageError(
            f"--data '{root}' holds no images: expected {', '.join(IMAGE_SUFFIXES)} files (searched recursively)"
        )
    records = []
    for path in paths:
        caption = path.with_suffix(CAPTION_SUFFIX)
        records.append(ImageRecord(path, caption if caption.is_file() else None))
    return records


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


class ImageFolderDataset(Dataset):
    """Indexed by (epoch, index) keys from `TrainingStream`; returns one preprocessed sample.

    A sample is a dict with `pixel_values` (3, S, S) for the vision encoder, `vae_pixels` (3, R, R),
    `caption` (str or None) and `path`; an unreadable file gives {"skipped": path, "reason": message}.
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
        try:
            image = load_image(record.path)
        except ImageInputError as error:
            return {"skipped": str(record.path), "reason": str(error)}
        # Seeded by (seed, epoch, index): the same augmentation whichever worker loads it, and on resume.
        rng = np.random.default_rng([self.seed, epoch, index])
        offset = (float(rng.random()), float(rng.random())) if self.random_crop else (0.5, 0.5)
        square = crop_square(image, self.resolution, offset)
        if self.random_flip and rng.random() < 0.5:
            square = square.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixel_values = self.image_processor(images=[square], return_tensors="pt")["pixel_values"][0]  # (3, S, S)
        return {"pixel_values": pixel_values, "vae_pixels": to_vae_pixels(square), "caption": read_caption(record),
                "path": str(record.path)}


def collate(samples: list[dict]) -> dict:
    """Stack the readable samples; unreadable ones are listed under `skipped` as (path, reason).

    pixel_values (b, 3, S, S) and vae_pixels (b, 3, R, R) are None when no sample of the batch was readable.
    """
    good = [s for s in samples if "skipped" not in s]
    skipped = [(s["skipped"], s["reason"]) for s in samples if "skipped" in s]
    if not good:
        return {"pixel_values": None, "vae_pixels": None, "captions": [], "paths": [], "skipped": skipped}
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]),
        "vae_pixels": torch.stack([s["vae_pixels"] for s in good]),
        "captions": [s["caption"] for s in good],
        "paths": [s["path"] for s in good],
        "skipped": skipped,
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
