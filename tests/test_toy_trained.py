"""The shipped, trained toy checkpoint: what it is, that it keeps an image's meaning, and that `vilex train`
on its frozen base learns (fidelity measured, not loss).

Reconstructions here use few denoising steps and few scenes, so the margins asserted are well inside what
the full evaluation (200 scenes, 25 steps; the model card) shows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vilex import ViLexPipeline
from vilex.cli import main
from vilex.evaluation.metrics import psnr
from vilex.pipeline import PICKLE_SUFFIXES
from vilex.toyworld.scenes import SPLITS, make_scenes
from vilex.toyworld.shipped import WEIGHTS, checkpoint_path, probe_path

STEPS = 10


def held_out(n: int):
    scenes = make_scenes(n, SPLITS["heldout"])
    images = [s.render() for s in scenes]
    return scenes, images, np.stack([np.asarray(i) for i in images]).astype(np.float32) / 255.0


def reconstruct(pipeline, images, num_tokens=None) -> np.ndarray:
    generators = [torch.Generator().manual_seed(0) for _ in images]
    return pipeline(images, num_tokens=num_tokens, num_inference_steps=STEPS, generator=generators,
                    output_type="np", progress=False).images


@pytest.fixture(scope="module")
def toy_pipeline():
    pipeline = ViLexPipeline.from_pretrained(checkpoint_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_shipped_weights_are_safetensors_under_30_mb():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert any(p.suffix == ".safetensors" for p in (probe_path()).iterdir())
    total = sum(p.stat().st_size for p in files)
    assert total <= 30 * 1000 * 1000, f"shipped weights are {total / 1e6:.1f} MB"


def test_init_preset_toy_copies_the_shipped_checkpoint(tmp_path):
    assert main(["init", str(tmp_path / "toy"), "--preset", "toy"]) == 0
    copy = ViLexPipeline.from_pretrained(tmp_path / "toy")
    shipped = ViLexPipeline.from_pretrained(checkpoint_path())
    for name in ("vilex", "text_encoder", "unet", "vae"):
        a, b = getattr(copy, name).state_dict(), getattr(shipped, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vilex_reconstructs_better_than_the_caption_and_noise(toy_pipeline):
    scenes, images, reference = held_out(8)
    vilex = psnr(reconstruct(toy_pipeline, images), reference).mean()
    generators = [torch.Generator().manual_seed(0) for _ in images]
    caption = toy_pipeline.generate(None, prompt=[s.caption for s in scenes], num_inference_steps=STEPS,
                                    generator=generators, output_type="np", progress=False).images
    tokens = toy_pipeline.tokenize(images)
    random_tokens = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1)) * tokens.std()
    generators = [torch.Generator().manual_seed(0) for _ in images]
    noise = toy_pipeline.generate(random_tokens, num_inference_steps=STEPS, generator=generators,
                                  output_type="np", progress=False).images
    assert vilex > psnr(caption, reference).mean() + 2.0
    assert vilex > psnr(noise, reference).mean() + 4.0


def test_short_vilex_training_on_the_shipped_base_improves_reconstructions(tmp_path):
    """`vilex train` (the CLI, CI-sized) on a new, untrained ViLex encoder over the shipped frozen base:
    held-out reconstructions get measurably closer to their inputs."""
    assert main(["toyworld", "new-vilex", str(checkpoint_path()), str(tmp_path / "untrained"), "--seed", "1"]) == 0
    assert main(["toyworld", "make-data", str(tmp_path / "data"), "--n", "256"]) == 0
    assert main(["train", str(tmp_path / "untrained"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--train-vision", "--vision-lr", "1e-3", "--pooler-lr", "1e-3", "--max-steps", "60",
                 "--warmup-steps", "5", "--batch-size", "16", "--caption-prob", "0", "--num-workers", "0",
                 "--holdout", "0", "--no-progress"]) == 0
    _, images, reference = held_out(8)
    before = ViLexPipeline.from_pretrained(tmp_path / "untrained")
    after = ViLexPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    gain = psnr(reconstruct(after, images), reference).mean() - psnr(reconstruct(before, images), reference).mean()
    assert gain > 1.0, f"PSNR gain after 60 steps: {gain:.2f} dB"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 60
