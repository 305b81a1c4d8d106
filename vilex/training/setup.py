"""Setting up a training run: the run folder, devices, the pipeline with what trains and what stays
frozen, the resolution, and the batches. `Trainer.setup` (trainer.py) calls these in this order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import ViLexUsageError
from .config import CONFIG_FILE, TrainConfig
from .data import ShardStream, TrainingStream, collate

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # of the frozen modules


def check_new_run_dir(run_dir: Path) -> None:
    """--out of a new run: a new or empty folder (a run that is there continues with --resume)."""
    if (run_dir / CONFIG_FILE).exists():
        raise ViLexUsageError(f"--out '{run_dir}' already holds a training run; continue it with "
                              f"--resume {run_dir} or choose a new folder")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ViLexUsageError(f"--out '{run_dir}' exists and is not an empty folder; choose a new folder")


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator: devices, mixed precision, data parallel."""
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
        raise ViLexUsageError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    try:
        # Without a GPU, cpu=True is what makes accelerate join the processes that torchrun or `accelerate launch`
        # started (gloo); with cpu=False each one would train alone, as process 0 of 1.
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or not torch.cuda.is_available())
    except ValueError as error:  # accelerate keeps one state per process
        raise ViLexUsageError(f"--mixed-precision {config.mixed_precision}: {error}") from None


def prepare_pipeline(config: TrainConfig, pipeline=None, weight_dtype: torch.dtype = torch.float32):
    """CKPT's pipeline (or the given one) ready to train: the UNet, VAE and text encoder frozen in eval
    mode and cast to weight_dtype; only the ViLex pooler trains, and the vision encoder with --train-vision;
    with --mix-adapter, only the mixing adapter (a new one where CKPT has none). An adapter CKPT has stays
    frozen otherwise."""
    if pipeline is None:
        from ..pipeline import ViLexPipeline

        pipeline = ViLexPipeline.from_pretrained(config.checkpoint)
    pipeline.set_progress_bar_config(disable=True)
    if config.taildrop_prob is not None:
        pipeline.vilex.register_to_config(taildrop_prob=config.taildrop_prob)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
        if weight_dtype != torch.float32:
            module.to(weight_dtype)  # frozen: half precision saves memory; gradients pass through
    vilex = pipeline.vilex
    if config.mix_adapter:
        try:
            adapter = vilex.add_mix_adapter(config.mix_adapter, config.mix_adapter_words)
        except ValueError as error:
            raise ViLexUsageError(f"--mix-adapter {config.mix_adapter}: CKPT '{config.checkpoint}': {error}") from None
        vilex.requires_grad_(False)
        adapter.requires_grad_(True)
        return pipeline
    set_vision_trainable(vilex, config.train_vision)
    vilex.pooler.requires_grad_(True)
    if vilex.mix_adapter is not None:
        vilex.mix_adapter.requires_grad_(False)
    return pipeline


def set_vision_trainable(vilex, trainable: bool) -> None:
    """Train the vision encoder or freeze it. CLIP's post_layernorm stays frozen either way, as in
    ViLexModel: it only feeds the pooled output ViLex does not use, so it would never get a gradient
    (and an unused trainable parameter breaks DistributedDataParallel)."""
    clip = vilex.vision_model.config.model_type == "clip_vision_model"
    for name, parameter in vilex.vision_model.named_parameters():
        parameter.requires_grad_(trainable and not (clip and "post_layernorm" in name))


def training_resolution(config: TrainConfig, pipeline) -> int:
    """The VAE input size: --resolution or the UNet's native size; a multiple of what the UNet halves to."""
    resolution = config.resolution or pipeline.default_size
    multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise ViLexUsageError(f"--resolution must be a multiple of {multiple} for this checkpoint, got {resolution}")
    return resolution


def data_fingerprint(root: str | os.PathLike, records) -> str:
    """SHA-256 of the training images' paths relative to --data: the sample order depends on them.
    (Shards: ShardSource.fingerprint.)"""
    names = "\n".join(str(r.path.relative_to(root)) for r in records)
    return hashlib.sha256(names.encode()).hexdigest()


def make_batches(dataset, config: TrainConfig, rank: int, world_size: int, batches_consumed: int, pin_memory: bool,
                 stream_positions: dict | None = None):
    """This process's batches, from the one after the `batches_consumed` it has already trained on (for a
    ShardStream: each reader from its position in `stream_positions`)."""
    if isinstance(dataset, ShardStream):
        dataset.resume_at(stream_positions or {}, batches_consumed)
        sampler = None
    else:
        sampler = TrainingStream(len(dataset), seed=config.seed, rank=rank, world_size=world_size,
                                 start=batches_consumed * config.batch_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        collate_fn=collate, pin_memory=pin_memory,
                        # its own generator: creating the loader must not draw from the global RNG
                        generator=torch.Generator().manual_seed(config.seed),
                        prefetch_factor=2 if config.num_workers else None)
    return iter(loader)
