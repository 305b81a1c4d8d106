"""The toy base's training settings (`vilex toyworld train-base`), apart from the training code so that
building the command line does not import torch and diffusers."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ViLexUsageError, check_range
from .scenes import DETAIL_DIGITS


# The folder options, what each must hold and how the error names it.
FOLDER_OPTIONS = {
    "init_from": (("unet", "text_encoder", "vae"), "a trained base's pipeline folder (with unet/, text_encoder/, vae/)"),
    "curve_probe": (("config.json",), "a probe folder (vilex toyworld train-probe)"),
}


@dataclass
class BaseConfig:
    out: str
    seed: int = 0
    # A trained base's pipeline folder to start from: its VAE is kept (no VAE stage) and its text encoder and
    # UNet are the starting weights of the text-to-image stage. "": from scratch.
    init_from: str = ""
    num_scenes: int = 20_000
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_crop: int = 64  # 64: whole scenes (crops leave a frame along the border of whole-image reconstructions)
    vae_lr: float = 1e-3
    unet_steps: int = 8000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    decoder_steps: int = 1000  # then the VAE decoder alone, on the frozen encoder's latents; 0: no decoder stage
    decoder_lr: float = 5e-4
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    warmup_steps: int = 100
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 50
    curve_every: int = 1000  # learning curve: caption-only samples read by the probe every N UNet steps; 0: off
    curve_n: int = 64  # held-out captions per learning-curve point
    curve_probe: str = ""  # the probe the learning curve reads samples with; "": the shipped probe
    vae_check_scenes: int = 256  # held-out ("test") scenes the VAE's logged round-trip PSNR is measured on
    zero_terminal_snr: bool = True
    # Captions of varied detail and place (a base that reads words wherever they stand, as ViLex + text puts them
    # after the tokens): the share of captions that keep a random non-empty subset of their parts
    # (`scenes.partial_caption`, each part kept with probability 1/2, an empty draw drawn again), and the share
    # placed after a random number (1 .. as many as fit) of padding positions instead of right after BOS. Both
    # apply to the captions left after the 10% caption dropout.
    partial_captions: float = 0.0
    shifted_captions: float = 0.0
    # The share of (whole) captions preceded by the main object's exact place and size in digits
    # (`scenes.detailed_caption`): gives the base words for what the coarse caption leaves open.
    detailed_captions: float = 0.0
    detail_digits: int = 1  # the detail words' digits per coordinate: 1 (tenths of the image) or 2 (hundredths)
    device: str = "cpu"  # cpu | cuda | cuda:N; not part of a run's identity: a run may continue on another device

    IDENTITY_EXCLUDES = ("device", "vae_check_scenes")  # neither changes what is trained
    # At their default, runs made before these options are the same.
    ADDED_LATER = ("partial_captions", "shifted_captions", "detailed_captions", "detail_digits")

    def identity(self) -> dict:
        """The options that make a run what it is (a rerun must give the same)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.IDENTITY_EXCLUDES and not (k in self.ADDED_LATER and self._is_default(k))}

    def _is_default(self, name: str) -> bool:
        return getattr(self, name) == {f.name: f.default for f in dataclasses.fields(self)}[name]

    # The options only the text-to-image stage reads: --unet-steps 0 refuses them rather than ignore them.
    UNET_STAGE_OPTIONS = {"unet_batch_size": "--unet-batch-size", "unet_lr": "--unet-lr", "ema_decay": "--ema-decay",
                          "min_snr_gamma": "--min-snr-gamma", "curve_probe": "--curve-probe",
                          "zero_terminal_snr": "--no-zero-terminal-snr", "partial_captions": "--partial-captions",
                          "shifted_captions": "--shifted-captions", "detailed_captions": "--detailed-captions",
                          "detail_digits": "--detail-digits"}

    def _check_no_unet_stage(self) -> None:
        if not self.init_from:
            raise ViLexUsageError("--unet-steps 0 keeps a warm start's text encoder and UNet as they are: it needs "
                                  "--init-from (a trained base's pipeline folder)")
        if self.decoder_steps == 0:
            raise ViLexUsageError("--unet-steps 0 with --decoder-steps 0 trains nothing: give either a number of steps")
        given = [flag for name, flag in self.UNET_STAGE_OPTIONS.items() if not self._is_default(name)]
        if given:
            raise ViLexUsageError(f"{', '.join(given)} only act on the text-to-image stage, which --unet-steps 0 "
                                  f"skips (the warm start's text encoder, UNet and scheduler are kept as they are)")
        missing = [entry for entry in ("model_index.json", "tokenizer", "scheduler")
                   if not (Path(self.init_from) / entry).exists()]
        if missing:
            raise ViLexUsageError(f"--unet-steps 0 keeps --init-from's text encoder, UNet, tokenizer and scheduler, "
                                  f"but {self.init_from!r} has no {', '.join(missing)}")

    def validate(self) -> "BaseConfig":
        for name in ("num_scenes", "vae_steps", "vae_batch_size", "unet_batch_size", "checkpoint_every", "log_every"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        # 0 UNet steps keeps a warm start's text encoder and UNet as they are (a decoder-only fine-tune).
        if self.unet_steps == 0:
            self._check_no_unet_stage()
        check_range("--unet-steps", self.unet_steps, 0)
        check_range("--vae-crop", self.vae_crop, 8, 64)
        if self.vae_crop % 4:
            raise ViLexUsageError(f"--vae-crop must be a multiple of 4 (the VAE's factor), got {self.vae_crop}")
        check_range("--decoder-steps", self.decoder_steps, 0)
        check_range("--warmup-steps", self.warmup_steps, 0,
                    min(self.vae_steps, *[steps for steps in (self.unet_steps, self.decoder_steps) if steps]))
        check_range("--ema-decay", self.ema_decay, 0.0, 1.0)
        check_range("--min-snr-gamma", self.min_snr_gamma, 0.0)
        check_range("--curve-every", self.curve_every, 0)
        check_range("--curve-n", self.curve_n, 1, 1000)
        check_range("--vae-check-scenes", self.vae_check_scenes, 1, 10_000)
        check_range("--partial-captions", self.partial_captions, 0.0, 1.0)
        check_range("--shifted-captions", self.shifted_captions, 0.0, 1.0)
        check_range("--detailed-captions", self.detailed_captions, 0.0, 1.0)
        if self.detail_digits not in DETAIL_DIGITS:
            raise ViLexUsageError(f"--detail-digits must be {' or '.join(map(str, DETAIL_DIGITS))}, "
                                  f"got {self.detail_digits}")
        if not self._is_default("detail_digits") and not self.detailed_captions:
            raise ViLexUsageError("--detail-digits sets the digits of the detailed captions: it needs --detailed-captions")
        for name, (entries, what) in FOLDER_OPTIONS.items():
            folder = getattr(self, name)
            if folder and not all((Path(folder) / entry).exists() for entry in entries):
                raise ViLexUsageError(f"--{name.replace('_', '-')} must be {what}, got {folder!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ViLexUsageError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        return self
