"""What the served pipeline models take and return, declared once.

The config generator (`config.py`), the request checks (`pipeline_requests.py`) and the client
(`client.py`) all read these declarations, so a name or dtype cannot differ between them.

    vilex_tokenize     IMAGE | IMAGE_RGB [, NUM_TOKENS]                      -> VILEX_TOKENS
    vilex_generate     VILEX_TOKENS [, NUM_TOKENS, GENERATION_OPTIONS...]   -> IMAGE
    vilex_reconstruct  IMAGE | IMAGE_RGB [, NUM_TOKENS, GENERATION_OPTIONS...] -> IMAGE
    vilex_generate_stream, vilex_reconstruct_stream
                       the same inputs [, PREVIEW_EVERY]   -> a stream (decoupled): per step STEP, TOTAL_STEPS
                                                              [+ PREVIEW], then IMAGE, then the final flag

GENERATION_OPTIONS are the optional per-image settings of `ViLexPipeline.generate`: PROMPT,
NEGATIVE_PROMPT, STEPS, GUIDANCE, TEXT_GUIDANCE, ORDER, HEIGHT, WIDTH and SEED.

Every tensor has a leading batch dimension n (images in the request; Triton's `max_batch_size`), which
the dims below leave out, as config.pbtxt does. Per-image values (NUM_TOKENS, SEED, ...) are (n, 1).
An image comes either encoded (IMAGE: PNG/JPEG/... bytes, one per row) or raw (IMAGE_RGB: uint8 RGB,
(n, H, W, 3)); images go out as uint8 RGB (n, H, W, 3). Triton itself rejects a wrong dtype, rank or
fixed size with a 400 that names the input; everything else is checked in `pipeline_requests.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vilex.settings import GUIDANCE_RANGE, MAX_SEED, ORDERS, TEXT_GUIDANCE_RANGE

# Triton dtype name -> numpy dtype name (TYPE_STRING travels as numpy object arrays of bytes).
TRITON_TO_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT32": "int32", "TYPE_INT64": "int64",
                   "TYPE_UINT8": "uint8", "TYPE_STRING": "object", "TYPE_BOOL": "bool"}
NUMPY_TO_TRITON = {v: k for k, v in TRITON_TO_NUMPY.items()}
# The same dtypes as tritonclient names them on the wire.
TRITON_TO_WIRE = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
                  "TYPE_UINT8": "UINT8", "TYPE_STRING": "BYTES", "TYPE_BOOL": "BOOL"}

# The streaming models take the inputs of the model they stream and run its code (bls.py), answering with
# a stream of responses over gRPC (Triton's decoupled transaction policy).
STREAM_MODELS = {"vilex_generate_stream": "vilex_generate", "vilex_reconstruct_stream": "vilex_reconstruct"}
PIPELINE_MODELS = ("vilex_tokenize", "vilex_generate", "vilex_reconstruct", *STREAM_MODELS)
PIPELINE_OUTPUTS = {"vilex_tokenize": "VILEX_TOKENS", "vilex_generate": "IMAGE", "vilex_reconstruct": "IMAGE",
                    "vilex_generate_stream": "IMAGE", "vilex_reconstruct_stream": "IMAGE"}

MAX_PROMPT_BYTES = 4096  # far above what fits in 77 CLIP positions; bounds the tokenizer's work


@dataclass(frozen=True)
class Port:
    """One input or output of a served model."""

    name: str
    triton_dtype: str  # "TYPE_FP32", ...
    dims: tuple[int, ...]  # without the batch dimension; -1 is any size
    optional: bool = False
    doc: str = ""

    @property
    def numpy_dtype(self) -> str:
        return TRITON_TO_NUMPY[self.triton_dtype]

    @property
    def wire_dtype(self) -> str:
        return TRITON_TO_WIRE[self.triton_dtype]


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    doc: str
    decoupled: bool = False  # answers each request with a stream of responses (config: model_transaction_policy)

    def input(self, name: str) -> Port:
        return next(p for p in self.inputs if p.name == name)


# The optional per-image generation settings, (n, 1) each, in the order the configs list them. They map
# one to one onto `ViLexPipeline.generate`'s arguments; the bounds are vilex.settings' (HEIGHT and WIDTH:
# the export's, read from its contract by the pipeline model).
GENERATION_OPTIONS = (
    Port("PROMPT", "TYPE_STRING", (1,), optional=True,
         doc="UTF-8 text mixed with the ViLex tokens; it must fit next to them in the text encoder"),
    Port("NEGATIVE_PROMPT", "TYPE_STRING", (1,), optional=True,
         doc="UTF-8 text in place of the empty prompt of classifier-free guidance (needs GUIDANCE > 1)"),
    Port("STEPS", "TYPE_INT32", (1,), optional=True, doc="denoising steps, 1..max_steps"),
    Port("GUIDANCE", "TYPE_FP32", (1,), optional=True,
         doc=f"classifier-free guidance scale, {GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g} (<= 1: off)"),
    Port("TEXT_GUIDANCE", "TYPE_FP32", (1,), optional=True,
         doc=f"text-free guidance weight, {TEXT_GUIDANCE_RANGE[0]:g}..{TEXT_GUIDANCE_RANGE[1]:g}, "
             f"from ViLex-only to ViLex + PROMPT (needs PROMPT; default: none)"),
    Port("ORDER", "TYPE_STRING", (1,), optional=True,
         doc=f"where the prompt goes relative to the ViLex tokens: {' or '.join(ORDERS)} (default {ORDERS[0]})"),
    Port("HEIGHT", "TYPE_INT32", (1,), optional=True,
         doc="output height in pixels, within the export's bounds, a multiple of its pixel step (default: native)"),
    Port("WIDTH", "TYPE_INT32", (1,), optional=True,
         doc="output width in pixels, within the export's bounds, a multiple of its pixel step (default: native)"),
    Port("SEED", "TYPE_INT64", (1,), optional=True,
         doc=f"initial-noise seed per image, 0..{MAX_SEED} (default 0); results do not depend on batching"),
)
NUM_TOKENS = Port("NUM_TOKENS", "TYPE_INT32", (1,), optional=True, doc="keep the first k ViLex tokens (default: all)")
# The streaming models' one input of their own, (n, 1), and their outputs: every response is one of
#   progress  STEP, TOTAL_STEPS (n, 1) [+ PREVIEW (n, H, W, 3)]  one per denoising step, in order
#   result    IMAGE (n, H, W, 3)                                   once, after the last step
# and then an empty response with Triton's final flag.
# A stream's error responses reach a gRPC client as a message without its status code (tritonclient 2.73's
# stream callback gets InferenceServerException(msg) only), so a streaming model starts the message of a
# caller's mistake (INVALID_ARG) with this, and the client turns it back into a ServedRequestError.
STREAM_INVALID_ARG_PREFIX = "invalid argument: "
PREVIEW_EVERY = Port("PREVIEW_EVERY", "TYPE_INT32", (1,), optional=True,
                     doc="send a PREVIEW (the VAE decoder's image of the current latents) every k steps, "
                         "1..max_steps, the same for every image of a request (default: no previews)")
STREAM_OUTPUTS = (
    Port("STEP", "TYPE_INT32", (1,), doc="denoising steps done, 1..TOTAL_STEPS (progress responses)"),
    Port("TOTAL_STEPS", "TYPE_INT32", (1,), doc="denoising steps of the request (progress responses)"),
    Port("PREVIEW", "TYPE_UINT8", (-1, -1, 3), doc="the current latents decoded, RGB (H, W, 3), every PREVIEW_EVERY steps"),
    Port("IMAGE", "TYPE_UINT8", (-1, -1, 3), doc="the generated RGB pixels (H, W, 3) (the result response)"),
)
PER_IMAGE_PORTS = {port.name: port for port in (NUM_TOKENS, *GENERATION_OPTIONS, PREVIEW_EVERY)}


def pipeline_models(hidden_size: int, num_queries: int) -> dict[str, ServedModel]:
    """The pipeline models (three, and the two streaming ones) for a checkpoint whose tokens are (k, hidden_size), k in 1..num_queries."""
    N, D = num_queries, hidden_size
    image = Port("IMAGE", "TYPE_STRING", (1,), optional=True,
                 doc="encoded image bytes (PNG, JPEG, WebP, ...), one per row; give IMAGE or IMAGE_RGB")
    image_rgb = Port("IMAGE_RGB", "TYPE_UINT8", (-1, -1, 3), optional=True,
                     doc="raw RGB pixels (H, W, 3); give IMAGE or IMAGE_RGB")
    num_tokens = Port("NUM_TOKENS", "TYPE_INT32", (1,), optional=True,
                      doc=f"keep the first k ViLex tokens, 1..{N} (default: all)")
    tokens_in = Port("VILEX_TOKENS", "TYPE_FP32", (-1, D), doc=f"ViLex tokens (k, {D}), k in 1..{N}")
    tokens_out = Port("VILEX_TOKENS", "TYPE_FP32", (-1, D), doc=f"ViLex tokens (k, {D})")
    image_out = Port("IMAGE", "TYPE_UINT8", (-1, -1, 3), doc="generated RGB pixels (H, W, 3)")
    models = {
        "vilex_tokenize": ServedModel("vilex_tokenize", (image, image_rgb, num_tokens), (tokens_out,),
                                      "images -> ViLex tokens"),
        "vilex_generate": ServedModel("vilex_generate", (tokens_in, num_tokens, *GENERATION_OPTIONS),
                                      (image_out,), "ViLex tokens (+ text) -> images"),
        "vilex_reconstruct": ServedModel("vilex_reconstruct", (image, image_rgb, num_tokens, *GENERATION_OPTIONS),
                                         (image_out,), "images -> tokens -> images"),
    }
    for name, streamed in STREAM_MODELS.items():
        models[name] = ServedModel(name, (*models[streamed].inputs, PREVIEW_EVERY), STREAM_OUTPUTS,
                                   f"{models[streamed].doc}, streaming its progress", decoupled=True)
    return models
