"""The ViLex training objective: re-create the image through the frozen diffusion model.

    image --VAE encoder (frozen, no grad)--> latents x0 (B, C, h, w)
    t ~ U{0..T-1}, noise ~ N(0, I)      --> x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise
    image --vision encoder + pooler--> ViLex tokens (B, N, D), TailDrop keeps a prefix of each
    [BOS] tokens (+ caption) [EOS] [PAD] --text encoder (frozen)--> prompt_embeds (B, 77, D)
    UNet(x_t, t, prompt_embeds) (frozen) --> prediction; loss = || prediction - target ||^2

A sample with an edit (an image before it and the words that turn it into this image; see data.py) is,
with probability edit_prob, trained as the edit: the tokens come from the image before it, the words
follow them, and the loss is still this image's. It asks the tokens to leave to a following word what
the word says (ViLex's mixing of tokens and text), which nothing else in the objective asks of them.

The target is the noise (prediction_type "epsilon") or the velocity sqrt(a_t) noise - sqrt(1 - a_t) x0
("v_prediction"), whichever the checkpoint's scheduler says the UNet was trained for. Min-SNR weighting
(Hang et al. 2023) optionally reweights timesteps. The UNet, text encoder and VAE have
requires_grad=False and stay in eval mode, but the graph runs through the UNet and the text encoder, so
the gradient reaches the pooler (and the vision encoder when it is trained).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..bridge import TextEncoderFromEmbeds
from ..errors import ViLexUsageError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) per-sample loss weights of min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): an x0-space weight of min(SNR, gamma), so that the many easy low-noise
    timesteps stop dominating the gradient.

    The epsilon loss is SNR x the x0 loss, so its weight is min(SNR, gamma) / SNR (1 where SNR = 0). The v
    loss is (SNR + 1) x the x0 loss; diffusers' train_text_to_image weights it by min(SNR, gamma) / (SNR + 1),
    which is 0 at SNR = 0. On a zero-terminal-SNR schedule that is the last timestep, pure noise, the one
    that decides background and layout from the conditioning alone; so here the v weight is
    min(SNR + 1, gamma) / (SNR + 1): 1 up to SNR = gamma - 1, gamma / (SNR + 1) above.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    clipped = snr.clamp(max=gamma)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def drop_words(text: str, p: float, generator: torch.Generator | None) -> str:
    """`text` with each of its whitespace-separated words dropped with probability p, the rest in their order;
    when every word is dropped, one of them (drawn uniformly) is kept. "a large green circle" may become
    "green", "a circle", "large green circle": parts of the caption, down to single words."""
    words = text.split()
    kept = (torch.rand(len(words), generator=generator) >= p).tolist()
    if not any(kept):
        kept[int(torch.randint(len(words), (), generator=generator))] = True
    return " ".join(word for word, keep in zip(words, kept) if keep)


def training_noise_scheduler(scheduler_config) -> DDPMScheduler:
    """A DDPM scheduler with the checkpoint's training noise schedule (betas, T, prediction_type).

    The inference scheduler can be any class (DDIM, Euler, ...); their `add_noise` differ, while the
    forward process the UNet was trained on is the DDPM one of the same betas.
    """
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ViLexUsageError(
            f"the checkpoint's scheduler has prediction_type={prediction_type!r}; training supports "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    return noise_scheduler


class ReconstructionObjective(nn.Module):
    """Holds the pipeline's modules and computes the reconstruction loss of a batch.

    Args:
        pipeline: a ViLexPipeline; its vilex, text_encoder, unet and vae are shared, not copied.
        snr_gamma: min-SNR gamma (5.0 is the paper's value), or None for the plain mean.
        caption_prob: probability that a sample with a caption is trained as ViLex + text.
        caption_word_drop: probability that each word of such a caption is dropped (`drop_words`), so the
            tokens learn to stand beside every part of a caption, single words included; 0 keeps it whole.
        edit_prob: probability that a sample with an edit is trained as the edit (the tokens of the image
            before it + its words); such a sample is not trained with its caption.
        taildrop: sample a per-sample prefix length (the model's TailDrop); off keeps all N tokens.
        train_vision: whether the vision encoder is trained (else it stays in eval mode).
        gradient_checkpointing: recompute the frozen UNet's and text encoder's activations in backward.
    """

    def __init__(self, pipeline, snr_gamma: float | None = None, caption_prob: float = 0.5, taildrop: bool = True,
                 train_vision: bool = False, gradient_checkpointing: bool = False, edit_prob: float = 0.0,
                 caption_word_drop: float = 0.0):
        super().__init__()
        self.vilex = pipeline.vilex
        self.text_encoder = TextEncoderFromEmbeds(pipeline.text_encoder)
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.prompt_builder = pipeline.prompt_builder  # shares the text encoder's word-embedding table
        self.noise_scheduler = training_noise_scheduler(pipeline.scheduler.config)
        self.snr_gamma = snr_gamma
        self.caption_prob = caption_prob
        self.edit_prob = edit_prob
        self.caption_word_drop = caption_word_drop
        self.taildrop = taildrop
        self.train_vision = train_vision
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # diffusers checkpoints the UNet's blocks whenever grad is enabled, also in eval mode.
            self.unet.enable_gradient_checkpointing()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.captions_too_long = 0  # captions that left no room for even one ViLex token

    def train(self, mode: bool = True) -> "ReconstructionObjective":
        """Only the trainable part changes mode: the frozen UNet, text encoder and VAE stay in eval mode."""
        self.training = mode
        for module in (self.text_encoder, self.unet, self.vae):
            module.eval()
        self.vilex.train(mode)
        if not self.train_vision:
            self.vilex.vision_model.eval()
        return self

    # ---- pieces ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, vae_pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """vae_pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f); a posterior sample, or
        its mean when generator is None."""
        posterior = self.vae.encode(vae_pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    def draw_edits(self, edit_texts: Sequence[str | None], batch_size: int,
                   generator: torch.Generator | None) -> list[str | None]:
        """Per sample the words of its edit when it is trained as the edit (probability edit_prob), else None.
        Nothing is drawn with edit_prob 0, so a run without edits draws what it drew before edits existed.
        Words that leave no room for one ViLex token are not trained (counted in `captions_too_long`)."""
        if self.edit_prob <= 0 or not edit_texts:
            return [None] * batch_size
        use_edit = torch.rand(batch_size, generator=generator) < self.edit_prob
        edits: list[str | None] = []
        for b, text in enumerate(edit_texts):
            if not text or not use_edit[b]:
                edits.append(None)
            elif self.prompt_builder.max_vilex_tokens(text) < 1:
                self.captions_too_long += 1
                edits.append(None)
            else:
                edits.append(text)
        return edits

    def assemble_prompts(self, captions: Sequence[str | None], lengths: torch.Tensor,
                         generator: torch.Generator | None,
                         edits: Sequence[str | None] = ()) -> tuple[list[str | None], torch.Tensor]:
        """Pick ViLex-only, ViLex + caption or ViLex + edit words per sample; returns (prompts, kept ViLex
        lengths (B,)).

        A sample trained as an edit (its words in `edits`, see `draw_edits`) always takes its words; otherwise
        a caption is used with probability caption_prob, with each of its words dropped with probability
        caption_word_drop (drawn only when that is above 0, so a run without it draws what it drew before it
        existed). When text and prefix do not both fit in the
        encoder's positions, the ViLex prefix is shortened (TailDrop already trains every prefix); a text
        that leaves no room for one token is not used and is counted in `captions_too_long`.
        """
        B = lengths.shape[0]
        use_text = torch.rand(B, generator=generator) < self.caption_prob  # drawn always: same RNG use with or without captions
        lengths = lengths.clone()
        prompts: list[str | None] = []
        for b in range(B):
            edit = edits[b] if b < len(edits) else None
            text = edit or ((captions[b] if b < len(captions) else None) if use_text[b] else None)
            if not text:
                prompts.append(None)
                continue
            if not edit and self.caption_word_drop > 0:
                text = drop_words(text, self.caption_word_drop, generator)
            room = self.prompt_builder.max_vilex_tokens(text)
            if room < 1:
                self.captions_too_long += 1
                prompts.append(None)
                continue
            lengths[b] = min(int(lengths[b]), room)
            prompts.append(text)
        return prompts, lengths

    def encode_prompt(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) word embeddings -> (B, 77, D) text-encoder states, through the frozen encoder."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # transformers checkpoints CLIP layers only in training mode, and the frozen encoder stays in
            # eval mode; so checkpoint the whole encoder here (one extra forward in backward, as per-layer
            # checkpointing would cost, and its activations are small next to the UNet's).
            return checkpoint(self.text_encoder, inputs_embeds, use_reentrant=False)
        return self.text_encoder(inputs_embeds)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights: 1, or min-SNR-gamma's (see `min_snr_weights`)."""
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        return min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)

    def denoising_loss(self, tokens: torch.Tensor, lengths: torch.Tensor, prompts, latents: torch.Tensor,
                       noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,) of the UNet conditioned on [BOS] tokens[:length] (+ prompt) [EOS]."""
        inputs_embeds = self.prompt_builder(tokens, prompts, lengths=lengths)  # (B, 77, D)
        prompt_embeds = self.encode_prompt(inputs_embeds)  # (B, 77, D)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
        unet_dtype = self.unet.dtype
        prediction = self.unet(noisy_latents.to(unet_dtype), timesteps, prompt_embeds.to(unet_dtype)).sample
        target = self.target(latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    # ---- the training loss -------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, vae_pixels: torch.Tensor, captions: Sequence[str | None] = (),
                generator: torch.Generator | None = None, edit_pixel_values: torch.Tensor | None = None,
                edit_texts: Sequence[str | None] = ()) -> dict:
        """One batch -> {"loss": scalar, "per_sample": (B,), "lengths": (B,), "num_text": int, "num_edits": int}.

        edit_pixel_values (B, 3, S, S) and edit_texts: per sample the image before its edit and the edit's
        words (None for a sample without one), as `collate` gives them.

        All randomness is drawn from `generator` (a CPU generator), so a run is reproducible and
        resumable from the generator's saved state.
        """
        device = pixel_values.device
        # 1. Latents (frozen VAE, no grad)
        latents = self.encode_latents(vae_pixels, generator)  # (B, C, h, w)
        B = latents.shape[0]

        # 2. Timesteps and noise
        T = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, T, (B,), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)

        # 3. Which samples are trained as their edit: their tokens come from the image before it
        edits = self.draw_edits(edit_texts, B, generator)
        if any(edits):
            as_edit = torch.tensor([e is not None for e in edits], device=device)[:, None, None, None]
            pixel_values = torch.where(as_edit, edit_pixel_values.to(device), pixel_values)

        # 4. ViLex tokens (B, N, D) and the kept prefix length per sample (TailDrop)
        vilex_output = self.vilex(pixel_values, taildrop=self.taildrop, generator=generator)

        # 5. ViLex-only, ViLex + caption or ViLex + edit words, then the loss through the frozen text encoder and UNet
        prompts, lengths = self.assemble_prompts(captions, vilex_output.lengths.cpu(), generator, edits)
        per_sample = self.denoising_loss(vilex_output.vilex_tokens, lengths, prompts, latents, noise, timesteps)
        loss = (per_sample * self.timestep_weights(timesteps)).mean()
        return {"loss": loss, "per_sample": per_sample.detach(), "lengths": lengths,
                "num_text": sum(p is not None for p in prompts), "num_edits": sum(e is not None for e in edits)}

    @torch.no_grad()
    def fixed_loss(self, pixel_values: torch.Tensor, vae_pixels: torch.Tensor, timesteps: Sequence[int],
                   seed: int = 0) -> float:
        """A deterministic loss for monitoring: posterior means, all N tokens, no text, the given
        timesteps, noise from `seed`; the unweighted mean over images and timesteps."""
        was_training = self.training
        self.train(False)
        try:
            latents = self.encode_latents(vae_pixels, None)
            tokens = self.vilex(pixel_values, taildrop=False)
            generator = torch.Generator().manual_seed(seed)
            total = 0.0
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=generator).to(latents.device)
                step = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)
                total += float(self.denoising_loss(tokens.vilex_tokens, tokens.lengths, None, latents, noise, step).mean())
            return total / len(timesteps)
        finally:
            self.train(was_training)
