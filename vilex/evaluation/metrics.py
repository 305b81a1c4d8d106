"""Fidelity metrics of reconstructions against their inputs.

    PSNR and SSIM (torchmetrics; SSIM with the usual 11x11 Gaussian window, sigma 1.5) on images in [0, 1]
    toy-world measures read by the attribute probe: agreement per attribute with the scene's ground truth,
    the main object's position error in pixels, and its color error (RGB distance, 0..255 units)

Every figure is a mean over images with a 95% confidence half-width (1.96 standard errors), so two rows
can be told apart from noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


def psnr(reconstructions: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB per image; both (B, H, W, 3) in [0, 1]."""
    r, x = to_tensor(reconstructions), to_tensor(references)
    return peak_signal_noise_ratio(r, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()


def ssim(reconstructions: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(B,) SSIM per image (Wang et al. 2004, Gaussian window 11, sigma 1.5, mean over channels).

    torchmetrics pads by reflection and averages the SSIM map over every pixel; skimage and Wang et al.'s
    MATLAB code average only windows wholly inside the image, which reads 0.01-0.03 higher on 64 px scenes.
    Compare SSIM figures only with figures of the same convention."""
    r, x = to_tensor(reconstructions), to_tensor(references)
    return structural_similarity_index_measure(r, x, data_range=1.0, reduction="none").numpy()


def summarize(values) -> dict:
    """{"mean", "ci95", "n"} of a sequence of per-image values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    spread = float(values.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "ci95": 1.96 * spread / math.sqrt(n) if n > 1 else float("nan"), "n": n}


def color_error(reconstructions: np.ndarray, masks: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(B,) distance between each main object's drawn RGB and the reconstruction's mean RGB over the object's
    true interior (mask > 0.99), in 0..255 units. reconstructions (B, H, W, 3) in [0, 1], masks (B, H, W),
    colors (B, 3) in 0..255."""
    errors = []
    for image, mask, color in zip(reconstructions, masks, colors):
        inside = mask > 0.99
        mean = image[inside].mean(axis=0) * 255.0 if inside.any() else np.full(3, np.nan)
        errors.append(float(np.linalg.norm(mean - color)))
    return np.array(errors)
