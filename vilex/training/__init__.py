"""Training: learn the ViLex vision encoder and pooler through the frozen diffusion model.

    from vilex.training import TrainConfig, train, resume
    result = train(TrainConfig(checkpoint="ckpt", data="images/", out="runs/a", max_steps=20_000))
    result = resume("runs/a")          # after a crash: continues exactly from the latest checkpoint
"""

from .data import ImageFolderDataset, TrainingStream, find_images
from .objective import ReconstructionObjective
from .trainer import TrainConfig, Trainer, TrainResult, resume, train

__all__ = ["ImageFolderDataset", "ReconstructionObjective", "TrainConfig", "TrainResult", "Trainer",
           "TrainingStream", "find_images", "resume", "train"]
