"""Named presets: the shipped trained toy checkpoint, and new, untrained ViLex pipelines built from configs with
a fixed seed (no download).

    toy    the trained toy-world checkpoint shipped in the package (vilex/toyworld/weights): the demo's default
    tiny   every component tiny (a few MB), random: fast tests and CI
    small  the Stable Diffusion structure (same block types, attention, VAE factor 8), CPU-sized
    sd15   the real SD 1.5 UNet / VAE / CLIP-text shapes with a SigLIP-so400m-shaped vision encoder,
           random weights: GPU latency work without downloading weights

`from_local` wraps a user's local Stable Diffusion 1.x/2.x folder and a local vision-encoder folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, SiglipImageProcessor

from .errors import ViLexUsageError
from .model import ViLexModel
from .pipeline import ViLexPipeline, load_scheduler
from .tokenizer import build_clip_tokenizer

PRESETS = ("toy", "tiny", "small", "sd15")


def _sd_scheduler() -> DDIMScheduler:
    # Stable Diffusion 1.x's noise schedule; DDIM is deterministic for a given seed.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _text_encoder(tokenizer: CLIPTokenizer, **config) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **config))


def _word_embedding_std(text_encoder) -> float:
    return float(text_encoder.get_input_embeddings().weight.detach().std())


def _assemble(vision_config: dict, image_size: int, text_encoder, tokenizer, unet, vae, scheduler,
              num_queries: int, pooler: dict) -> ViLexPipeline:
    vilex = ViLexModel(vision_config=vision_config, num_queries=num_queries, output_dim=text_encoder.config.hidden_size,
                       token_scale=_word_embedding_std(text_encoder), **pooler)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return ViLexPipeline(vilex=vilex, image_processor=image_processor, text_encoder=text_encoder,
                         tokenizer=tokenizer, unet=unet, vae=vae, scheduler=scheduler)


def tiny(seed: int = 0) -> ViLexPipeline:
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=64)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    return _assemble(vision, 32, text_encoder, tokenizer, unet, vae, _sd_scheduler(), num_queries=75,
                     pooler=dict(pooler_width=32, pooler_depth=2, pooler_heads=4))


def small(seed: int = 0) -> ViLexPipeline:
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                 num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu")
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256), layers_per_block=1, sample_size=16, cross_attention_dim=256,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=128)
    vision = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, image_size=128, patch_size=16)
    return _assemble(vision, 128, text_encoder, tokenizer, unet, vae, _sd_scheduler(), num_queries=75,
                     pooler=dict(pooler_width=256, pooler_depth=2, pooler_heads=8))


def sd15(seed: int = 0) -> ViLexPipeline:
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    # CLIP ViT-L/14 text tower, as in SD 1.5 (its 49,408-entry table; our tokenizer uses a prefix of it).
    text_encoder = _text_encoder(tokenizer, vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    # SigLIP so400m/14 at 384 px.
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=384, patch_size=14)
    return _assemble(vision, 384, text_encoder, tokenizer, unet, vae, _sd_scheduler(), num_queries=75,
                     pooler=dict(pooler_width=1024, pooler_depth=3, pooler_heads=16))


def toy(seed: int = 0) -> ViLexPipeline:
    """The trained toy checkpoint (its weights are fixed: `seed` does not apply)."""
    from .toyworld.shipped import checkpoint_path

    return ViLexPipeline.from_pretrained(checkpoint_path())


def build_preset(name: str, seed: int = 0) -> ViLexPipeline:
    if name not in PRESETS:
        raise ViLexUsageError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return {"toy": toy, "tiny": tiny, "small": small, "sd15": sd15}[name](seed)


def _listed(keys) -> str:
    keys = sorted(str(k) for k in keys)
    return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"


def from_local(sd_dir: str | os.PathLike, vision_dir: str | os.PathLike, num_queries: int = 75,
               seed: int = 0) -> ViLexPipeline:
    """A new, untrained ViLex pipeline on a local Stable Diffusion 1.x/2.x folder (diffusers layout) and a
    local transformers vision model folder (SigLIP, CLIP, or their full image-text models)."""
    sd_dir, vision_dir = Path(sd_dir), Path(vision_dir)
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        if not (sd_dir / sub).is_dir():
            raise ViLexUsageError(f"--base '{sd_dir}' is not a Stable Diffusion folder in diffusers layout: no '{sub}/'")
    if not (vision_dir / "config.json").is_file():
        raise ViLexUsageError(f"--vision '{vision_dir}' has no config.json (expected a transformers model folder)")
    text_encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae", use_safetensors=True)
    scheduler = load_scheduler(sd_dir / "scheduler")

    # transformers fills weights missing from the files with random values and drops extra ones, with
    # a log line only: a folder whose files are not its config's model must be an error instead.
    vision_full, info = AutoModel.from_pretrained(vision_dir, use_safetensors=True, output_loading_info=True)
    problems = {kind: list(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ViLexUsageError(f"--vision '{vision_dir}': its weight files do not match its config.json: "
                              + "; ".join(f"{kind.replace('_', ' ')} {_listed(keys)}" for kind, keys in problems.items() if keys))
    vision_model = getattr(vision_full, "vision_model", vision_full)  # SiglipModel/CLIPModel -> their vision tower
    config = AutoConfig.from_pretrained(vision_dir)
    vision_config = getattr(config, "vision_config", config).to_dict()
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    hidden = text_encoder.config.hidden_size
    torch.manual_seed(seed)
    vilex = ViLexModel(vision_config=vision_config, num_queries=num_queries, output_dim=hidden,
                       token_scale=_word_embedding_std(text_encoder), pooler_width=hidden, pooler_depth=3,
                       pooler_heads=8 if hidden % 8 == 0 else 1)
    # The vision tower's weights. The one part ViLex does not build is SigLIP's attention-pooling head
    # (`head.*`, see ViLexModel); any other key missing or left over means a folder whose weights are not
    # the model its config describes, and is an error naming the keys.
    missing, unexpected = vilex.vision_model.load_state_dict(vision_model.state_dict(), strict=False)
    unexpected = [key for key in unexpected if not key.startswith("head.")]
    if missing or unexpected:
        raise ViLexUsageError(f"--vision '{vision_dir}': its weights do not match the vision model of its config: "
                              f"missing {_listed(missing)}, unexpected {_listed(unexpected)}")
    return ViLexPipeline(vilex=vilex, image_processor=image_processor, text_encoder=text_encoder,
                         tokenizer=tokenizer, unet=unet, vae=vae, scheduler=scheduler)


def ensure_preset_checkpoint(cache: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """The preset's checkpoint folder in `cache`, made (atomically) on first use and reused after."""
    from .outputs import atomic_folder

    ckpt = Path(cache) / f"{preset}-seed{seed}"
    if not (ckpt / "model_index.json").is_file():
        pipeline = build_preset(preset, seed)
        with atomic_folder(ckpt, must_be_new=True) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
    return ckpt
