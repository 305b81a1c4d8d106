"""Training: learn the ViLex vision encoder and pooler through the frozen diffusion model.

    from vilex.training import TrainConfig, train, resume
    result = train(TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=20_000))
    result = resume("runs/a")          # after a crash: continues exactly from the latest checkpoint
"""

_HOME = {"ImageFolderDataset": "data", "TrainingStream": "data", "find_images": "data",
         "ReconstructionObjective": "objective", "TrainConfig": "trainer", "Trainer": "trainer",
         "TrainResult": "trainer", "resume": "trainer", "train": "trainer"}


def __getattr__(name: str):
    # Lazy, so that registering `vilex train` in the CLI does not import torch and diffusers.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageFolderDataset", "ReconstructionObjective", "TrainConfig", "TrainResult", "Trainer",
           "TrainingStream", "find_images", "resume", "train"]
