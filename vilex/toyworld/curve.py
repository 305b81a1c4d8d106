"""The base's learning curve: while the UNet trains, caption-only samples of held-out scenes are read by
the attribute probe, and the share that shows each attribute of its caption is logged against the step.

    OUT/learning_curve.jsonl   one point per line: {"step": ..., "shape": 0.42, ..., "center_error_px": ...}
    OUT/learning_curve.png     agreement per attribute against the step

A curve still rising at the last point says that more steps would help; a flat one says they would not.
The samples use the pipeline's own inference path (the checkpoint's scheduler, settings.DEFAULT_STEPS,
settings.DEFAULT_GUIDANCE), every point the same captions and the same noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import settings
from .probe import ATTRIBUTES, accuracy, targets_of
from .scenes import SPLITS, caption_of, make_scenes

CURVE_FILE = "learning_curve.jsonl"
DETAILED = "detailed_"  # the prefix of a point's figures from detailed captions (train-base --detailed-captions)
DIGITS = "detail_digits"  # with them: the detail words' digits per coordinate (absent in older points: 1)
PLOT_FILE = "learning_curve.png"


def read_points(folder: Path) -> list[dict]:
    """The logged points in step order, one per step and kind of detailed caption (a point logged twice by a
    resumed run counts once, the last one; a curve continued by a run with finer detail words keeps both points of
    the step where one run ends and the next begins)."""
    path = Path(folder) / CURVE_FILE
    if not path.is_file():
        return []
    points = {}
    for line in path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            points[point["step"], point.get(DIGITS, 1)] = point
    return [points[key] for key in sorted(points)]


@torch.no_grad()
def measure(pipeline, probe, n: int, seed: int = 0, batch_size: int = 32, prompt_of=caption_of) -> dict:
    """Caption-only samples of the first n held-out scenes -> the probe's accuracy against their ground
    truth, per attribute, and the main object's centre error in pixels. `prompt_of(scene)` gives the prompt
    (default: the scene's caption)."""
    scenes = make_scenes(n, SPLITS["heldout"])
    images = []
    for start in range(0, n, batch_size):
        chunk = scenes[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images.append(pipeline.generate(None, prompt=[prompt_of(s) for s in chunk], generator=generators,
                                        output_type="np", progress=False).images)
    pixels = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float()  # (n, 3, H, W) in [0, 1]
    return accuracy(probe, pixels, targets_of(scenes))


def log_point(folder: Path, step: int, point: dict) -> None:
    with open(Path(folder) / CURVE_FILE, "a") as f:
        f.write(json.dumps({"step": step, **{k: round(v, 4) for k, v in point.items()}}) + "\n")
    plot(folder)


def plot(folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = read_points(folder)
    if not points:
        return
    steps = [p["step"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ATTRIBUTES:
        left.plot(steps, [p[name] for p in points], marker="o", label=name)
    left.set(xlabel="UNet step", ylabel="probe agreement with the caption", ylim=(0, 1.02),
             title="caption-only samples, held-out captions")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(steps, [p["center_error_px"] for p in points], marker="o", color="black", label="caption")
    detailed = [p for p in points if DETAILED + "center_error_px" in p]
    for digits, (color, unit) in {1: ("tab:red", "tenths"), 2: ("tab:purple", "hundredths")}.items():
        line = [p for p in detailed if p.get(DIGITS, 1) == digits]
        if line:
            right.plot([p["step"] for p in line], [p[DETAILED + "center_error_px"] for p in line], marker="s",
                       color=color, label=f"detailed caption ({unit})")
    if detailed:
        right.legend(fontsize=8)
    right.set(xlabel="UNet step", ylabel="main object's centre error (px)", ylim=(0, None), title="position")
    right.grid(alpha=0.3)
    fig.suptitle(f"toy base learning curve ({settings.DEFAULT_STEPS} steps, guidance {settings.DEFAULT_GUIDANCE})")
    fig.tight_layout()
    staging = Path(folder) / (PLOT_FILE + ".partial.png")
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    staging.replace(Path(folder) / PLOT_FILE)
