"""Checking one request of a pipeline model and turning it into pipeline arguments.

Triton has already checked each input's dtype, rank and fixed sizes against config.pbtxt (a mismatch is
a 400 naming the input before the model sees it). What is left is checked here, and every problem is a
ViLexUsageError whose message names the input (and the image's row for per-image values), which the
model turns into a per-request `TritonError.INVALID_ARG` (HTTP 400, gRPC INVALID_ARGUMENT).

Inputs are numpy arrays with the batch axis first: n images per request, per-image values (n, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from vilex import settings
from vilex.errors import ViLexUsageError, check_range
from vilex.images import MAX_IMAGE_PIXELS, check_pixel_count, decode_image

from .interface import MAX_PROMPT_BYTES


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the pipeline model reads these from its config and checkpoint."""

    num_queries: int  # N: tokens per image
    hidden_size: int  # D
    max_steps: int
    default_steps: int
    default_guidance: float
    # Output sides in pixels: the export's bounds (its UNet contract's latent axes times the VAE factor),
    # each a multiple of side_multiple; default_size is the checkpoint's native side.
    default_size: int
    height_range: tuple[int, int]
    width_range: tuple[int, int]
    side_multiple: int
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_export(cls, dims, unet_contract, max_steps: int, default_steps: int, default_guidance: float) -> "Limits":
        """The limits of an export: `dims` (ModelDims) and the UNet's GraphContract give the sizes."""
        f = dims.vae_scale_factor
        height, width = unet_contract.axes["latent_height"], unet_contract.axes["latent_width"]
        return cls(num_queries=dims.num_queries, hidden_size=dims.hidden_size, max_steps=max_steps,
                   default_steps=default_steps, default_guidance=default_guidance, default_size=dims.default_size,
                   height_range=(height.min * f, height.max * f), width_range=(width.min * f, width.max * f),
                   side_multiple=dims.pixel_multiple)


@dataclass
class PipelineRequest:
    """One request, checked; every list has one entry per image (row)."""

    n: int
    images: list[PIL.Image.Image] = field(default_factory=list)  # tokenize / reconstruct
    vilex_tokens: np.ndarray | None = None  # generate: (n, k, D) float32
    num_tokens: list[int] = field(default_factory=list)
    prompts: list[str | None] = field(default_factory=list)
    negative_prompts: list[str | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    guidance: list[float] = field(default_factory=list)
    text_guidance: list[float | None] = field(default_factory=list)  # None: no text-free guidance
    orders: list[str] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    preview_every: int = 0  # streaming models: a PREVIEW every k steps (0: none); one k per request

    def shared_settings(self, row: int) -> tuple:
        """What one generate() call shares across its images: rows run together only where these are equal
        (prompts, negative prompts and seeds are per image)."""
        return (self.num_tokens[row], self.steps[row], self.guidance[row], self.text_guidance[row], self.orders[row],
                self.heights[row], self.widths[row])


def parse_request(model: str, inputs: dict[str, np.ndarray], limits: Limits, prompt_builder=None) -> PipelineRequest:
    """Check the inputs of a `model` request ("vilex_tokenize", "vilex_generate" or "vilex_reconstruct").

    prompt_builder (the pipeline's) checks that each PROMPT fits next to its tokens."""
    n = _batch_size(inputs)
    request = PipelineRequest(n=n)
    if model in ("vilex_tokenize", "vilex_reconstruct"):
        request.images = read_images(inputs, n, limits.max_image_pixels)
        available = limits.num_queries
    else:
        if "VILEX_TOKENS" not in inputs:  # required in config.pbtxt, yet Triton 2.51 passes requests without it
            raise ViLexUsageError(f"VILEX_TOKENS is required: ViLex tokens (n, k, {limits.hidden_size}) float32, "
                                  f"k in 1..{limits.num_queries}")
        request.vilex_tokens = read_tokens(inputs["VILEX_TOKENS"], limits)
        available = request.vilex_tokens.shape[1]
    request.num_tokens = per_image_ints(inputs, "NUM_TOKENS", n, 1, available, default=available)
    if model == "vilex_tokenize":
        if len(set(request.num_tokens)) > 1:
            raise ViLexUsageError(f"NUM_TOKENS must be the same for every image of a vilex_tokenize request "
                                  f"(its output is one (n, k, D) tensor), got {request.num_tokens}")
        return request
    request.steps = per_image_ints(inputs, "STEPS", n, 1, limits.max_steps, default=limits.default_steps)
    request.guidance = per_image_floats(inputs, "GUIDANCE", n, *settings.GUIDANCE_RANGE, default=limits.default_guidance)
    request.text_guidance = per_image_floats(inputs, "TEXT_GUIDANCE", n, *settings.TEXT_GUIDANCE_RANGE, default=None)
    request.orders = [settings.check_order(order, f"ORDER[{i}]") if order is not None else settings.DEFAULT_ORDER
                      for i, order in enumerate(read_texts(inputs, "ORDER", n, empty_is_none=False))]
    request.heights = per_image_sides(inputs, "HEIGHT", n, limits.height_range, limits)
    request.widths = per_image_sides(inputs, "WIDTH", n, limits.width_range, limits)
    for name, sides in (("HEIGHT", request.heights), ("WIDTH", request.widths)):
        if len(set(sides)) > 1:
            raise ViLexUsageError(f"{name} must be the same for every image of a request (its output is one "
                                  f"(n, H, W, 3) tensor), got {sides}")
    request.seeds = per_image_ints(inputs, "SEED", n, 0, settings.MAX_SEED, default=0)
    # PREVIEW_EVERY (the streaming models only; Triton refuses it for the others): one k per request, because a
    # progress response carries the previews of all its images.
    previews = per_image_ints(inputs, "PREVIEW_EVERY", n, 1, limits.max_steps, default=0)
    if len(set(previews)) > 1:
        raise ViLexUsageError(f"PREVIEW_EVERY must be the same for every image of a request (a progress response "
                              f"carries the previews of all of them), got {previews}")
    request.preview_every = previews[0]
    request.prompts = read_texts(inputs, "PROMPT", n)
    request.negative_prompts = read_texts(inputs, "NEGATIVE_PROMPT", n)
    for i in range(n):
        # What generate() would refuse for this image alone, named by input and row.
        if request.text_guidance[i] is not None and not request.prompts[i]:
            raise ViLexUsageError(f"TEXT_GUIDANCE[{i}] needs a PROMPT[{i}] (text-free guidance guides from the "
                                  f"ViLex tokens alone to ViLex tokens + prompt)")
        if request.negative_prompts[i] and request.guidance[i] <= 1.0:
            raise ViLexUsageError(f"NEGATIVE_PROMPT[{i}] needs GUIDANCE[{i}] > 1 (it replaces the empty prompt of "
                                  f"classifier-free guidance, which GUIDANCE {request.guidance[i]:g} turns off)")
    if prompt_builder is not None:
        from vilex.pipeline import check_prompt_fits  # the library's rule and message (it imports torch; here only)

        for i, (prompt, negative, k) in enumerate(zip(request.prompts, request.negative_prompts, request.num_tokens)):
            check_prompt_fits(prompt_builder, prompt, k, name=f"PROMPT[{i}]", fewer=f"NUM_TOKENS[{i}] <= {{}}")
            check_prompt_fits(prompt_builder, negative, 0, name=f"NEGATIVE_PROMPT[{i}]")
    return request


def _batch_size(inputs: dict[str, np.ndarray]) -> int:
    sizes = {name: int(array.shape[0]) for name, array in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise ViLexUsageError(f"every input must have the same number of rows (one per image), got {sizes}")
    n = next(iter(sizes.values()), 0)
    if n < 1:
        raise ViLexUsageError("the request has no images (every input has 0 rows)")
    return n


# ---- images ----------------------------------------------------------------------------------------------
def read_images(inputs: dict[str, np.ndarray], n: int, max_pixels: int) -> list[PIL.Image.Image]:
    if ("IMAGE" in inputs) == ("IMAGE_RGB" in inputs):
        raise ViLexUsageError("give exactly one of IMAGE (encoded bytes, TYPE_STRING) and IMAGE_RGB "
                              f"(uint8 (H, W, 3)); got {'both' if 'IMAGE' in inputs else 'neither'}")
    if "IMAGE_RGB" in inputs:
        pixels = inputs["IMAGE_RGB"]  # (n, H, W, 3) uint8, checked by Triton
        height, width = pixels.shape[1:3]
        check_pixel_count("IMAGE_RGB", width, height, max_pixels)  # the rule and message of encoded images
        return [PIL.Image.fromarray(np.ascontiguousarray(pixels[i]), mode="RGB") for i in range(n)]
    return [decode_encoded(_as_bytes(inputs["IMAGE"][i, 0]), f"IMAGE[{i}]", max_pixels) for i in range(n)]


def decode_encoded(data: bytes, name: str, max_pixels: int) -> PIL.Image.Image:
    """Encoded bytes -> RGB; decode_image checks the pixel count from the header before decoding anything."""
    if not data:
        raise ViLexUsageError(f"{name}: empty bytes; expected an encoded image (PNG, JPEG, WebP, ...)")
    return decode_image(data, name=name, limit=max_pixels)


def _as_bytes(value) -> bytes:
    # tritonclient sends BYTES as bytes; a str can appear when a client builds the array from text.
    return value.encode() if isinstance(value, str) else bytes(value)


# ---- tokens and per-image values -----------------------------------------------------------------------
def read_tokens(tokens: np.ndarray, limits: Limits) -> np.ndarray:
    """VILEX_TOKENS (n, k, D) float32: k in 1..N, finite."""
    k = tokens.shape[1]
    if not 1 <= k <= limits.num_queries:
        raise ViLexUsageError(f"VILEX_TOKENS must have 1..{limits.num_queries} tokens per image "
                              f"(shape (n, k, {limits.hidden_size})), got k={k}")
    if not np.isfinite(tokens).all():
        raise ViLexUsageError("VILEX_TOKENS contains NaN or infinite values")
    return tokens


def per_image_ints(inputs: dict[str, np.ndarray], name: str, n: int, low: int, high: int, default: int) -> list[int]:
    if name not in inputs:
        return [default] * n
    values = [int(v) for v in inputs[name].reshape(n)]
    for i, value in enumerate(values):
        check_range(f"{name}[{i}]", value, low, high)
    return values


def per_image_floats(inputs: dict[str, np.ndarray], name: str, n: int, low: float, high: float,
                     default: float | None) -> list[float | None]:
    if name not in inputs:
        return [default] * n
    values = [float(v) for v in inputs[name].reshape(n)]
    for i, value in enumerate(values):
        check_range(f"{name}[{i}]", value, low, high)  # NaN and inf are refused, not compared
    return values


def per_image_sides(inputs: dict[str, np.ndarray], name: str, n: int, bounds: tuple[int, int],
                    limits: Limits) -> list[int]:
    """HEIGHT or WIDTH: within the export's bounds, on its pixel multiple; absent: the native size."""
    if name not in inputs:
        return [limits.default_size] * n
    return [settings.check_side(int(v), limits.side_multiple, f"{name}[{i}]", *bounds)
            for i, v in enumerate(inputs[name].reshape(n))]


def read_texts(inputs: dict[str, np.ndarray], name: str, n: int, empty_is_none: bool = True) -> list[str | None]:
    """A STRING input (PROMPT, NEGATIVE_PROMPT, ORDER) as UTF-8 text per image; None where absent (and,
    with empty_is_none, where empty: an empty prompt is no prompt)."""
    if name not in inputs:
        return [None] * n
    texts = []
    for i, value in enumerate(inputs[name].reshape(n)):
        data = _as_bytes(value)
        if len(data) > MAX_PROMPT_BYTES:
            raise ViLexUsageError(f"{name}[{i}] is too long: {len(data)} bytes, at most {MAX_PROMPT_BYTES}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ViLexUsageError(f"{name}[{i}] is not UTF-8 text: {error}") from None
        texts.append((text or None) if empty_is_none else text)
    return texts
