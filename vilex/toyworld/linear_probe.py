"""What the tokens hold, read linearly: ridge regression from a checkpoint's ViLex tokens to the main object's
centre, radius and shade, and to its shape as one-hot classes (the highest output is the shape read), fitted on
2,000 `test` scenes and measured on 1,000 more.

    python -m vilex.toyworld.linear_probe CKPT

Prints the mean absolute error per target at 1, 4 and 32 tokens beside the error of predicting the mean, and the
shape accuracy beside that of always reading the most common shape. The model card's tables of why the vision
model is pretrained come from it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..pipeline import ViLexPipeline
from .scenes import SHAPES, SPLITS, make_scenes

FIT, CHECK = 2000, 1000
RIDGE = 1e-2


def token_features(pipeline: ViLexPipeline, scenes, batch_size: int = 100) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([pipeline.tokenize([s.render() for s in scenes[i:i + batch_size]]).float().numpy()
                               for i in range(0, len(scenes), batch_size)])


def _ridge_fit(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ridge regression fitted on the FIT scenes -> its predictions for the CHECK scenes."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    fit, check = slice(0, FIT), slice(FIT, FIT + CHECK)
    weights = np.linalg.solve(x[fit].T @ x[fit] + RIDGE * np.eye(x.shape[1]), x[fit].T @ targets[fit])
    return x[check] @ weights


def ridge_accuracy(features: np.ndarray, classes: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Accuracy on the CHECK scenes of ridge regression to one-hot classes, and that of always answering the FIT
    scenes' most common class."""
    predicted = _ridge_fit(features, np.eye(num_classes)[classes]).argmax(axis=1)
    check = classes[FIT:FIT + CHECK]
    return float((predicted == check).mean()), float((check == np.bincount(classes[:FIT]).argmax()).mean())


def ridge_errors(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean absolute error per target column on the CHECK scenes, and that of predicting the FIT mean."""
    fit, check = slice(0, FIT), slice(FIT, FIT + CHECK)
    error = np.abs(_ridge_fit(features, targets) - targets[check]).mean(axis=0)
    baseline = np.abs(targets[check] - targets[fit].mean(axis=0)).mean(axis=0)
    return error, baseline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="CKPT")
    args = parser.parse_args(argv)
    pipeline = ViLexPipeline.from_pretrained(args.checkpoint)
    scenes = make_scenes(FIT + CHECK, SPLITS["test"])
    tokens = token_features(pipeline, scenes)
    targets = {"centre x, y; radius (px)": np.array([[s.main.x, s.main.y, s.main.radius] for s in scenes]),
               "shade r, g, b (0..255)": np.array([s.main.rgb for s in scenes], dtype=float)}
    for k in (1, 4, pipeline.num_queries):
        for name, values in targets.items():
            error, baseline = ridge_errors(tokens[:, :k].reshape(len(tokens), -1), values)
            print(f"{k:2d} tokens  {name:26s} error {np.round(error, 1)}  (predicting the mean: {np.round(baseline, 1)})")
        accuracy, baseline = ridge_accuracy(tokens[:, :k].reshape(len(tokens), -1),
                                            np.array([SHAPES.index(s.main.shape) for s in scenes]), len(SHAPES))
        print(f"{k:2d} tokens  {'shape (5 classes)':26s} accuracy {accuracy:.3f}  (the most common shape: {baseline:.3f})")


if __name__ == "__main__":
    main()
