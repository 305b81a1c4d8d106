"""Training: learn the ViLex vision encoder and pooler through the frozen diffusion model.

    from vilex.training import TrainConfig, train, resume
    result = train(TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=20_000))
    result = resume("runs/a")          # after a crash: continues exactly from the latest checkpoint

Layout, each module importing only the ones above it in this list:
    config.py      TrainConfig and its checks, the run's train_config.json, what a resume may change
    shards.py      WebDataset tar and parquet shards: patterns, pieces, reading a piece's samples
    data.py        image folder, crops, the resumable sample stream; the shard stream (split, shuffle, position)
    objective.py   the reconstruction loss through the frozen UNet
    optim.py       AdamW parameter groups, the warmup-cosine schedule (lr_factor)
    setup.py       the set-up steps: run folder, accelerate, frozen pipeline, resolution, batches
    ema.py         EMA of the trainable weights
    checkpoint.py  the checkpoint file format (atomic folders of safetensors and JSON)
    metrics.py     metrics.jsonl (and TensorBoard when installed)
    state.py       what a run's checkpoint holds: save and exact restore
    previews.py    preview grids and the held-out loss
    results.py     RUN_DIR/pipeline, report.json, TrainResult
    trainer.py     Trainer (the step loop), train, resume
    cli.py         `vilex train`
"""

_HOME = {"ImageFolderDataset": "data", "TrainingStream": "data", "find_images": "data",
         "ReconstructionObjective": "objective", "RESUME_OVERRIDABLE": "config", "TrainConfig": "config",
         "load_run_config": "config", "lr_factor": "optim", "TrainResult": "results", "Trainer": "trainer",
         "resume": "trainer", "train": "trainer"}


def __getattr__(name: str):
    # Lazy, so that registering `vilex train` in the CLI does not import torch and diffusers.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageFolderDataset", "RESUME_OVERRIDABLE", "ReconstructionObjective", "TrainConfig", "TrainResult",
           "Trainer", "TrainingStream", "find_images", "load_run_config", "lr_factor", "resume", "train"]
