"""Seeded procedural scenes: RGB images of simple shapes on simple backgrounds, with captions and the
ground-truth attributes that made them.

    scene = make_scene(seed=7)            # one scene from its own seed
    scenes = make_scenes(1000, SPLITS["train"])   # a split: scene i has seed split_seed * 10**7 + i

Every scene holds one object, the *main* object (`objects[0]`). It has a shape, a named color (with a
per-object shade drawn around the named color), a size and a centre drawn from continuous ranges; the
background is flat or a vertical gradient, in a named color. Captions use coarse words only, as real
captions do:

    "a large red circle at the top left on a blue gradient background"

The world was simplified on 2026-12-05 (issue 17) so that a base trained on 2 CPU cores can learn to draw
what its caption says: it had 1-3 objects and striped backgrounds too, and the base drew blobs. The
classes the probe reads (`BACKGROUNDS`) still name stripes, which `DRAWN_BACKGROUNDS` no longer draws, and
`OBJECT_COUNTS` can be widened again: the scene code and captions handle several objects.

The main object's radius was raised from 7-15 px to 11-17 px on 2026-12-05 (issue 17): measured on the
previous base, the VAE round trip kept the shape (as the probe reads it) of 51% of objects of radius 7-9 px
and 93-94% of those of 11-15 px, and the UNet, denoising a real scene's latent from 30% noise, kept 31% and
67-71%: at a 16x16 latent a small object's outline is finer than the latent grid. Its base never learned
shape (chance over 8,000 steps).

Exact position, size and shade are left out of the caption; they are what an image carries and a caption
does not, and what ViLex tokens can carry. `detailed_caption` puts the exact place and size before it, in
digits, for training a base that can be told them (`train-base --detailed-captions`); the caption ViLex is
compared against stays the coarse one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {  # named color -> its RGB; each object's shade is drawn within +-SHADE_JITTER of it per channel
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 55, 185),
    "orange": (240, 130, 30),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = ("flat", "gradient", "striped")  # the kinds the probe tells apart
DRAWN_BACKGROUNDS = ("flat", "gradient")  # the kinds scenes are drawn with
SIZES = ("small", "large")
# 3 x 3 cells of the image; the caption's position words
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SHADE_JITTER = 20
MAIN_RADIUS = (11.0, 17.0)  # main object; "small" below LARGE_FROM
LARGE_FROM = 14.0
OTHER_RADIUS = (3.5, 6.0)  # the other objects are always "small"
OBJECT_COUNTS = (1,)
OBJECT_COUNT_WEIGHTS = (1.0,)
STRIPE_PERIOD = (12.0, 20.0)  # pixels per dark + light stripe pair
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled: anti-aliased edges
SPLITS = {"train": 1, "probe": 2, "heldout": 3, "test": 4}  # split -> split seed; held-out splits never overlap


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    rgb: tuple[int, int, int]  # the drawn shade
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    radius: float  # half the extent, pixels

    @property
    def size(self) -> str:
        return "large" if self.radius >= LARGE_FROM else "small"

    @property
    def cell(self) -> str:
        return CELLS[cell_index(self.x, self.y)]


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]  # objects[0] is the main object
    background: str  # flat | gradient | striped
    background_color: str
    background_rgb: tuple[int, int, int]
    stripe_period: float
    stripe_phase: float
    stripes_vertical: bool

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    @property
    def caption(self) -> str:
        return caption_of(self)

    def attributes(self) -> dict:
        """The main object's and the background's categorical attributes, as class indices for the probe."""
        return {"shape": SHAPES.index(self.main.shape), "color": COLOR_NAMES.index(self.main.color),
                "cell": CELLS.index(self.main.cell), "size": SIZES.index(self.main.size),
                "background": BACKGROUNDS.index(self.background),
                "background_color": COLOR_NAMES.index(self.background_color)}

    def render(self) -> PIL.Image.Image:
        return render(self)

    def to_json(self) -> dict:
        return asdict(self)


def _bin(v: float, bins: int) -> int:
    """Which of `bins` equal stripes of the image a coordinate in pixels falls in."""
    return min(int(v * bins // IMAGE_SIZE), bins - 1)


def cell_index(x: float, y: float) -> int:
    return _bin(y, 3) * 3 + _bin(x, 3)


def _jittered(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    base = np.array(COLORS[color])
    return tuple(int(v) for v in np.clip(base + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3), 0, 255))


def make_scene(seed: int) -> Scene:
    """The scene of `seed`: the same seed gives the same scene on every machine (numpy's PCG64)."""
    rng = np.random.default_rng(seed)
    background = DRAWN_BACKGROUNDS[rng.integers(len(DRAWN_BACKGROUNDS))]
    background_color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    count = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_WEIGHTS))
    # Objects never take the background's color, so every object is visible.
    object_colors = [c for c in COLOR_NAMES if c != background_color]
    objects = []
    for i in range(count):
        radius = float(rng.uniform(*(MAIN_RADIUS if i == 0 else OTHER_RADIUS)))
        margin = radius + 1.0  # wholly inside the image
        color = object_colors[rng.integers(len(object_colors))]
        objects.append(SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))], color=color, rgb=_jittered(rng, color),
            x=float(rng.uniform(margin, IMAGE_SIZE - margin)), y=float(rng.uniform(margin, IMAGE_SIZE - margin)),
            radius=radius))
    return Scene(seed=seed, objects=tuple(objects), background=background, background_color=background_color,
                 background_rgb=_jittered(rng, background_color), stripe_period=float(rng.uniform(*STRIPE_PERIOD)),
                 stripe_phase=float(rng.uniform(0, 1)), stripes_vertical=bool(rng.integers(2)))


def scene_seed(split_seed: int, index: int) -> int:
    return split_seed * 10**7 + index


def make_scenes(count: int, split_seed: int, start: int = 0) -> list[Scene]:
    return [make_scene(scene_seed(split_seed, i)) for i in range(start, start + count)]


def recolored(scene: Scene, color: str) -> Scene:
    """The scene with its main object in the named `color`; the object's shade keeps its offset from its named
    color (clipped to 0..255), and everything else stays as it is."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {', '.join(COLOR_NAMES)}, got {color!r}")
    main = scene.main
    shade = np.array(COLORS[color]) + np.array(main.rgb) - np.array(COLORS[main.color])
    rgb = tuple(int(v) for v in np.clip(shade, 0, 255))
    return replace(scene, objects=(replace(main, color=color, rgb=rgb), *scene.objects[1:]))


def recolor_edit(scene: Scene) -> tuple[Scene, str]:
    """An edit that ends in `scene`: (the same scene with its main object in another color, the word that
    turns it back). The other color is neither the object's nor the background's, drawn from the scene's seed;
    the word is the main object's color name. These are the pairs `make-data --edits` writes, for training
    tokens that leave the object's color to a color word after them (`vilex train --edit-prob`)."""
    rng = np.random.default_rng([scene.seed, 11])
    allowed = [c for c in COLOR_NAMES if c not in (scene.main.color, scene.background_color)]
    return recolored(scene, allowed[int(rng.integers(len(allowed)))]), scene.main.color


# ---- captions ------------------------------------------------------------------------------------------
def _position_phrase(cell: str) -> str:
    return "in the center" if cell == "center" else f"at the {cell}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background_phrase(scene: Scene, color: str) -> str:
    kind = {"flat": "plain", "gradient": "gradient", "striped": "striped"}[scene.background]
    return f"on {_article(color)} {color} {kind} background"


def describe_object(obj: SceneObject, **words: str) -> str:
    words = {"size": obj.size, "color": obj.color, "shape": obj.shape, "cell": obj.cell} | words
    return f"a {words['size']} {words['color']} {words['shape']} {_position_phrase(words['cell'])}"


# A caption's words that `caption_of` can swap, and the values each can take.
SWAPPABLE = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES, "cell": CELLS, "background_color": COLOR_NAMES}


def caption_words(scene: Scene) -> dict[str, str]:
    """The caption's words that `caption_of` can swap, by SWAPPABLE key: the main object's and the background's
    color."""
    main = scene.main
    return {"shape": main.shape, "color": main.color, "size": main.size, "cell": main.cell,
            "background_color": scene.background_color}


def caption_of(scene: Scene, **swap: str) -> str:
    """The scene's caption; `swap` replaces words of the main object ("shape", "color", "size", "cell") or the
    background's color ("background_color"), e.g. caption_of(scene, shape="cross"): the hard negatives of
    the vision pretraining."""
    for key, value in swap.items():
        if key not in SWAPPABLE or value not in SWAPPABLE[key]:
            raise ValueError(f"caption_of: cannot swap {key}={value!r}; swappable: "
                             + "; ".join(f"{k} in {', '.join(v)}" for k, v in SWAPPABLE.items()))
    background_color = swap.pop("background_color", scene.background_color)
    objects = " and ".join(describe_object(o, **(swap if i == 0 else {})) for i, o in enumerate(scene.objects))
    return f"{objects} {_background_phrase(scene, background_color)}"


# The parts of a caption `partial_caption` can keep: the main object's words and the background phrase.
CAPTION_PARTS = ("size", "color", "shape", "cell", "background")


def partial_caption(scene: Scene, keep) -> str:
    """The main object's caption with only the parts in `keep` (of CAPTION_PARTS), in the caption's word order,
    e.g. {"color"} -> "green", {"shape", "background"} -> "a square on a blue plain background": captions of
    varied detail, as real caption data has. The other objects are left out."""
    keep = set(keep)
    if not keep or not keep <= set(CAPTION_PARTS):
        raise ValueError(f"partial_caption: keep must be a non-empty subset of {CAPTION_PARTS}, got {sorted(keep)}")
    main = scene.main
    words = [getattr(main, part) for part in ("size", "color", "shape") if part in keep]
    if "shape" in keep:
        words.insert(0, _article(words[0]))
    if "cell" in keep:
        words.append(_position_phrase(main.cell))
    if "background" in keep:
        words.append(_background_phrase(scene, scene.background_color))
    return " ".join(words)


def drawn_partial_caption(scene: Scene, uniform=None) -> str:
    """A `partial_caption` of the scene: each of CAPTION_PARTS kept with probability 1/2, an empty draw drawn
    again. `uniform(n)` gives n uniform draws in [0, 1) (`train-base --partial-captions` passes its torch
    generator's); by default they come from the scene's seed, as `make-data --partial-captions` writes them: true
    words about the scene of every kind, alone and together, for training a mixing adapter to keep what such words
    agree with (`vilex train --mix-adapter --caption-prob`)."""
    if uniform is None:
        uniform = np.random.default_rng([scene.seed, 13]).random
    while True:
        kept = [float(u) < 0.5 for u in uniform(len(CAPTION_PARTS))]
        if any(kept):
            return partial_caption(scene, [part for part, keep in zip(CAPTION_PARTS, kept) if keep])


# The detail words of `detailed_caption`: the centre in tenths (DETAIL_DIGITS = 1) or hundredths (2) of the image,
# and the radius in 1 px steps from MAIN_RADIUS[0], each digit a word of its own (every digit is one token of any
# CLIP BPE tokenizer). The first digit of a coordinate is its tenth either way.
DETAIL_DIGITS = (1, 2)


def detail_phrase(obj: SceneObject, digits: int = 1) -> str:
    """What a coarse caption leaves out, as digits: "x 3 y 7 r 4" is a centre in the 4th tenth of the width and
    the 8th of the height, radius 15-16 px (MAIN_RADIUS[0] + 4); with digits=2, "x 3 4 y 7 1 r 4" places the centre
    in the 35th hundredth of the width (21.76-22.40 px) and the 72nd of the height."""
    if digits not in DETAIL_DIGITS:
        raise ValueError(f"detail_phrase: digits must be one of {DETAIL_DIGITS}, got {digits!r}")
    radius = min(int(obj.radius - MAIN_RADIUS[0]), int(MAIN_RADIUS[1] - MAIN_RADIUS[0]) - 1)
    x, y = (" ".join(f"{_bin(v, 10 ** digits):0{digits}d}") for v in (obj.x, obj.y))
    return f"x {x} y {y} r {radius}"


def detailed_caption(scene: Scene, digits: int = 1) -> str:
    """The main object's exact place and size (`detail_phrase`), then the caption: a base trained on some of these
    has words for what the coarse caption leaves open, as a web-scale base has seen captions of every level of
    detail. The caption `vilex eval` compares ViLex against stays the coarse one.

    The detail words come first so that, through the causal text encoder, every caption word's hidden state
    carries them. Put after the caption, a warm-started base never read them: over 3,000 UNet steps (half the
    captions detailed) its samples from detailed captions stayed the same as from the caption (centre error
    7.36 px both), as if its cross-attention, settled on the caption words, gave the new positions no weight."""
    return f"{detail_phrase(scene.main, digits)} {scene.caption}"


def caption_vocabulary() -> list[str]:
    """Every word a caption can use (the toy tokenizer makes each one a single token)."""
    words = {"a", "an", "at", "the", "in", "and", "on", "background", "plain", "gradient", "striped"}
    words |= set(SHAPES) | set(COLOR_NAMES) | set(SIZES)
    for cell in CELLS:
        words |= set(cell.split())
    return sorted(words)


# ---- rendering -----------------------------------------------------------------------------------------
def _background(scene: Scene) -> np.ndarray:
    """(H, W, 3) float32 in 0..255."""
    rgb = np.array(scene.background_rgb, dtype=np.float32)
    H = W = IMAGE_SIZE
    if scene.background == "flat":
        return np.broadcast_to(rgb, (H, W, 3)).copy()
    if scene.background == "gradient":
        # top: the color; bottom: 45% darker
        fade = np.linspace(1.0, 0.55, H, dtype=np.float32)[:, None, None]  # (H, 1, 1)
        return np.broadcast_to(rgb * fade, (H, W, 3)).copy()
    coordinate = np.arange(W if scene.stripes_vertical else H, dtype=np.float32) + 0.5
    # A smooth (anti-aliased) square wave between the color and a 40% darker version of it.
    wave = np.sin(2 * np.pi * (coordinate / scene.stripe_period + scene.stripe_phase))
    light = np.clip(wave * 3.0, -1.0, 1.0) * 0.5 + 0.5  # (L,) in 0..1
    factor = 0.6 + 0.4 * light
    factor = factor[None, :, None] if scene.stripes_vertical else factor[:, None, None]
    return np.broadcast_to(rgb * factor, (H, W, 3)).copy()


def _polygon(obj: SceneObject, scale: float) -> list[tuple[float, float]] | None:
    x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
    if obj.shape == "square":
        s = r * 0.85  # a square of the same visual weight as the circle
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if obj.shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if obj.shape == "cross":
        a, b = r, r * 0.33
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b), (x + b, y + b),
                (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b), (x - a, y - b), (x - b, y - b)]
    return None  # circle


def object_mask(obj: SceneObject) -> np.ndarray:
    """(H, W) float32 coverage of the object in 0..1 (anti-aliased)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    polygon = _polygon(obj, SUPERSAMPLE)
    if polygon is None:
        x, y, r = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene) -> PIL.Image.Image:
    image = _background(scene)  # (H, W, 3)
    for obj in reversed(scene.objects):  # the main object (index 0) last, on top
        coverage = object_mask(obj)[..., None]  # (H, W, 1)
        image = image * (1 - coverage) + np.array(obj.rgb, dtype=np.float32) * coverage
    return PIL.Image.fromarray(np.round(image).clip(0, 255).astype(np.uint8), "RGB")


def render_all(scenes: list[Scene]) -> np.ndarray:
    """Scenes -> (N, 64, 64, 3) uint8."""
    return np.stack([np.asarray(s.render()) for s in scenes])


def fingerprint(scenes: list[Scene]) -> str:
    """sha256 of the scenes' definitions (seeds and attributes): names a data set exactly."""
    digest = hashlib.sha256()
    for scene in scenes:
        digest.update(json.dumps(scene.to_json(), sort_keys=True).encode())
    return digest.hexdigest()
