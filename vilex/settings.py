"""Generation settings: the defaults and the rules for them, in one place.

The library (`ViLexPipeline.generate`), the command line, the Triton pipeline models and the benchmarks
all take their defaults from here and check values with these functions, so a default or a bound cannot
differ between them. Each check takes the name the caller knows the value by (`num_inference_steps`,
`--steps`, `STEPS[2]`), and every error names it with the allowed values.

NaN and infinities are refused everywhere: a NaN guidance scale fails every comparison and would
otherwise silently turn guidance off.
"""

from __future__ import annotations

from .errors import ViLexUsageError, check_range

DEFAULT_STEPS = 25
MAX_STEPS = 1000  # the schedulers' num_train_timesteps
# A server's bound on one request's work (`vilex triton-repo --max-steps`, at most MAX_STEPS), which its
# requests' STEPS and PREVIEW_EVERY are checked against instead of MAX_STEPS.
DEFAULT_SERVED_MAX_STEPS = 200
# The most ViLex tokens any checkpoint has (N): a 77-position CLIP text encoder keeps two for BOS and EOS.
# A checkpoint's own N (its `num_queries`) may be smaller; commands check 1..MAX_VILEX_TOKENS before they
# load anything, and 1..N once they know it.
MAX_VILEX_TOKENS = 75
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance against the empty prompt; <= 1 turns it off
GUIDANCE_RANGE = (0.0, 100.0)
TEXT_GUIDANCE_RANGE = (0.0, 100.0)  # the text-free guidance weight w
ORDERS = ("vilex_first", "text_first")
DEFAULT_ORDER = "vilex_first"
MAX_IMAGES_PER_PROMPT = 64
MAX_SIDE = 4096  # pixels, height and width
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any non-negative int64
OUTPUT_TYPES = ("pil", "np", "pt")


def check_steps(value, name: str = "num_inference_steps", high: int = MAX_STEPS) -> int:
    check_range(name, value, 1, high)
    return int(value)


def check_guidance(value, name: str = "guidance_scale") -> float:
    check_range(name, value, *GUIDANCE_RANGE)
    return float(value)


def check_text_guidance(value, name: str = "text_guidance_scale") -> float | None:
    """None means no text-free guidance."""
    if value is None:
        return None
    check_range(name, value, *TEXT_GUIDANCE_RANGE)
    return float(value)


def check_order(value, name: str = "order") -> str:
    if value not in ORDERS:
        raise ViLexUsageError(f"{name} must be one of {', '.join(ORDERS)}, got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int | None:
    """None means a fresh random draw (the library) or the default seed (the server)."""
    if value is None:
        return None
    check_range(name, value, 0, MAX_SEED)
    return int(value)


def check_num_tokens(value, num_queries: int, name: str = "num_tokens") -> int:
    check_range(name, value, 1, num_queries)
    return int(value)


def check_side(value, multiple: int, name: str, low: int = 1, high: int = MAX_SIDE) -> int:
    """A height or width: a positive multiple of `multiple` (the VAE factor times the UNet's downsampling)
    in low..high (a server passes its export's bounds)."""
    check_range(name, value, low, high)
    if value % multiple:
        raise ViLexUsageError(f"{name} must be a positive multiple of {multiple} in {low}..{high}, got {value}")
    return int(value)
