"""What a finished run leaves behind: RUN_DIR/pipeline, RUN_DIR/report.json, and the TrainResult."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..outputs import atomic_folder

REPORT_FILE = "report.json"
PIPELINE_DIR = "pipeline"


@dataclass
class TrainResult:
    run_dir: Path
    pipeline: Path  # the trained ViLex pipeline folder
    steps: int
    final_loss: float
    images_per_s: float
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason, for files skipped
    captions_too_long: int = 0


def save_pipeline_folder(checkpoint: str, vilex_state: dict[str, torch.Tensor], taildrop_prob: float | None,
                         out: Path, mix_adapter: int = 0, mix_adapter_words: bool = False) -> Path:
    """OUT: a ViLex pipeline folder with CKPT's frozen components unchanged and the given ViLex weights."""
    from ..pipeline import ViLexPipeline

    # reload CKPT rather than save the in-memory modules: those may have been cast to bf16/fp16
    pipeline = ViLexPipeline.from_pretrained(checkpoint)
    if mix_adapter:  # trained here; CKPT may not have had one
        pipeline.vilex.add_mix_adapter(mix_adapter, mix_adapter_words)
    pipeline.vilex.load_state_dict(vilex_state)
    if taildrop_prob is not None:
        pipeline.vilex.register_to_config(taildrop_prob=taildrop_prob)
    if out.exists():  # left by a run that stopped between writing it and its report
        shutil.rmtree(out)
    with atomic_folder(out, must_be_new=True) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return out


def write_report(run_dir: str | os.PathLike, result: TrainResult, training_images: int, holdout_paths: list) -> None:
    """RUN_DIR/report.json; a run with one is finished."""
    report = {"steps": result.steps, "final_loss": result.final_loss, "images_per_s": result.images_per_s,
              "pipeline": str(result.pipeline), "unreadable_files": len(result.unreadable),
              "unreadable": result.unreadable, "captions_too_long": result.captions_too_long,
              "training_images": training_images, "holdout_images": [str(p) for p in holdout_paths]}
    (Path(run_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1))
