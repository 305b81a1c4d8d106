"""The toy base's training settings (`vilex toyworld train-base`), apart from the training code so that
building the command line does not import torch and diffusers."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ViLexUsageError, check_range


@dataclass
class BaseConfig:
    out: str
    seed: int = 0
    num_scenes: int = 20_000
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 5000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 50
    zero_terminal_snr: bool = True

    def validate(self) -> "BaseConfig":
        for name in ("num_scenes", "vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "checkpoint_every",
                     "log_every"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_range("--vae-crop", self.vae_crop, 8, 64)
        if self.vae_crop % 4:
            raise ViLexUsageError(f"--vae-crop must be a multiple of 4 (the VAE's factor), got {self.vae_crop}")
        check_range("--warmup-steps", self.warmup_steps, 0, min(self.vae_steps, self.unet_steps))
        check_range("--ema-decay", self.ema_decay, 0.0, 1.0)
        return self
