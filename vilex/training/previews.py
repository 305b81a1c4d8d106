"""Preview grids of held-out reconstructions, and the deterministic held-out loss logged with them.

    RUN_DIR/previews/step-00001000.png   rows: the held-out images; columns: the input, then
                                         ViLexPipeline.__call__ reconstructions from 1, 16 and N tokens
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..images import make_grid
from .checkpoint import checkpoint_name
from .data import to_vae_pixels

PREVIEWS_DIR = "previews"
PREVIEW_TOKEN_COUNTS = (1, 16)  # and N


def preview_token_counts(num_queries: int) -> list[int]:
    """The token counts of the grid's columns: 1, 16 and N, each at most N."""
    return sorted({min(k, num_queries) for k in PREVIEW_TOKEN_COUNTS} | {num_queries})


def reconstructions(pipeline, squares, token_counts, steps: int, guidance: float, seed: int) -> list[list]:
    """One column per token count: the pipeline's reconstructions (PIL) of the square images."""
    return [pipeline(squares, num_tokens=k, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                     progress=False).images
            for k in token_counts]


def holdout_loss(objective, image_processor, squares, accelerator, seed: int) -> float:
    """The deterministic loss of the held-out images (see ReconstructionObjective.fixed_loss)."""
    device = accelerator.device
    pixel_values = image_processor(images=squares, return_tensors="pt")["pixel_values"].to(device)
    vae_pixels = torch.stack([to_vae_pixels(s) for s in squares]).to(device)  # (B, 3, H, W)
    T = objective.noise_scheduler.config.num_train_timesteps
    timesteps = np.linspace(0, T - 1, 10).round().astype(int).tolist()
    with accelerator.autocast():
        return objective.fixed_loss(pixel_values, vae_pixels, timesteps, seed=seed)


def preview_grid(squares, columns):
    """Rows: each input square (resized to the reconstructions' size), then its reconstructions."""
    size = columns[0][0].size
    return make_grid([[square.resize(size)] + [column[i] for column in columns] for i, square in enumerate(squares)])


def save_preview(run_dir: str | os.PathLike, step: int, grid) -> Path:
    """RUN_DIR/previews/step-XXXXXXXX.png, written under a temporary name and renamed into place."""
    folder = Path(run_dir) / PREVIEWS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{checkpoint_name(step)}.png"
    staging = folder / f".{path.name}.partial"
    grid.save(staging, format="PNG")
    os.replace(staging, path)
    return path
