"""The four stages of ViLex inference as plain modules with tensor inputs and outputs.

These are both what the PyTorch backend runs and the wrappers the exporter traces, so a stage means
the same thing on every backend (names and shapes are declared in `vilex.engines.contract`):

    vilex_encoder  pixel_values (B, 3, H, W)                       -> vilex_tokens (B, N, D)   all N; the runtime keeps the first k
    text_encoder   inputs_embeds (B, 77, D)                        -> last_hidden_state (B, 77, D)
    unet           sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, 77, D) -> noise_pred (B, C, h, w)
    vae_decoder    latents (B, C, h, w)                            -> image (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import torch
from torch import nn

from .bridge import TextEncoderFromEmbeds

STAGE_NAMES = ("vilex_encoder", "text_encoder", "unet", "vae_decoder")


class VilexEncoderStage(nn.Module):
    def __init__(self, vilex):
        super().__init__()
        self.vilex = vilex

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vilex(pixel_values, taildrop=False).vilex_tokens  # (B, N, D)


class UNetStage(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderStage(nn.Module):
    """Undoes the VAE's latent scaling, then decodes: the loop hands over latents as the scheduler made them."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]


def stage_modules(pipeline) -> dict[str, nn.Module]:
    """The stage wrappers around a pipeline's components (they share the weights)."""
    return {
        "vilex_encoder": VilexEncoderStage(pipeline.vilex),
        "text_encoder": TextEncoderFromEmbeds(pipeline.text_encoder),
        "unet": UNetStage(pipeline.unet),
        "vae_decoder": VaeDecoderStage(pipeline.vae),
    }
