"""ViLexPipeline: images -> ViLex tokens -> text-encoder states -> denoising loop -> images.

The two halves work on their own: `tokenize(images)` and `generate(vilex_tokens, prompt=...)`;
`__call__` is both. Every stage runs through `self.backend` (PyTorch by default; ONNX Runtime,
TensorRT and Triton elsewhere), so the loop below is the only denoising loop in the project.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .backends import StageBackend, TorchBackend
from .bridge import PromptBuilder
from .errors import CheckpointError, ViLexUsageError, check_range
from . import settings
from .model import ViLexModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
COMPONENTS = ("vilex", "image_processor", "text_encoder", "tokenizer", "unet", "vae", "scheduler")


@dataclass
class ViLexPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image]
    vilex_tokens: torch.Tensor | None = None


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Raise a CheckpointError unless `path` is a ViLex pipeline folder with safetensors weights only."""
    path = Path(path)
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise CheckpointError(
            f"CKPT '{path}' is not a ViLex checkpoint: expected a folder with model_index.json "
            f"(make one with `vilex init OUT --preset tiny`)"
        )
    try:
        config = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"CKPT '{path}': model_index.json is not valid JSON: {error}") from None
    missing = [name for name in COMPONENTS if name not in config or not (path / name).is_dir()]
    if config.get("_class_name") != "ViLexPipeline" or missing:
        raise CheckpointError(
            f"CKPT '{path}' is not a ViLex checkpoint: _class_name={config.get('_class_name')!r}, "
            f"missing components {missing} (needs {', '.join(COMPONENTS)})"
        )
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"CKPT '{path}' contains pickle weights {pickles}; only safetensors are loaded "
            f"(pickle files can run code). Convert them with safetensors and remove them."
        )
    for name in ("vilex", "text_encoder", "unet", "vae"):
        if not any((path / name).glob("*.safetensors")):
            raise CheckpointError(f"CKPT '{path}': component '{name}' has no .safetensors weights")
    return path


class ViLexPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "vilex->text_encoder->unet->vae"

    def __init__(self, vilex: ViLexModel, image_processor, text_encoder, tokenizer, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, scheduler):
        super().__init__()
        self.register_modules(vilex=vilex, image_processor=image_processor, text_encoder=text_encoder,
                              tokenizer=tokenizer, unet=unet, vae=vae, scheduler=scheduler)
        # model_index.json records each component's class as loaded. transformers 5 names its PIL-backed image
        # processors apart (`SiglipImageProcessorPil`) and hands that class out for the stock name where
        # torchvision is absent, so a checkpoint would record what else was installed; the stock name is
        # recorded instead, and loads either way.
        library, name = self.config.image_processor
        if name is not None and name.endswith("ImageProcessorPil"):
            self.register_to_config(image_processor=(library, name.removesuffix("Pil")))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.prompt_builder = PromptBuilder(tokenizer, text_encoder.get_input_embeddings(), mix=vilex.mix_tokens)
        self.backend: StageBackend = TorchBackend(self)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a local ViLex checkpoint folder (safetensors only)."""
        path = check_checkpoint(pretrained_model_name_or_path)
        # ViLexModel is not a diffusers/transformers class, so diffusers cannot resolve its library;
        # load it here and hand it over. low_cpu_mem_usage=False keeps non-persistent buffers of the
        # transformers vision model (position ids) off the meta device.
        torch_dtype = kwargs.get("torch_dtype")
        vilex = ViLexModel.from_pretrained(path / "vilex", use_safetensors=True, low_cpu_mem_usage=False,
                                           torch_dtype=torch_dtype)
        # The scheduler is the class its own scheduler_config.json names (model_index.json may disagree
        # after a user swapped schedulers by editing that file).
        kwargs.setdefault("scheduler", load_scheduler(path / "scheduler"))
        return super().from_pretrained(path, vilex=vilex, use_safetensors=True, **kwargs)

    def set_backend(self, backend: StageBackend) -> "ViLexPipeline":
        self.backend = backend
        return self

    @property
    def num_queries(self) -> int:
        return self.vilex.config.num_queries

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    # ---- 1. images -> tokens ---------------------------------------------------------------------
    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """RGB PIL images -> pixel_values (B, 3, H, W) with the vision encoder's own preprocessing."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def tokenize(self, images: Sequence[PIL.Image.Image] | PIL.Image.Image, num_tokens: int | None = None) -> torch.Tensor:
        """Images -> ViLex tokens (B, k, D), float32, k = num_tokens (1..N, default N)."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        k = self.num_queries if num_tokens is None else settings.check_num_tokens(num_tokens, self.num_queries)
        vilex_tokens = self.backend("vilex_encoder", pixel_values=self.preprocess(images))  # (B, N, D)
        return vilex_tokens[:, :k].float()

    # ---- 2. tokens (+ text) -> text-encoder states ----------------------------------------------
    def encode_prompt(self, vilex_tokens: torch.Tensor | None, prompts: Sequence[str | None] | None,
                      order: str = "vilex_first") -> torch.Tensor:
        inputs_embeds = self.prompt_builder(vilex_tokens, prompts, order=order)  # (B, 77, D)
        return self.backend("text_encoder", inputs_embeds=inputs_embeds)

    # ---- 3. the denoising loop ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        vilex_tokens: torch.Tensor | None,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = settings.DEFAULT_STEPS,
        guidance_scale: float = settings.DEFAULT_GUIDANCE,
        negative_prompt: str | Sequence[str | None] | None = None,
        text_guidance_scale: float | None = None,
        order: str = settings.DEFAULT_ORDER,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback_on_step_end=None,
    ) -> ViLexPipelineOutput:
        """ViLex tokens (B, k, D) [+ prompt] -> images.

        vilex_tokens None with a prompt is plain text-to-image through the same text encoder (the caption
        baseline of `vilex eval`).
        guidance_scale: classifier-free guidance against the empty prompt (<= 1 turns it off).
        negative_prompt: text that replaces the empty prompt in the unconditional branch, as in diffusers
            (one string for all images or one per image; None or "" is the empty prompt). It needs
            guidance_scale > 1: without classifier-free guidance there is no unconditional branch, and a
            negative prompt that would be ignored is refused instead.
        text_guidance_scale: with a prompt, eps = eps_u + g * (eps_v - eps_u) + w * (eps_vc - eps_v),
            where eps_v is ViLex only and eps_vc ViLex + text; with g <= 1 this is the paper's
            text-free guidance eps_v + w * (eps_vc - eps_v).
        seed: every image draws its noise from its own generator seeded with `seed` (the j-th of
            num_images_per_prompt copies with seed + j), so an image's result does not depend on what it
            is batched with, on any backend (`seeded_generators`). Without a seed, `generator` (one for the
            batch, or one per image as in diffusers), else a fresh random draw.
        callback_on_step_end: as in diffusers, called after each denoising step as
            `callback_on_step_end(pipeline, step_index, timestep, {"latents": latents})`; it returns that dict,
            and a "latents" in it replaces the loop's. It may raise to stop the loop (the served streaming
            models stop a cancelled request so); the exception propagates and nothing is decoded.
        """
        # 1. Check inputs
        if vilex_tokens is None:
            if prompt is None:
                raise ViLexUsageError("give vilex_tokens, a prompt or both")
            if text_guidance_scale is not None:
                raise ViLexUsageError("text_guidance_scale needs vilex_tokens (it guides from ViLex-only to ViLex + text)")
        elif vilex_tokens.ndim != 3 or vilex_tokens.shape[-1] != self.text_encoder.config.hidden_size:
            raise ViLexUsageError(
                f"vilex_tokens must have shape (B, k, {self.text_encoder.config.hidden_size}), got {tuple(vilex_tokens.shape)}"
            )
        else:
            check_range("number of ViLex tokens", vilex_tokens.shape[1], 1, self.num_queries)
        settings.check_steps(num_inference_steps)
        settings.check_guidance(guidance_scale)
        settings.check_text_guidance(text_guidance_scale)
        settings.check_order(order)
        settings.check_seed(seed)
        check_range("num_images_per_prompt", num_images_per_prompt, 1, settings.MAX_IMAGES_PER_PROMPT)
        # Within the backend's bounds: an export's (as its server's), any size up to MAX_SIDE in PyTorch.
        height = settings.check_side(self.default_size if height is None else height, self.size_multiple, "height",
                                     *self.backend.side_range("height"))
        width = settings.check_side(self.default_size if width is None else width, self.size_multiple, "width",
                                    *self.backend.side_range("width"))
        if text_guidance_scale is not None and not prompt:
            raise ViLexUsageError("text_guidance_scale needs a prompt")
        if output_type not in settings.OUTPUT_TYPES:
            raise ViLexUsageError(f"output_type must be one of {', '.join(settings.OUTPUT_TYPES)}, got {output_type!r}")
        k = 0 if vilex_tokens is None else vilex_tokens.shape[1]
        if vilex_tokens is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            B = len(prompts)
        else:
            B = vilex_tokens.shape[0]
            prompts = [prompt] * B if isinstance(prompt, str) or prompt is None else list(prompt)
        if len(prompts) != B:
            raise ViLexUsageError(f"got {len(prompts)} prompts for {B} images")
        for p in prompts:
            check_prompt_fits(self.prompt_builder, p, k)
        negatives = [negative_prompt] * B if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if len(negatives) != B:
            raise ViLexUsageError(f"got {len(negatives)} negative prompts for {B} images")
        if any(negatives) and guidance_scale <= 1.0:
            raise ViLexUsageError(f"negative_prompt needs guidance_scale > 1 (it replaces the empty prompt of "
                                  f"classifier-free guidance, which guidance_scale {guidance_scale:g} turns off)")
        for p in negatives:
            check_prompt_fits(self.prompt_builder, p, 0, name="negative_prompt")
        if seed is not None:  # one generator per image, as every backend does (see seeded_generators)
            generator = seeded_generators([(seed + j) % (settings.MAX_SEED + 1)
                                           for _ in range(B) for j in range(num_images_per_prompt)])

        # 2. Encode the conditions; branches are stacked as [uncond?, vilex-only?, cond]
        if vilex_tokens is not None:
            vilex_tokens = vilex_tokens.repeat_interleave(num_images_per_prompt, dim=0)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [p or "" for p in negatives for _ in range(num_images_per_prompt)]
        has_text = any(prompts) or vilex_tokens is None  # text-only: "" is the (empty) text
        use_cfg = guidance_scale > 1.0
        use_text_free = has_text and text_guidance_scale is not None
        n = len(prompts)
        branches = []
        if use_cfg:
            branches.append(self.encode_prompt(None, negatives))  # the empty prompt unless negative_prompt
        if use_text_free:
            branches.append(self.encode_prompt(vilex_tokens, None, order=order))
        branches.append(self.encode_prompt(vilex_tokens, prompts if has_text else None, order=order))
        device = torch.device(self.backend.device)  # the loop runs where the backend's stages run
        prompt_embeds = torch.cat(branches).float().to(device)  # (n_branches * n, 77, D)

        # 3. Timesteps and initial noise (drawn on the CPU generator, so a seed gives the same image anywhere)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = {"generator": generator} if "generator" in _step_parameters(self.scheduler) else {}

        # 4. Denoise
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            latent_input = self.scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
            timestep = torch.full((latent_input.shape[0],), float(t), dtype=torch.float32, device=device)
            noise_pred = self.backend("unet", sample=latent_input, timestep=timestep,
                                      encoder_hidden_states=prompt_embeds).float()
            chunks = noise_pred.chunk(len(branches))
            if use_cfg and use_text_free:
                eps_u, eps_v, eps_vc = chunks
                noise_pred = eps_u + guidance_scale * (eps_v - eps_u) + text_guidance_scale * (eps_vc - eps_v)
            elif use_cfg:
                eps_u, eps_c = chunks
                noise_pred = eps_u + guidance_scale * (eps_c - eps_u)
            elif use_text_free:
                eps_v, eps_vc = chunks
                noise_pred = eps_v + text_guidance_scale * (eps_vc - eps_v)
            else:
                noise_pred = chunks[0]
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        # 5. Decode
        image = self.decode(latents)  # (n, 3, H, W) in [0, 1]
        if output_type == "pt":
            return ViLexPipelineOutput(images=image, vilex_tokens=vilex_tokens)
        array = image.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return ViLexPipelineOutput(images=array, vilex_tokens=vilex_tokens)
        pil = [PIL.Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array]
        return ViLexPipelineOutput(images=pil, vilex_tokens=vilex_tokens)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (n, C, h, w) -> images (n, 3, H, W) in [0, 1], through the VAE decoder stage."""
        image = self.backend("vae_decoder", latents=latents).float()  # (n, 3, H, W) in [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)

    def __call__(self, images, num_tokens: int | None = None, prompt=None, **generate_kwargs) -> ViLexPipelineOutput:
        """Reconstruct: images -> tokens -> images (optionally mixed with `prompt`)."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        vilex_tokens = self.tokenize(images, num_tokens=num_tokens)
        return self.generate(vilex_tokens, prompt=prompt, **generate_kwargs)


def check_prompt_fits(prompt_builder: PromptBuilder, prompt: str | None, num_vilex_tokens: int, name: str | None = None,
                      fewer: str | None = None) -> None:
    """The prompt-fit rule of `generate`, for every caller (the library, the command line, the served models).

    Raises the PromptBuilder's ViLexUsageError, starting with `name` (the prompt as the caller knows it:
    "--prompt", "PROMPT[0]") and, where fewer ViLex tokens would make room for the prompt, saying how many:
    `fewer` puts that count in the caller's terms ("--tokens <= {}", "NUM_TOKENS[0] <= {}"). Nothing is
    shortened: which tokens to give up is the caller's choice (issue 19).
    """
    try:
        prompt_builder.check_fits(prompt, num_vilex_tokens)
    except ViLexUsageError as error:
        message = f"{name}: {error}" if name else str(error)
        most = prompt_builder.max_vilex_tokens(prompt)
        if num_vilex_tokens and most >= 1:
            message += f"; at most {most} ViLex tokens leave room for it" + (f" ({fewer.format(most)})" if fewer else "")
        elif num_vilex_tokens:
            message += "; it does not fit beside even one ViLex token"
        raise ViLexUsageError(message) from None


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, image i's seeded with seeds[i].

    The rule every backend keeps: an image's noise (its initial latents, and any noise the scheduler draws
    at each step) comes from its own generator, so its result depends on its own inputs and seed only,
    never on the other images it is batched with. `generate(seed=S)` seeds every image with S (the j-th
    of `num_images_per_prompt` copies with S + j), so image i of a batch is the image it would be alone
    with seed S; the served pipeline models seed each image from its SEED input the same way
    (vilex/serving/bls.py), and `vilex reconstruct|generate --seed S` gives the same images in-process
    and served. A single `generator` passed to `generate` is shared by the batch, as in diffusers.
    """
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def load_scheduler(folder: Path):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if not (folder / "scheduler_config.json").is_file():
        raise CheckpointError(f"'{folder}' has no scheduler_config.json")
    config = diffusers.DDIMScheduler.load_config(folder)  # any ConfigMixin reads the JSON the same way
    name = config.get("_class_name")
    scheduler_class = getattr(diffusers, str(name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise CheckpointError(f"'{folder}/scheduler_config.json' names {name!r}, which is not a diffusers scheduler")
    return scheduler_class.from_config(config)


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
