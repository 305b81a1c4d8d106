"""What a training run is: TrainConfig, its checks, and how a resumed run reads it back.

    TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=300).validate()
    config_for_resume("runs/a", num_workers=4)

A run saves its config as RUN_DIR/train_config.json with every default filled in (the warmup length
too), so a resumed run trains with the numbers the run started with, whatever the defaults are then.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ViLexUsageError, check_range

CONFIG_FILE = "train_config.json"
MIXED_PRECISION = ("no", "bf16", "fp16")
# Options a resumed run may change: they do not touch the numbers of the optimisation.
# (--num-workers too, for a folder; with shards each worker is a reader of its own, so a resume checks that
# it is unchanged: state.py.)
RESUME_OVERRIDABLE = ("num_workers", "log_every", "progress", "preview_every", "preview_steps", "preview_guidance",
                      "checkpoint_every", "keep_checkpoints", "log_samples")
# Without --warmup-steps a run warms up for 5% of its steps, at most 500: a fixed 500 would be longer
# than a short run (--max-steps 300) and take most of a run of 1000 steps.
DEFAULT_WARMUP_PERCENT = 5
MAX_DEFAULT_WARMUP_STEPS = 500


def default_warmup_steps(max_steps: int) -> int:
    """min(500, 5% of max_steps), rounded down and at least 0."""
    return max(0, min(MAX_DEFAULT_WARMUP_STEPS, max_steps * DEFAULT_WARMUP_PERCENT // 100))


@dataclass
class TrainConfig:
    """Everything a run needs; saved as RUN_DIR/train_config.json (a resumed run reads it back)."""

    checkpoint: str  # CKPT: a ViLex pipeline folder (`vilex init`)
    data: str  # folder of images (+ name.txt captions), or WebDataset .tar / parquet shards (a file or pattern)
    out: str  # RUN_DIR
    max_steps: int = 10_000  # optimizer steps
    batch_size: int = 8  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    pooler_lr: float = 3e-4
    vision_lr: float = 1e-5
    train_vision: bool = False  # the vision encoder is frozen unless this is set
    weight_decay: float = 0.01  # on weight matrices and queries; not on biases and norms
    # linear warmup, then cosine decay to 0 at max_steps; None: default_warmup_steps(max_steps), filled
    # in when the config is made
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA)
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None  # min-SNR weighting; 5.0 is the usual value
    taildrop: bool = True
    taildrop_prob: float | None = None  # None: the checkpoint's
    caption_prob: float = 0.5  # share of captioned samples trained as ViLex + text
    # each word of such a caption dropped with this probability (at least one kept); 0: the whole caption
    caption_word_drop: float = 0.0
    edit_prob: float = 0.0  # share of samples with an edit (name.edit.png + .txt) trained as the edit
    # hidden width of a mixing adapter trained alone (the encoder frozen; ViLexModel.mix_adapter); 0: none
    mix_adapter: int = 0
    mix_adapter_words: bool = False  # the new mixing adapter also reads the words beside the tokens
    resolution: int | None = None  # VAE input size; None: the UNet's native size
    random_crop: bool = False
    random_flip: bool = False
    num_workers: int = 2
    shuffle_buffer: int = 1000  # shards: samples each reader shuffles among (0 or 1: shard order, unshuffled)
    image_column: str | None = None  # parquet: the image column; None: "image"
    caption_column: str | None = None  # parquet: the caption column; None: "text", else "caption", else none
    log_samples: bool = False  # RUN_DIR/samples/rank-R.jsonl: the keys of every sample each process consumed
    seed: int = 0
    holdout: int = 4  # images kept out of training and reconstructed in the preview grids
    preview_every: int = 1000  # 0: previews only at the end; also off with holdout 0
    preview_steps: int = 25
    preview_guidance: float = 7.5
    checkpoint_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 2  # 0 keeps all
    log_every: int = 10
    progress: bool = True
    cpu: bool = False  # train on CPU even when a GPU is there

    def __post_init__(self):
        if self.warmup_steps is None:
            check_range("--max-steps", self.max_steps, 1)  # the default warmup is a share of it
            self.warmup_steps = default_warmup_steps(self.max_steps)

    def validate(self) -> "TrainConfig":
        check_range("--max-steps", self.max_steps, 1)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--gradient-accumulation-steps", self.gradient_accumulation_steps, 1)
        check_range("--warmup-steps", self.warmup_steps, 0, self.max_steps)
        for name, value in (("--pooler-lr", self.pooler_lr), ("--vision-lr", self.vision_lr)):
            if not value > 0:
                raise ViLexUsageError(f"{name} must be > 0, got {value}")
        check_range("--weight-decay", self.weight_decay, 0.0)
        check_range("--max-grad-norm", self.max_grad_norm, 0.0)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ViLexUsageError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        check_range("--ema-decay", self.ema_decay, 0.0, 1.0)
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ViLexUsageError(f"--snr-gamma must be > 0, got {self.snr_gamma}")
        if self.taildrop_prob is not None:
            check_range("--taildrop-prob", self.taildrop_prob, 0.0, 1.0)
        check_range("--caption-prob", self.caption_prob, 0.0, 1.0)
        check_range("--caption-word-drop", self.caption_word_drop, 0.0, 1.0)
        check_range("--edit-prob", self.edit_prob, 0.0, 1.0)
        check_range("--mix-adapter", self.mix_adapter, 0)
        if self.mix_adapter and self.train_vision:
            raise ViLexUsageError("--mix-adapter trains the mixing adapter alone, with the encoder frozen; "
                                  "leave out --train-vision")
        if self.mix_adapter_words and not self.mix_adapter:
            raise ViLexUsageError("--mix-adapter-words is a kind of mixing adapter; give --mix-adapter HIDDEN too")
        if self.mix_adapter and not (self.caption_prob > 0 or self.edit_prob > 0):
            raise ViLexUsageError("--mix-adapter learns only from samples with words beside the tokens; give "
                                  "--edit-prob or --caption-prob above 0")
        if self.resolution is not None:
            check_range("--resolution", self.resolution, 8, 4096)
        for name in ("num_workers", "shuffle_buffer", "holdout", "preview_every", "checkpoint_every",
                     "keep_checkpoints"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        check_range("--preview-steps", self.preview_steps, 1, 1000)
        check_range("--preview-guidance", self.preview_guidance, 0.0, 100.0)
        check_range("--log-every", self.log_every, 1)
        for flag, value in (("--image-column", self.image_column), ("--caption-column", self.caption_column)):
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ViLexUsageError(f"{flag} must name a column of the parquet files, got {value!r}")
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def write_run_config(run_dir: str | os.PathLike, config: TrainConfig) -> None:
    """Start RUN_DIR with its train_config.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=1))


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ViLexUsageError(f"--resume '{run_dir}' is not a training run: it has no {CONFIG_FILE}")
    saved = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def config_for_resume(run_dir: str | os.PathLike, **overrides) -> TrainConfig:
    """The config RUN_DIR was started with; overrides may change only RESUME_OVERRIDABLE options."""
    config = load_run_config(run_dir)
    for name, value in overrides.items():
        if name not in RESUME_OVERRIDABLE:
            raise ViLexUsageError(f"--{name.replace('_', '-')} cannot change when resuming (a resumed run keeps its "
                                  f"options); these can: {', '.join(RESUME_OVERRIDABLE)}")
        setattr(config, name, value)
    config.out = str(run_dir)
    return config
