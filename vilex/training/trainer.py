"""The training loop: AdamW on the trainable ViLex weights, through the frozen diffusion model.

    train(TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=20_000))
    resume("runs/a")

1. set up (`setup.py`): accelerate (devices, mixed precision, data parallel), the pipeline from CKPT with
   the UNet, text encoder and VAE frozen, the data stream, AdamW with one learning rate for the pooler
   and one for the vision encoder, linear warmup then cosine decay (`optim.py`), optional EMA (`ema.py`)
2. each optimizer step: `gradient_accumulation_steps` micro-batches through `ReconstructionObjective`,
   gradient clipping, AdamW, schedule, EMA
3. every `log_every` steps a line in metrics.jsonl; every `checkpoint_every` a checkpoint (`state.py`);
   every `preview_every` a PNG grid of held-out reconstructions with a deterministic held-out loss
   (`previews.py`)
4. at the end: RUN_DIR/pipeline, a ViLex pipeline folder (the frozen components exactly as in CKPT, the
   trained ViLex weights, the EMA ones with --ema), and report.json (`results.py`)

Everything random in a step is drawn from one CPU generator per process, saved in each checkpoint, and
the data stream restarts at the batch it stopped at, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from ..errors import ViLexUsageError
from . import checkpoint as ckpt
from .config import TrainConfig, config_for_resume, write_run_config
from .data import (ImageFolderDataset, SampleLog, ShardStream, crop_square, find_images, pick_holdout,
                   pick_shard_holdout)
from .ema import ema_weights, make_ema
from .metrics import MetricsLog
from .objective import ReconstructionObjective
from .optim import adamw, warmup_cosine
from .previews import holdout_loss, preview_grid, preview_token_counts, reconstructions, save_preview
from .results import PIPELINE_DIR, REPORT_FILE, TrainResult, save_pipeline_folder, write_report
from .setup import (WEIGHT_DTYPES, check_new_run_dir, data_fingerprint, make_accelerator, make_batches,
                    prepare_pipeline, training_resolution)
from .shards import ShardSource, is_shard_pattern
from .state import restore_run_checkpoint, save_run_checkpoint


class Trainer:
    """Trains a ViLex checkpoint on a folder of images or on shards (WebDataset tar, parquet). `train()` runs
    the whole loop; `setup()` and `train_step()` are there for benchmarks and tests that drive it step by step.

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
        self.stream_positions: dict[int, tuple[int, int]] = {}  # shards: reader -> (epoch, samples yielded)
        self.samples_seen = 0  # readable samples of this process
        self.images_trained = 0  # readable samples of this process since setup (for images/s)
        self.unreadable: dict[str, str] = {}
        self.logged_loss = float("nan")  # the last logged loss, averaged over processes; kept in checkpoints

    # ---- 1. set up ---------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        if self.is_set_up:
            return self
        cfg = self.config
        if not self.resuming:
            check_new_run_dir(self.run_dir)

        # 1a. The data first: its errors are the cheapest to find
        self.shards = ShardSource(cfg.data, cfg.image_column, cfg.caption_column) if is_shard_pattern(cfg.data) \
            else None
        if self.shards is not None:
            if cfg.edit_prob > 0:
                raise ViLexUsageError(f"--edit-prob {cfg.edit_prob:g} needs a folder of images with edits beside them; "
                                      f"shards ({cfg.data}) carry no edits")
            self.holdout_names, holdout_images, unreadable = pick_shard_holdout(self.shards, cfg.holdout)
        else:
            records = find_images(cfg.data)
            if cfg.edit_prob > 0 and not any(r.edit_path for r in records):
                raise ViLexUsageError(f"--edit-prob {cfg.edit_prob:g}: --data '{cfg.data}' has no edits (name.edit.png "
                                      f"+ name.edit.txt beside name.png); use --edit-prob 0 or data made with them, "
                                      f"e.g. vilex toyworld make-data DIR --edits")
            training, holdout_records, holdout_images, unreadable = pick_holdout(records, cfg.holdout, cfg.seed)
            self.holdout_names = [str(r.path) for r in holdout_records]
        self.unreadable.update(unreadable)

        # 1b. Devices, mixed precision, data parallel
        self.accelerator = accelerator = make_accelerator(cfg)
        self.is_main = accelerator.is_main_process
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]

        # 1c. The pipeline; only the ViLex pooler (and the vision encoder with --train-vision) trains
        self.pipeline = pipeline = prepare_pipeline(cfg, self._given_pipeline, self.weight_dtype)
        self.trainable_names = [n for n, p in pipeline.vilex.named_parameters() if p.requires_grad]

        # 1d. Preprocessing at the VAE resolution
        self.resolution = resolution = training_resolution(cfg, pipeline)
        self.holdout_squares = [crop_square(image, resolution) for image in holdout_images]
        if self.shards is not None:
            self.dataset = ShardStream(self.shards, pipeline.image_processor, resolution, seed=cfg.seed,
                                       random_crop=cfg.random_crop, random_flip=cfg.random_flip,
                                       holdout_keys=self.holdout_names, rank=self.rank, world_size=self.world_size,
                                       num_workers=cfg.num_workers, buffer_size=cfg.shuffle_buffer)
            self.data_fingerprint = self.shards.fingerprint()
        else:
            self.dataset = ImageFolderDataset(training, pipeline.image_processor, resolution, seed=cfg.seed,
                                              random_crop=cfg.random_crop, random_flip=cfg.random_flip)
            self.data_fingerprint = data_fingerprint(cfg.data, training)

        # 1e. Objective, optimizer, schedule, EMA
        objective = ReconstructionObjective(pipeline, snr_gamma=cfg.snr_gamma, caption_prob=cfg.caption_prob,
                                            caption_word_drop=cfg.caption_word_drop, edit_prob=cfg.edit_prob,
                                            taildrop=cfg.taildrop, train_vision=cfg.train_vision,
                                            gradient_checkpointing=cfg.gradient_checkpointing)
        self.objective, self.optimizer = accelerator.prepare(objective, adamw(pipeline.vilex, cfg))
        self.lr_scheduler = warmup_cosine(self.optimizer.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.trainable = [p for p in pipeline.vilex.parameters() if p.requires_grad]
        self.ema = make_ema(self.trainable, cfg.ema_decay) if cfg.ema else None
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
            if self.is_main:  # said with or without --no-progress (which turns off the progress bar only)
                print(f"resuming {self.run_dir} from step {self.step}" if latest is not None else
                      f"{self.run_dir} has no checkpoint yet: starting it over from step 0")
            resume_step = self.step
        elif self.is_main:
            write_run_config(self.run_dir, cfg)
        accelerator.wait_for_everyone()
        self.metrics = MetricsLog(self.run_dir, resume_step=resume_step) if self.is_main else None
        self.sample_log = SampleLog(self.run_dir, self.rank, resume_step) if cfg.log_samples else None
        self._batches = make_batches(self.dataset, cfg, self.rank, self.world_size, self.batches_consumed,
                                     pin_memory=accelerator.device.type == "cuda",
                                     stream_positions=self.stream_positions)
        self.objective.train()
        self.is_set_up = True
        return self

    @property
    def objective_module(self) -> ReconstructionObjective:
        return self.accelerator.unwrap_model(self.objective)

    # ---- 2. one optimizer step ----------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next batch with at least one readable image (batches of only unreadable files are skipped)."""
        while True:
            batch = next(self._batches)
            self.batches_consumed += 1
            if batch["position"] is not None:  # shards: where this batch's reader is now
                reader, epoch, count = batch["position"]
                self.stream_positions[reader] = (epoch, count)
            if self.sample_log is not None:
                self.sample_log.write(self.step + 1, batch)
            for path, reason in batch["skipped"]:
                self.unreadable.setdefault(path, reason)
            if batch["pixel_values"] is not None:
                self.samples_seen += len(batch["paths"])
                return batch
            if self.samples_seen == 0 and self.shards is None and \
                    self.batches_consumed * self.config.batch_size >= len(self.dataset):
                raise ViLexUsageError(f"--data '{self.config.data}': none of the {len(self.dataset)} training "
                                      f"images could be read")
            if self.samples_seen == 0 and self.shards is not None and self.epoch >= 1:
                raise ViLexUsageError(f"--data '{self.config.data}': none of the samples process {self.rank} was "
                                      f"dealt in a whole epoch (its share of {self.shards.describe()}) could be read")

    @property
    def epoch(self) -> float:
        """Epochs this process has consumed: a fraction for a folder; for shards, the epoch its furthest-behind
        reader is in (readers' epochs need not end together)."""
        if self.shards is None:
            return self.batches_consumed * self.config.batch_size * self.world_size / len(self.dataset)
        readers = self.dataset.readers_per_rank
        if len(self.stream_positions) < readers:
            return 0
        return min(epoch for epoch, _ in self.stream_positions.values())

    def compute_loss(self, batch: dict) -> dict:
        device = self.accelerator.device
        return self.objective(pixel_values=batch["pixel_values"].to(device, non_blocking=True),
                              vae_pixels=batch["vae_pixels"].to(device, non_blocking=True),
                              captions=batch["captions"], generator=self.generator,
                              edit_pixel_values=batch["edit_pixel_values"], edit_texts=batch["edit_texts"])

    def train_step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its figures."""
        self.setup()
        cfg, accelerator = self.config, self.accelerator
        start = time.perf_counter()
        self.objective.train()
        loss_sum, images, tokens, with_text, edits = torch.zeros((), device=accelerator.device), 0, 0.0, 0, 0
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
            edits += out["num_edits"]
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
        figures = {"step": self.step, "loss": float(loss_sum) / cfg.gradient_accumulation_steps,  # this process's
                   "grad_norm": grad_norm, "images": images * self.world_size,
                   "seconds": seconds, "images_per_s": images * self.world_size / seconds,
                   "mean_vilex_tokens": tokens / max(images, 1), "text_fraction": with_text / max(images, 1),
                   "edit_fraction": edits / max(images, 1),
                   "epoch": self.epoch}
        figures.update(learning_rates)
        return figures

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- 3. checkpoints and previews --------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write RUN_DIR/checkpoints/step-XXXXXXXX atomically; returns its path."""
        return save_run_checkpoint(self)

    def load_checkpoint(self, folder: Path) -> None:
        restore_run_checkpoint(self, folder)

    def write_preview(self) -> Path | None:
        """RUN_DIR/previews/step-XXXXXXXX.png (with --ema from the EMA weights) and the held-out loss in
        metrics.jsonl; see previews.py."""
        if not self.holdout_squares:
            return None
        cfg, path = self.config, None
        if self.is_main:
            counts = preview_token_counts(self.pipeline.num_queries)
            was_training = self.objective_module.training
            self.objective_module.train(False)
            try:
                with ema_weights(self.ema, self.trainable):
                    columns = reconstructions(self.pipeline, self.holdout_squares, counts, cfg.preview_steps,
                                              cfg.preview_guidance, cfg.seed)
                    loss = holdout_loss(self.objective_module, self.pipeline.image_processor, self.holdout_squares,
                                        self.accelerator, cfg.seed)
            finally:
                self.objective_module.train(was_training)
            grid = preview_grid(self.holdout_squares, columns)
            path = save_preview(self.run_dir, self.step, grid)
            self.metrics.write({"step": self.step, "holdout_loss": loss, "preview": str(path.relative_to(self.run_dir)),
                                "preview_columns": ["input"] + [f"{k} tokens" for k in counts]})
            self.metrics.add_image("preview", grid, self.step)
        self.accelerator.wait_for_everyone()
        return path

    # ---- 4. the final pipeline ---------------------------------------------------------------------------
    def export_pipeline(self) -> Path:
        """RUN_DIR/pipeline: CKPT's frozen components unchanged, with the trained (or EMA) ViLex weights."""
        out = self.run_dir / PIPELINE_DIR
        if self.is_main:
            with ema_weights(self.ema, self.trainable):
                vilex_state = {k: v.detach().float().cpu().clone() for k, v in self.pipeline.vilex.state_dict().items()}
            save_pipeline_folder(self.config.checkpoint, vilex_state, self.config.taildrop_prob, out,
                                 mix_adapter=self.config.mix_adapter,
                                 mix_adapter_words=self.config.mix_adapter_words)
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
        started, images_at_start = time.perf_counter(), self.images_trained
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
                self.logged_loss = figures["loss"]  # the interval's mean, averaged over processes
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
        if self.sample_log is not None:
            self.sample_log.close()
        pipeline_dir = self.export_pipeline()

        # gather what every process skipped, for one report
        unreadable: dict[str, str] = {}
        for part in gather_object([self.unreadable]) if self.world_size > 1 else [self.unreadable]:
            unreadable.update(part)
        too_long = sum(gather_object([self.objective_module.captions_too_long])) if self.world_size > 1 \
            else self.objective_module.captions_too_long
        result = TrainResult(run_dir=self.run_dir, pipeline=pipeline_dir, steps=self.step, final_loss=self.logged_loss,
                             images_per_s=(self.images_trained - images_at_start) * self.world_size / max(seconds, 1e-9),
                             unreadable=dict(sorted(unreadable.items())), captions_too_long=too_long)
        if self.is_main:
            # Trained on: the training files less those found unreadable (by any process), which were skipped.
            # Shards: not known without reading every shard (null in report.json).
            trained = None if self.shards is not None else \
                sum(str(record.path) not in unreadable for record in self.dataset.records)
            write_report(self.run_dir, result, trained, self.holdout_names)
            self.metrics.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process past the report, then the process group destroyed before the interpreter exits: left to
            # exit, gloo's threads were destroyed still joinable now and then ("terminate called without an active
            # exception", exit -6 after a finished run: seen once in the 2-process torchrun test).
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()
        return result


def train(config: TrainConfig, pipeline=None) -> TrainResult:
    """Train a new run (config.out must be new or empty)."""
    return Trainer(config, pipeline=pipeline).train()


def resume(run_dir: str | os.PathLike, **overrides) -> TrainResult:
    """Continue a run from its latest checkpoint with the options it was started with (its recorded
    warmup too). overrides may change only options that do not affect the optimisation (RESUME_OVERRIDABLE).
    """
    return Trainer(config_for_resume(run_dir, **overrides), resume=True).train()
