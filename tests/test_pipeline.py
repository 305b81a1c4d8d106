"""ViLexPipeline: determinism, save/load, guidance, schedulers, checkpoint checks."""

import hashlib

import numpy as np
import pytest
import torch

from vilex import ViLexPipeline
from vilex.errors import CheckpointError, ViLexUsageError

STEPS = 2


def pixels_of(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_reconstruct_shapes_and_default_size(tiny_pipeline, sample_images):
    out = tiny_pipeline(sample_images, num_tokens=16, num_inference_steps=STEPS, seed=0)
    assert len(out.images) == 2 and out.images[0].size == (64, 64) and out.images[0].mode == "RGB"
    assert out.vilex_tokens.shape == (2, 16, 32)


def test_requested_size(tiny_pipeline, sample_images):
    tokens = tiny_pipeline.tokenize(sample_images[:1], num_tokens=4)
    image = tiny_pipeline.generate(tokens, num_inference_steps=STEPS, height=32, width=48, seed=0).images[0]
    assert image.size == (48, 32)
    with pytest.raises(ViLexUsageError, match="height must be a positive multiple of 4"):
        tiny_pipeline.generate(tokens, num_inference_steps=STEPS, height=30, seed=0)


def test_same_seed_same_images_other_seed_different(tiny_pipeline, sample_images):
    tokens = tiny_pipeline.tokenize(sample_images, num_tokens=8)
    a = pixels_of(tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=1).images)
    b = pixels_of(tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=1).images)
    c = pixels_of(tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=2).images)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0


def test_save_load_round_trip(tiny_pipeline, sample_images, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "again", safe_serialization=True)
    reloaded = ViLexPipeline.from_pretrained(tmp_path / "again")
    reloaded.set_progress_bar_config(disable=True)
    before = tiny_pipeline(sample_images, num_tokens=10, num_inference_steps=STEPS, seed=3, output_type="np")
    after = reloaded(sample_images, num_tokens=10, num_inference_steps=STEPS, seed=3, output_type="np")
    assert torch.equal(before.vilex_tokens, after.vilex_tokens)
    assert np.array_equal(before.images, after.images)
    # Loading a folder and saving it again gives the same weight files.
    reloaded.save_pretrained(tmp_path / "third", safe_serialization=True)
    for name in ("vilex/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("again", "third")]
        assert digest[0] == digest[1], name


def test_text_free_guidance_formula(tiny_pipeline, sample_images):
    # eps = eps_v + w (eps_vc - eps_v) with CFG off: w = 1 is the ViLex+text prediction, w = 0 ViLex only.
    tokens = tiny_pipeline.tokenize(sample_images[:1], num_tokens=4)
    run = lambda **kw: tiny_pipeline.generate(tokens, num_inference_steps=STEPS, guidance_scale=1.0, seed=0,
                                              output_type="np", **kw).images
    prompt = "a watercolor painting"
    np.testing.assert_allclose(run(prompt=prompt, text_guidance_scale=1.0), run(prompt=prompt), atol=1e-5)
    np.testing.assert_allclose(run(prompt=prompt, text_guidance_scale=0.0), run(), atol=1e-5)
    assert np.abs(run(prompt=prompt, text_guidance_scale=3.0) - run(prompt=prompt)).max() > 1e-3


def test_prompt_order_changes_the_image(tiny_pipeline, sample_images):
    tokens = tiny_pipeline.tokenize(sample_images[:1], num_tokens=4)
    run = lambda order: tiny_pipeline.generate(tokens, prompt="a red house", order=order, num_inference_steps=STEPS,
                                               seed=0, output_type="np").images
    assert np.abs(run("vilex_first") - run("text_first")).max() > 1e-4


@pytest.mark.parametrize("scheduler, overrides", [
    ("EulerDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),  # as in Stable Diffusion 1.5's scheduler_config.json
])
def test_schedulers_from_the_checkpoint_config(tiny_ckpt, sample_images, scheduler, overrides, tmp_path):
    import shutil

    import diffusers

    # A checkpoint whose scheduler_config.json names another scheduler class loads and runs with it.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = diffusers.DDIMScheduler.load_config(ckpt / "scheduler")
    getattr(diffusers, scheduler).from_config(config, **overrides).save_pretrained(ckpt / "scheduler")
    pipeline = ViLexPipeline.from_pretrained(ckpt)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == scheduler
    tokens = pipeline.tokenize(sample_images[:1], num_tokens=4)
    a = pipeline.generate(tokens, num_inference_steps=3, seed=0, output_type="np").images
    b = pipeline.generate(tokens, num_inference_steps=3, seed=0, output_type="np").images
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)


def test_num_images_per_prompt(tiny_pipeline, sample_images):
    tokens = tiny_pipeline.tokenize(sample_images[:1], num_tokens=4)
    images = tiny_pipeline.generate(tokens, num_images_per_prompt=2, num_inference_steps=STEPS, seed=0,
                                    output_type="np").images
    assert images.shape[0] == 2 and np.abs(images[0] - images[1]).max() > 1e-3


def test_bad_generation_inputs(tiny_pipeline):
    tokens = torch.randn(1, 4, 32) * 0.02
    with pytest.raises(ViLexUsageError, match=r"num_inference_steps must be in 1\.\.1000, got 0"):
        tiny_pipeline.generate(tokens, num_inference_steps=0)
    with pytest.raises(ViLexUsageError, match=r"vilex_tokens must have shape \(B, k, 32\)"):
        tiny_pipeline.generate(torch.randn(1, 4, 16))
    with pytest.raises(ViLexUsageError, match=r"number of ViLex tokens must be in 1\.\.75, got 76"):
        tiny_pipeline.generate(torch.randn(1, 76, 32))
    with pytest.raises(ViLexUsageError, match="at most 0 text tokens fit"):
        tiny_pipeline.generate(torch.randn(1, 75, 32), prompt="a cat")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a ViLex checkpoint"):
        ViLexPipeline.from_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused(tiny_ckpt, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, copy)
    torch.save({"x": torch.zeros(1)}, copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle weights \['unet/diffusion_pytorch_model.bin'\]; only safetensors"):
        ViLexPipeline.from_pretrained(copy)
