"""Where training figures go: RUN_DIR/metrics.jsonl always, TensorBoard when it is installed.

One JSON object per line: {"step": 120, "loss": 0.11, "lr_pooler": 0.0003, "images_per_s": 41.2, ...}.
A resumed run first drops the lines past the step it resumes from, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            staging = self.path.with_name(f".{METRICS_FILE}.partial")
            staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(staging, self.path)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most the current line
        self.writer = None
        self.tensorboard_note = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                self.tensorboard_note = "TensorBoard is not installed (pip install tensorboard); metrics go to metrics.jsonl only"

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
