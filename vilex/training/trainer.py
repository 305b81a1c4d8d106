"""The training loop: AdamW on the trainable ViLex weights, through the frozen diffusion model.

    train(TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=20_000))
    resume("runs/a")

1. set up: accelerate (devices, mixed precision, data parallel), the pipeline from CKPT with the UNet,
   text encoder and VAE frozen, the data stream, AdamW with one learning rate for the pooler and one for
   the vision encoder, linear warmup then cosine decay, optional EMA
2. each optimizer step: `gradient_accumulation_steps` micro-batches through `ReconstructionObjective`,
   gradient clipping, AdamW, schedule, EMA
3. every `log_every` steps a line in metrics.jsonl; every `checkpoint_every` a checkpoint (see
   `checkpoint.py`); every `preview_every` a PNG grid of held-out reconstructions made by
   `ViLexPipeline.__call__` at 1, 16 and N tokens, with a deterministic held-out loss
4. at the end: RUN_DIR/pipeline, a ViLex pipeline folder (the frozen components exactly as in CKPT, the
   trained ViLex weights, the EMA ones with --ema), and report.json

Everything random in a step is drawn from one CPU generator per process, saved in each checkpoint, and
the data stream restarts at the batch it stopped at, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..backends import StageBackend
from ..errors import ViLexUsageError, check_range
from ..images import make_grid
from ..outputs import atomic_folder
from . import checkpoint as ckpt
from .data import ImageFolderDataset, TrainingStream, collate, crop_square, find_images, pick_holdout, to_vae_pixels
from .metrics import MetricsLog
from .objective import ReconstructionObjective

CONFIG_FILE = "train_config.json"
REPORT_FILE = "report.json"
PIPELINE_DIR = "pipeline"
PREVIEWS_DIR = "previews"
MIXED_PRECISION = ("no", "bf16", "fp16")
# Options a resumed run may change: they do not touch the numbers of the optimisation.
RESUME_OVERRIDABLE = ("num_workers", "log_every", "progress", "preview_every", "preview_steps", "preview_guidance",
                      "checkpoint_every", "keep_checkpoints")
PREVIEW_TOKEN_COUNTS = (1, 16)  # and N


@dataclass
class TrainConfig:
    """Everything a run needs; saved as RUN_DIR/train_config.json (a resumed run reads it back)."""

    checkpoint: str  # CKPT: a ViLex pipeline folder (`vilex init`)
    data: str  # folder of images (+ name.txt captions)
    out: str  # RUN_DIR
    max_steps: int = 10_000  # optimizer steps
    batch_size: int = 8  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    pooler_lr: float = 3e-4
    vision_lr: float = 1e-5
    train_vision: bool = False  # the vision encoder is frozen unless this is set
    weight_decay: float = 0.01  # on weight matrices and queries; not on biases and norms
    warmup_steps: int = 500  # linear warmup, then cosine decay to 0 at max_steps
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA)
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None  # min-SNR weighting; 5.0 is the usual value
    taildrop: bool = True
    taildrop_prob: float | None = None  # None: the checkpoint's
    caption_prob: float = 0.5  # share of captioned samples trained as ViLex + text
    resolution: int | None = None  # VAE input size; None: the UNet's native size
    random_crop: bool = False
    random_flip: bool = False
    num_workers: int = 2
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
        if self.resolution is not None:
            check_range("--resolution", self.resolution, 8, 4096)
        for name in ("num_workers", "holdout", "preview_every", "checkpoint_every", "keep_checkpoints"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        check_range("--preview-steps", self.preview_steps, 1, 1000)
        check_range("--preview-guidance", self.preview_guidance, 0.0, 100.0)
        check_range("--log-every", self.log_every, 1)
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    run_dir: Path
    pipeline: Path  # the trained ViLex pipeline folder
    steps: int
    final_loss: float
    images_per_s: float
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason, for files skipped
    captions_too_long: int = 0


class DeviceSafeUNet(StageBackend):
    """Returns the UNet's prediction on the device of its `sample` input.

    Works around ViLexPipeline.generate drawing its initial latents on the CPU (randn_tensor without a
    device) while the modules run on the GPU: the scheduler step would then mix devices. It changes
    nothing when the pipeline and the latents share a device (CPU runs, or once the loop is fixed).
    """

    def __init__(self, inner: StageBackend):
        self.inner = inner
        self.name = inner.name

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.inner.run(stage, inputs)
        return output.to(inputs["sample"].device) if stage == "unet" else output


def set_vision_trainable(vilex, trainable: bool) -> None:
    """Train the vision encoder or freeze it. CLIP's post_layernorm stays frozen either way, as in
    ViLexModel: it only feeds the pooled output ViLex does not use, so it would never get a gradient
    (and an unused trainable parameter breaks DistributedDataParallel)."""
    clip = vilex.vision_model.config.model_type == "clip_vision_model"
    for name, parameter in vilex.vision_model.named_parameters():
        parameter.requires_grad_(trainable and not (clip and "post_layernorm" in name))


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base learning rates at optimizer step `step` (0-based): linear warmup, cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ViLexUsageError(f"--resume '{run_dir}' is not a training run: it has no {CONFIG_FILE}")
    saved = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


class Trainer:
    """Trains a ViLex checkpoint on a folder of images. `train()` runs the whole loop; `setup()` and
    `train_step()` are there for benchmarks and tests that drive it step by step.

    pipeline: an already loaded ViLexPipeline to train instead of loading config.checkpoint (used by the
    benchmark); the final pipeline folder is still assembled from config.checkpoint.
    """

    def __init__(self, config: TrainConfig, pipeline=None, resume: bool = False):
        self.config = config.validate()
        self.run_dir = Path(config.out)
        self.resuming = resume
        self._given_pipeline = pipeline
        self.is_set_up = False
        self.step = 0
        self.batches_consumed = 0  # loader batches of this process, readable or not
        self.samples_seen = 0  # readable samples of this process
        self.images_trained = 0  # readable samples of this process since setup (for images/s)
        self.unreadable: dict[str, str] = {}
        self.last_loss = float("nan")

    # ---- 1. set up ---------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        if self.is_set_up:
            return self
        cfg = self.config
        self._check_run_dir()

        # 1a. The data folder first: its errors are the cheapest to find
        records = find_images(cfg.data)
        training, self.holdout_records, holdout_images, unreadable = pick_holdout(records, cfg.holdout, cfg.seed)
        self.unreadable.update(unreadable)

        # 1b. Devices, mixed precision, data parallel
        from accelerate import Accelerator

        if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
            raise ViLexUsageError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        try:
            self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        except ValueError as error:  # accelerate keeps one state per process
            raise ViLexUsageError(f"--mixed-precision {cfg.mixed_precision}: {error}") from None
        accelerator = self.accelerator
        self.is_main = accelerator.is_main_process
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]

        # 1c. The pipeline; only the ViLex pooler (and the vision encoder with --train-vision) trains
        if self._given_pipeline is not None:
            pipeline = self._given_pipeline
        else:
            from ..pipeline import ViLexPipeline

            pipeline = ViLexPipeline.from_pretrained(cfg.checkpoint)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        if cfg.taildrop_prob is not None:
            pipeline.vilex.register_to_config(taildrop_prob=cfg.taildrop_prob)
        for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            module.requires_grad_(False)
            module.eval()
            if self.weight_dtype != torch.float32:
                module.to(self.weight_dtype)  # frozen: half precision saves memory; gradients pass through
        set_vision_trainable(pipeline.vilex, cfg.train_vision)
        pipeline.vilex.pooler.requires_grad_(True)
        self.trainable_names = [n for n, p in pipeline.vilex.named_parameters() if p.requires_grad]

        # 1d. Preprocessing at the VAE resolution
        resolution = cfg.resolution or pipeline.default_size
        multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        if resolution % multiple:
            raise ViLexUsageError(f"--resolution must be a multiple of {multiple} for this checkpoint, got {resolution}")
        self.resolution = resolution
        self.holdout_squares = [crop_square(image, resolution) for image in holdout_images]
        self.dataset = ImageFolderDataset(training, pipeline.image_processor, resolution, seed=cfg.seed,
                                          random_crop=cfg.random_crop, random_flip=cfg.random_flip)
        self.data_fingerprint = data_fingerprint(cfg.data, training)

        # 1e. Objective, optimizer, schedule, EMA
        objective = ReconstructionObjective(pipeline, snr_gamma=cfg.snr_gamma, caption_prob=cfg.caption_prob,
                                            taildrop=cfg.taildrop, train_vision=cfg.train_vision,
                                            gradient_checkpointing=cfg.gradient_checkpointing)
        optimizer = torch.optim.AdamW(self._param_groups(pipeline.vilex), betas=(0.9, 0.999), eps=1e-8)
        self.objective, self.optimizer = accelerator.prepare(objective, optimizer)
        # The schedule counts optimizer steps; accelerate's scheduler wrapper would step it once per
        # process, so it stays unwrapped.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
        self.trainable = [p for p in pipeline.vilex.parameters() if p.requires_grad]
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=cfg.ema_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank)

        # 1f. Run folder, or the state of the run we resume
        # Seed the global RNG too (dropout, if a trained module has any); a checkpoint restores it.
        torch.manual_seed(cfg.seed * 1_000_003 + self.rank)
        resume_step = None
        if self.resuming:
            if self.is_main:
                ckpt.remove_partial(self.run_dir)
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is not None:
                self.load_checkpoint(latest)
            if self.is_main and cfg.progress:
                print(f"resuming {self.run_dir} from step {self.step}" if latest is not None else
                      f"{self.run_dir} has no checkpoint yet: starting it over from step 0")
            resume_step = self.step
        elif self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=1))
        accelerator.wait_for_everyone()
        self.metrics = MetricsLog(self.run_dir, resume_step=resume_step) if self.is_main else None
        self._batches = self._make_batches()
        self.objective.train()
        self.is_set_up = True
        return self

    def _check_run_dir(self) -> None:
        if self.resuming:
            return
        if (self.run_dir / CONFIG_FILE).exists():
            raise ViLexUsageError(f"--out '{self.run_dir}' already holds a training run; continue it with "
                                  f"--resume {self.run_dir} or choose a new folder")
        if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise ViLexUsageError(f"--out '{self.run_dir}' exists and is not an empty folder; choose a new folder")

    def _param_groups(self, vilex) -> list[dict]:
        """Pooler and vision encoder at their own learning rates; no weight decay on biases and norms."""
        cfg = self.config
        groups = []
        for part, lr in (("pooler", cfg.pooler_lr), ("vision_model", cfg.vision_lr)):
            named = [(n, p) for n, p in vilex.named_parameters() if p.requires_grad and n.startswith(part + ".")]
            for decay in (True, False):
                params = [p for n, p in named if (p.ndim >= 2) == decay]
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                                   "name": f"{part}{'' if decay else '_no_decay'}"})
        return groups

    def _make_batches(self):
        cfg = self.config
        stream = TrainingStream(len(self.dataset), seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                start=self.batches_consumed * cfg.batch_size)
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=stream, num_workers=cfg.num_workers,
                            collate_fn=collate, pin_memory=self.accelerator.device.type == "cuda",
                            # its own generator: creating the loader must not draw from the global RNG
                            generator=torch.Generator().manual_seed(cfg.seed),
                            prefetch_factor=2 if cfg.num_workers else None)
        return iter(loader)

    @property
    def objective_module(self) -> ReconstructionObjective:
        return self.accelerator.unwrap_model(self.objective)

    # ---- 2. one optimizer step ----------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next batch with at least one readable image (batches of only unreadable files are skipped)."""
        while True:
            batch = next(self._batches)
            self.batches_consumed += 1
            for path, reason in batch["skipped"]:
                self.unreadable.setdefault(path, reason)
            if batch["pixel_values"] is not None:
                self.samples_seen += len(batch["paths"])
                return batch
            if self.samples_seen == 0 and self.batches_consumed * self.config.batch_size >= len(self.dataset):
                raise ViLexUsageError(f"--data '{self.config.data}': none of the {len(self.dataset)} training "
                                      f"images could be read")

    def compute_loss(self, batch: dict) -> dict:
        device = self.accelerator.device
        return self.objective(pixel_values=batch["pixel_values"].to(device, non_blocking=True),
                              vae_pixels=batch["vae_pixels"].to(device, non_blocking=True),
                              captions=batch["captions"], generator=self.generator)

    def train_step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its figures."""
        self.setup()
        cfg, accelerator = self.config, self.accelerator
        start = time.perf_counter()
        self.objective.train()
        loss_sum, images, tokens, with_text = torch.zeros((), device=accelerator.device), 0, 0.0, 0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = self.next_batch()
            last = micro == cfg.gradient_accumulation_steps - 1
            # gradients are all-reduced between processes only on the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(self.objective):
                out = self.compute_loss(batch)
                accelerator.backward(out["loss"] / cfg.gradient_accumulation_steps)
            loss_sum += out["loss"].detach()  # stays on the device: no sync per micro-batch
            images += len(batch["paths"])
            tokens += float(out["lengths"].float().sum())
            with_text += out["num_text"]
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm))
        learning_rates = {f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups}  # this step's
        self._optimizer_step()
        if self.ema is not None:
            self.ema.step(self.trainable)
        self.step += 1
        self.images_trained += images
        seconds = time.perf_counter() - start
        self.last_loss = float(loss_sum) / cfg.gradient_accumulation_steps
        figures = {"step": self.step, "loss": self.last_loss, "grad_norm": grad_norm, "images": images * self.world_size,
                   "seconds": seconds, "images_per_s": images * self.world_size / seconds,
                   "mean_vilex_tokens": tokens / max(images, 1), "text_fraction": with_text / max(images, 1),
                   "epoch": self.batches_consumed * cfg.batch_size * self.world_size / len(self.dataset)}
        figures.update(learning_rates)
        return figures

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- 3. checkpoints ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        named = dict(self.pipeline.vilex.named_parameters())
        return {name: named[name] for name in self.trainable_names}

    def save_checkpoint(self) -> Path:
        """Write RUN_DIR/checkpoints/step-XXXXXXXX atomically; returns its path."""
        accelerator = self.accelerator
        staging = ckpt.staging_folder(self.run_dir, self.step)
        final = staging.parent / ckpt.checkpoint_name(self.step)
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # every process: its RNG and data position
        ckpt.save_tensors(staging / f"rng-{self.rank}.safetensors", ckpt.rng_tensors(self.generator))
        ckpt.save_json(staging / f"rank-{self.rank}.json", {
            "batches_consumed": self.batches_consumed, "samples_seen": self.samples_seen,
            "unreadable": self.unreadable, "captions_too_long": self.objective_module.captions_too_long})
        accelerator.wait_for_everyone()
        if self.is_main:
            ckpt.save_tensors(staging / "trainable.safetensors", {k: v.float() for k, v in self.trainable_state().items()})
            optimizer_tensors, optimizer_meta = ckpt.optimizer_to_files(self.optimizer.state_dict())
            ckpt.save_tensors(staging / "optimizer.safetensors", optimizer_tensors)
            ema_meta = None
            if self.ema is not None:
                ema_state = self.ema.state_dict()
                ckpt.save_tensors(staging / "ema.safetensors", dict(zip(self.trainable_names, ema_state.pop("shadow_params"))))
                ema_state.pop("collected_params", None)
                ema_meta = ema_state
            scaler = self.accelerator.scaler
            ckpt.save_json(staging / ckpt.STATE_FILE, {  # last: a folder with state.json is complete
                "step": self.step, "num_processes": self.world_size, "optimizer": optimizer_meta,
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "ema": ema_meta, "trainable_names": self.trainable_names, "config": self.config.to_json(),
                "training_images": len(self.dataset), "data_fingerprint": self.data_fingerprint,
                "versions": _versions()})
            ckpt.commit(staging, final)
            ckpt.prune(self.run_dir, self.config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> None:
        files = ckpt.load_checkpoint_files(folder, self.rank)
        state = files["state"]
        if state["num_processes"] != self.world_size:
            raise ViLexUsageError(f"--resume: the run was saved with {state['num_processes']} processes, this launch "
                                  f"has {self.world_size}; resume with the same number")
        if state["data_fingerprint"] != self.data_fingerprint:
            raise ViLexUsageError(
                f"--resume: the images under --data '{self.config.data}' changed since the checkpoint (it trained on "
                f"{state['training_images']} files, now there are {len(self.dataset)} or other names); an exact "
                f"resume needs the same files, so restore them or start a new run")
        if state["trainable_names"] != self.trainable_names:
            raise ViLexUsageError(f"--resume: checkpoint '{folder}' trains other parameters than this set-up")
        named = dict(self.pipeline.vilex.named_parameters())
        with torch.no_grad():
            for name, value in files["trainable"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(ckpt.optimizer_from_files(files["optimizer"], state["optimizer"]))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in files:
                raise ViLexUsageError(f"--resume: checkpoint '{folder}' has no EMA weights")
            ema_state = dict(state["ema"])
            ema_state["shadow_params"] = [files["ema"][name] for name in self.trainable_names]
            self.ema.load_state_dict(ema_state)
            self.ema.to(self.accelerator.device)
        ckpt.restore_rng(files["rng"], self.generator)
        rank_state = files["rank"]
        self.step = state["step"]
        self.batches_consumed = rank_state["batches_consumed"]
        self.samples_seen = rank_state["samples_seen"]
        self.unreadable.update(rank_state["unreadable"])
        self.objective_module.captions_too_long = rank_state["captions_too_long"]

    # ---- 4. previews and the final pipeline ------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (when there is EMA) for evaluation, then back."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    def holdout_loss(self) -> float:
        """The deterministic loss of the held-out images (see ReconstructionObjective.fixed_loss)."""
        processor = self.pipeline.image_processor
        device = self.accelerator.device
        pixel_values = processor(images=self.holdout_squares, return_tensors="pt")["pixel_values"].to(device)
        vae_pixels = torch.stack([to_vae_pixels(s) for s in self.holdout_squares]).to(device)
        T = self.objective_module.noise_scheduler.config.num_train_timesteps
        timesteps = np.linspace(0, T - 1, 10).round().astype(int).tolist()
        with self.accelerator.autocast():
            return self.objective_module.fixed_loss(pixel_values, vae_pixels, timesteps, seed=self.config.seed)

    def write_preview(self) -> Path | None:
        """RUN_DIR/previews/step-XXXXXXXX.png: rows are held-out images; columns the input, then
        reconstructions from 1, 16 and N tokens (through ViLexPipeline.__call__)."""
        if not self.holdout_squares:
            return None
        cfg, path = self.config, None
        if self.is_main:
            pipeline = self.pipeline
            N = pipeline.num_queries
            counts = sorted({min(k, N) for k in PREVIEW_TOKEN_COUNTS} | {N})
            backend = pipeline.backend
            pipeline.set_backend(DeviceSafeUNet(backend))
            was_training = self.objective_module.training
            self.objective_module.train(False)
            try:
                with self.ema_weights():
                    columns = [pipeline(self.holdout_squares, num_tokens=k, num_inference_steps=cfg.preview_steps,
                                        guidance_scale=cfg.preview_guidance, seed=cfg.seed, progress=False).images
                               for k in counts]
                    loss = self.holdout_loss()
            finally:
                pipeline.set_backend(backend)
                self.objective_module.train(was_training)
            size = columns[0][0].size
            rows = [[square.resize(size)] + [column[i] for column in columns]
                    for i, square in enumerate(self.holdout_squares)]
            grid = make_grid(rows)
            folder = self.run_dir / PREVIEWS_DIR
            folder.mkdir(exist_ok=True)
            path = folder / f"{ckpt.checkpoint_name(self.step)}.png"
            staging = folder / f".{path.name}.partial"
            grid.save(staging, format="PNG")
            os.replace(staging, path)
            self.metrics.write({"step": self.step, "holdout_loss": loss, "preview": str(path.relative_to(self.run_dir)),
                                "preview_columns": ["input"] + [f"{k} tokens" for k in counts]})
            self.metrics.add_image("preview", grid, self.step)
        self.accelerator.wait_for_everyone()
        return path

    def export_pipeline(self) -> Path:
        """RUN_DIR/pipeline: CKPT's frozen components unchanged, with the trained (or EMA) ViLex weights."""
        out = self.run_dir / PIPELINE_DIR
        if self.is_main:
            from ..pipeline import ViLexPipeline

            with self.ema_weights():
                vilex_state = {k: v.detach().float().cpu().clone() for k, v in self.pipeline.vilex.state_dict().items()}
            # reload CKPT rather than save the in-memory modules: those may have been cast to bf16/fp16
            pipeline = ViLexPipeline.from_pretrained(self.config.checkpoint)
            pipeline.vilex.load_state_dict(vilex_state)
            if self.config.taildrop_prob is not None:
                pipeline.vilex.register_to_config(taildrop_prob=self.config.taildrop_prob)
            if out.exists():  # left by a run that stopped between writing it and its report
                shutil.rmtree(out)
            with atomic_folder(out, must_be_new=True) as staging:
                pipeline.save_pretrained(staging, safe_serialization=True)
        self.accelerator.wait_for_everyone()
        return out

    # ---- the whole run -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.config
        if self.step >= cfg.max_steps and (self.run_dir / REPORT_FILE).is_file():
            raise ViLexUsageError(f"--resume '{self.run_dir}': the run already finished at step {self.step}; its "
                                  f"pipeline is {self.run_dir / PIPELINE_DIR}")
        if self.metrics is not None and self.metrics.tensorboard_note and cfg.progress:
            print(self.metrics.tensorboard_note)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.is_main and cfg.progress), dynamic_ncols=True)
        interval = {"loss": 0.0, "images": 0, "seconds": 0.0, "steps": 0}
        started, images_at_start, final_loss = time.perf_counter(), self.images_trained, self.last_loss
        while self.step < cfg.max_steps:
            figures = self.train_step()
            for key in ("loss", "images", "seconds"):
                interval[key] += figures[key]
            interval["steps"] += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                loss = self.accelerator.reduce(torch.tensor(interval["loss"] / interval["steps"],
                                                            device=self.accelerator.device), "mean")
                figures.update(loss=float(loss), images_per_s=interval["images"] / interval["seconds"])
                final_loss = figures["loss"]  # averaged over processes (last_loss is this process's)
                figures.pop("images"), figures.pop("seconds")
                if self.is_main:
                    self.metrics.write(figures)
                bar.set_postfix(loss=f"{figures['loss']:.4f}", img_s=f"{figures['images_per_s']:.1f}")
                interval = {"loss": 0.0, "images": 0, "seconds": 0.0, "steps": 0}
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.max_steps:
                self.save_checkpoint()
            if (cfg.preview_every and self.step % cfg.preview_every == 0) or self.step == cfg.max_steps:
                self.write_preview()
        bar.close()
        seconds = time.perf_counter() - started
        del self._batches  # stops the loader's worker processes
        pipeline_dir = self.export_pipeline()

        # gather what every process skipped, for one report
        unreadable: dict[str, str] = {}
        for part in gather_object([self.unreadable]) if self.world_size > 1 else [self.unreadable]:
            unreadable.update(part)
        too_long = sum(gather_object([self.objective_module.captions_too_long])) if self.world_size > 1 \
            else self.objective_module.captions_too_long
        result = TrainResult(run_dir=self.run_dir, pipeline=pipeline_dir, steps=self.step, final_loss=final_loss,
                             images_per_s=(self.images_trained - images_at_start) * self.world_size / max(seconds, 1e-9),
                             unreadable=dict(sorted(unreadable.items())), captions_too_long=too_long)
        if self.is_main:
            report = {"steps": result.steps, "final_loss": result.final_loss, "images_per_s": result.images_per_s,
                      "pipeline": str(pipeline_dir), "unreadable_files": len(unreadable), "unreadable": result.unreadable,
                      "captions_too_long": too_long, "training_images": len(self.dataset),
                      "holdout_images": [str(r.path) for r in self.holdout_records]}
            (self.run_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
            self.metrics.close()
        return result


def data_fingerprint(root: str, records) -> str:
    """SHA-256 of the training images' paths relative to --data: the sample order depends on them."""
    import hashlib

    names = "\n".join(str(r.path.relative_to(root)) for r in records)
    return hashlib.sha256(names.encode()).hexdigest()


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def train(config: TrainConfig, pipeline=None) -> TrainResult:
    """Train a new run (config.out must be new or empty)."""
    return Trainer(config, pipeline=pipeline).train()


def resume(run_dir: str | os.PathLike, **overrides) -> TrainResult:
    """Continue a run from its latest checkpoint with the options it was started with.

    overrides may change only options that do not affect the optimisation (RESUME_OVERRIDABLE).
    """
    config = load_run_config(run_dir)
    for name, value in overrides.items():
        if name not in RESUME_OVERRIDABLE:
            raise ViLexUsageError(f"--{name.replace('_', '-')} cannot change when resuming (a resumed run keeps its "
                                  f"options); these can: {', '.join(RESUME_OVERRIDABLE)}")
        setattr(config, name, value)
    config.out = str(run_dir)
    return Trainer(config, resume=True).train()
