"""What a run's checkpoint holds: the Trainer saves one every --checkpoint-every steps and restores the
latest with --resume. `checkpoint.py` owns the file format (the folder layout, safetensors and JSON,
the atomic rename); this module decides what goes in and checks that a resume can be exact.

Saved: the trainable weights, AdamW state, LR schedule, grad scaler, EMA, and per process the training
generator, the global RNGs and the data position (batches consumed, samples seen, files skipped; with
shards also each reader's (epoch, samples yielded in it) as of the last batch the process consumed).

Both functions take a set-up Trainer (trainer.py) and read or write its parts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import ViLexUsageError
from . import checkpoint as ckpt
from .ema import ema_from_files, ema_to_files


def save_run_checkpoint(trainer) -> Path:
    """Write RUN_DIR/checkpoints/step-XXXXXXXX atomically; returns its path."""
    accelerator = trainer.accelerator
    staging = ckpt.staging_folder(trainer.run_dir, trainer.step)
    final = staging.parent / ckpt.checkpoint_name(trainer.step)
    if trainer.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    # 1. Every process: its RNG and data position
    ckpt.save_tensors(staging / f"rng-{trainer.rank}.safetensors", ckpt.rng_tensors(trainer.generator))
    ckpt.save_json(staging / f"rank-{trainer.rank}.json", {
        "batches_consumed": trainer.batches_consumed, "samples_seen": trainer.samples_seen,
        "stream_positions": {str(reader): list(position)
                             for reader, position in sorted(trainer.stream_positions.items())},
        "unreadable": trainer.unreadable, "captions_too_long": trainer.objective_module.captions_too_long})
    accelerator.wait_for_everyone()

    # 2. The main process: weights, optimizer, EMA, then state.json, then the rename
    if trainer.is_main:
        named = dict(trainer.pipeline.vilex.named_parameters())
        ckpt.save_tensors(staging / "trainable.safetensors", {name: named[name].float() for name in trainer.trainable_names})
        optimizer_tensors, optimizer_meta = ckpt.optimizer_to_files(trainer.optimizer.state_dict())
        ckpt.save_tensors(staging / "optimizer.safetensors", optimizer_tensors)
        ema_meta = None
        if trainer.ema is not None:
            ema_tensors, ema_meta = ema_to_files(trainer.ema, trainer.trainable_names)
            ckpt.save_tensors(staging / "ema.safetensors", ema_tensors)
        scaler = accelerator.scaler
        ckpt.save_json(staging / ckpt.STATE_FILE, {  # last: a folder with state.json is complete
            "step": trainer.step, "logged_loss": trainer.logged_loss, "num_processes": trainer.world_size,
            "optimizer": optimizer_meta,
            "lr_scheduler": trainer.lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "ema": ema_meta, "trainable_names": trainer.trainable_names, "config": trainer.config.to_json(),
            "training_images": None if trainer.shards is not None else len(trainer.dataset),
            "readers_per_process": trainer.dataset.readers_per_rank if trainer.shards is not None else None,
            "data_fingerprint": trainer.data_fingerprint,
            "versions": _versions()})
        ckpt.commit(staging, final)
        ckpt.prune(trainer.run_dir, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def restore_run_checkpoint(trainer, folder: Path) -> None:
    """Load checkpoint `folder` into a set-up Trainer, after checking it can continue exactly here."""
    files = ckpt.load_checkpoint_files(folder, trainer.rank)
    state = files["state"]

    # 1. An exact resume needs the same processes, the same images and the same trainable parameters
    if state["num_processes"] != trainer.world_size:
        raise ViLexUsageError(f"--resume: the run was saved with {state['num_processes']} processes, this launch "
                              f"has {trainer.world_size}; resume with the same number")
    if state["data_fingerprint"] != trainer.data_fingerprint and trainer.shards is not None:
        raise ViLexUsageError(
            f"--resume: the shards of --data '{trainer.config.data}' changed since the checkpoint (now "
            f"{trainer.shards.describe()}, or other names, sizes or columns); an exact resume needs the same "
            f"shards, so restore them or start a new run")
    if state["data_fingerprint"] != trainer.data_fingerprint:
        raise ViLexUsageError(
            f"--resume: the images under --data '{trainer.config.data}' changed since the checkpoint (it trained on "
            f"{state['training_images']} files, now there are {len(trainer.dataset)} or other names); an exact "
            f"resume needs the same files, so restore them or start a new run")
    readers = state.get("readers_per_process")
    if readers is not None and readers != trainer.dataset.readers_per_rank:
        raise ViLexUsageError(
            f"--resume: with shards each data loader worker reads shards of its own, and the run was saved with "
            f"{readers} per process (--num-workers {readers if readers > 1 else '0 or 1'}); resume with that "
            f"--num-workers, not {trainer.config.num_workers}")
    if state["trainable_names"] != trainer.trainable_names:
        raise ViLexUsageError(f"--resume: checkpoint '{folder}' trains other parameters than this set-up")

    # 2. Weights, optimizer, schedule, grad scaler, EMA
    named = dict(trainer.pipeline.vilex.named_parameters())
    with torch.no_grad():
        for name, value in files["trainable"].items():
            named[name].copy_(value)
    trainer.optimizer.load_state_dict(ckpt.optimizer_from_files(files["optimizer"], state["optimizer"]))
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["scaler"] and trainer.accelerator.scaler is not None:
        trainer.accelerator.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None:
        if "ema" not in files:
            raise ViLexUsageError(f"--resume: checkpoint '{folder}' has no EMA weights")
        ema_from_files(trainer.ema, files["ema"], state["ema"], trainer.trainable_names, trainer.accelerator.device)

    # 3. This process's RNGs and data position
    ckpt.restore_rng(files["rng"], trainer.generator)
    rank_state = files["rank"]
    trainer.step = state["step"]
    trainer.logged_loss = state.get("logged_loss", float("nan"))  # absent from checkpoints before 2026-12-05
    trainer.batches_consumed = rank_state["batches_consumed"]
    trainer.samples_seen = rank_state["samples_seen"]
    trainer.stream_positions = {int(reader): (epoch, count)
                                for reader, (epoch, count) in rank_state.get("stream_positions", {}).items()}
    trainer.unreadable.update(rank_state["unreadable"])
    trainer.objective_module.captions_too_long = rank_state["captions_too_long"]


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}
