"""A served pipeline with `ViLexPipeline`'s surface: `tokenize`, `generate`, `__call__`.

    pipeline = RemotePipeline("127.0.0.1:8000")                 # or ("127.0.0.1:8001", "grpc")
    tokens = pipeline.tokenize(images, num_tokens=16)          # (n, 16, D) float32 tensor
    images = pipeline.generate(tokens, prompt="blue", seed=0).images
    images = pipeline(images, num_tokens=16, seed=0).images    # reconstruct, one round trip per image

So the command line gets one object and calls it the same way, local (`vilex.runtime.open_pipeline`)
or remote. Every image is one request, all sent together from their own client threads (the server
batches them); each image is generated as if alone with `seed` (the server draws noise per image).
Values are checked with `vilex.settings` before anything is sent; what only the server knows (its
token count, its step limit, its export's size bounds) comes back as a ServedRequestError naming the
input (NUM_TOKENS[0], STEPS[0], HEIGHT[0], ...).

With stream=True (gRPC only) every image goes to the streaming model instead (`vilex_generate_stream`,
`vilex_reconstruct_stream`) and, with progress=True, one progress bar counts the denoising steps of all
images as the server reports them; the images are the same as without streaming.

Every option of `ViLexPipeline.generate` but num_images_per_prompt and generator (the server draws noise
from SEED) has a served input: prompt, negative_prompt, guidance_scale, text_guidance_scale, order,
height, width, seed. Options that are not sent keep the server's defaults, which are the library's.
"""

from __future__ import annotations

import secrets
import threading
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from vilex import settings
from vilex.errors import ViLexUsageError, check_range

from .client import PROTOCOLS, ServingError, map_concurrently


class RemotePipeline:
    num_queries = None  # the server checks NUM_TOKENS against its checkpoint

    def __init__(self, url: str, protocol: str = "http", headers: dict | None = None, stream: bool = False):
        if protocol not in PROTOCOLS:
            raise ViLexUsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if "://" in url:
            raise ViLexUsageError(f"--url must be HOST:PORT without a scheme, got {url!r}")
        if stream and protocol != "grpc":
            raise ViLexUsageError(f"--stream needs --protocol grpc (Triton streams responses over gRPC only), "
                                  f"got --protocol {protocol}")
        self.url, self.protocol, self.headers, self.stream = url, protocol, headers, stream

    def streaming(self) -> "RemotePipeline":
        """The same server, through its streaming models (gRPC only)."""
        return RemotePipeline(self.url, self.protocol, self.headers, stream=True)

    def _map(self, work, items: list) -> list:
        return map_concurrently(self.url, self.protocol, work, items, workers=len(items), headers=self.headers)

    # ---- images -> tokens ------------------------------------------------------------------------------
    def tokenize(self, images: Sequence[PIL.Image.Image] | PIL.Image.Image, num_tokens: int | None = None) -> torch.Tensor:
        images = [images] if isinstance(images, PIL.Image.Image) else list(images)
        if num_tokens is not None:  # 1..N: the server knows N, at most MAX_VILEX_TOKENS
            check_range("num_tokens", num_tokens, 1, settings.MAX_VILEX_TOKENS)
        tokens = self._map(lambda client, image: client.tokenize([image], num_tokens=num_tokens), images)
        return torch.from_numpy(np.concatenate(tokens))  # (n, k, D)

    # ---- tokens -> images ------------------------------------------------------------------------------
    def _request_options(self, prompt, n: int, num_inference_steps, guidance_scale, negative_prompt,
                         text_guidance_scale, order, height, width, seed, output_type) -> tuple[list, dict]:
        """([(prompt, negative prompt) per image], the client options every image shares)."""
        settings.check_steps(num_inference_steps)
        settings.check_guidance(guidance_scale)
        settings.check_text_guidance(text_guidance_scale)
        settings.check_order(order)
        settings.check_seed(seed)
        for name, value in (("height", height), ("width", width)):
            if value is not None:  # the multiple and the bounds are the export's: the server checks those
                check_range(name, value, 1, settings.MAX_SIDE)
        if output_type not in ("pil", "np"):
            raise ViLexUsageError(f"output_type must be 'pil' or 'np' over Triton, got {output_type!r}")
        per_image = []
        for what, value in (("prompts", prompt), ("negative prompts", negative_prompt)):
            values = [value] * n if value is None or isinstance(value, str) else list(value)
            if len(values) != n:
                raise ViLexUsageError(f"got {len(values)} {what} for {n} images")
            per_image.append(values)
        # No seed: a fresh draw, as the library does (the server's own default would repeat seed 0).
        seed = secrets.randbelow(settings.MAX_SEED) if seed is None else int(seed)
        options = dict(steps=int(num_inference_steps), guidance=float(guidance_scale), seed=seed,
                       text_guidance=settings.check_text_guidance(text_guidance_scale), order=order,
                       height=height, width=width)
        return list(zip(*per_image)), options

    @staticmethod
    def _output(images: list[np.ndarray], output_type: str, vilex_tokens=None):
        from vilex.pipeline import ViLexPipelineOutput

        if output_type == "np":  # as the library's: float in [0, 1]
            return ViLexPipelineOutput(images=np.stack(images).astype(np.float32) / 255.0, vilex_tokens=vilex_tokens)
        return ViLexPipelineOutput(images=[PIL.Image.fromarray(image) for image in images], vilex_tokens=vilex_tokens)

    def generate(self, vilex_tokens, prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = settings.DEFAULT_STEPS, guidance_scale: float = settings.DEFAULT_GUIDANCE,
                 negative_prompt: str | Sequence[str | None] | None = None, text_guidance_scale: float | None = None,
                 order: str = settings.DEFAULT_ORDER, height: int | None = None, width: int | None = None,
                 seed: int | None = None, output_type: str = "pil", progress: bool = True):
        """ViLex tokens (n, k, D) [+ prompt] -> images, one request per image."""
        if vilex_tokens is None:
            raise ViLexUsageError("over Triton, generate needs vilex_tokens (the served models have no text-only path)")
        tokens = np.ascontiguousarray(torch.as_tensor(vilex_tokens).float().numpy())
        if tokens.ndim != 3:
            raise ViLexUsageError(f"vilex_tokens must have shape (n, k, D), got {tuple(tokens.shape)}")
        texts, options = self._request_options(prompt, len(tokens), num_inference_steps, guidance_scale,
                                               negative_prompt, text_guidance_scale, order, height, width, seed,
                                               output_type)
        items = list(zip(tokens, texts))
        if self.stream:
            with StepProgress(len(items), options["steps"], enabled=progress) as bar:
                images = self._map(lambda client, item: bar.follow(client.generate_stream(
                    item[0][None], prompt=item[1][0], negative_prompt=item[1][1], **options)), items)
        else:
            images = self._map(lambda client, item: client.generate(item[0][None], prompt=item[1][0],
                                                                    negative_prompt=item[1][1], **options)[0], items)
        return self._output(images, output_type, torch.from_numpy(tokens))

    def __call__(self, images, num_tokens: int | None = None, prompt=None, **generate_kwargs):
        """Reconstruct: images -> tokens -> images on the server (vilex_reconstruct), one request per image."""
        images = [images] if isinstance(images, PIL.Image.Image) else list(images)
        if num_tokens is not None:  # 1..N: the server knows N, at most MAX_VILEX_TOKENS
            check_range("num_tokens", num_tokens, 1, settings.MAX_VILEX_TOKENS)
        output_type = generate_kwargs.get("output_type", "pil")
        progress = generate_kwargs.pop("progress", True)
        defaults = dict(num_inference_steps=settings.DEFAULT_STEPS, guidance_scale=settings.DEFAULT_GUIDANCE,
                        negative_prompt=None, text_guidance_scale=None, order=settings.DEFAULT_ORDER, height=None,
                        width=None, seed=None, output_type="pil")
        unknown = set(generate_kwargs) - set(defaults)
        if unknown:
            raise ViLexUsageError(f"unknown options {sorted(unknown)}; RemotePipeline takes {sorted(defaults)}")
        texts, options = self._request_options(prompt, len(images), **{**defaults, **generate_kwargs})
        items = list(zip(images, texts))
        if self.stream:
            with StepProgress(len(items), options["steps"], enabled=progress) as bar:
                results = self._map(lambda client, item: bar.follow(client.reconstruct_stream(
                    [item[0]], num_tokens=num_tokens, prompt=item[1][0], negative_prompt=item[1][1], **options)), items)
        else:
            results = self._map(lambda client, item: client.reconstruct([item[0]], num_tokens=num_tokens,
                                                                        prompt=item[1][0], negative_prompt=item[1][1],
                                                                        **options)[0], items)
        return self._output(results, output_type)


class StepProgress:
    """One progress bar (tqdm, on stderr) over the denoising steps of `images` streamed requests of `steps` steps
    each; `follow(events)` advances it from one request's events (from that request's thread) and returns its
    image (H, W, 3)."""

    def __init__(self, images: int, steps: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.steps = steps
        self.bar = tqdm(total=images * steps, unit="step", desc="denoising", disable=not enabled)
        self.lock = threading.Lock()  # one bar, updated from every request's thread

    def follow(self, events) -> np.ndarray:
        """`events`: a client.EventStream of one image's request, read to its end (the server's final flag)."""
        done, image = 0, None
        with events:
            for event in events:  # client.StreamEvent: one per step, then the one with the image
                if event.images is not None:
                    image = event.images[0]
                    continue
                with self.lock:
                    if done == 0 and event.total_steps != self.steps:  # a scheduler that takes more steps than asked
                        self.bar.total += event.total_steps - self.steps
                    self.bar.update(event.step - done)
                done = event.step
        if image is None:
            raise ServingError("the stream ended without an image")
        return image

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
