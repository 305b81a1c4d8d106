"""Evaluation: PSNR, SSIM, confidence intervals and color error against their formulas, and the caption
baseline (text-only generation) against diffusers' own StableDiffusionPipeline."""

import math
import statistics

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from vilex.errors import ViLexUsageError
from vilex.evaluation.metrics import color_error, psnr, ssim, summarize
from vilex.toyworld.scenes import SPLITS, make_scenes, object_mask

C1, C2 = 0.01**2, 0.03**2  # Wang et al. 2004, data range 1


def rng(seed=0):
    return np.random.default_rng(seed)


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (H, W, 3) images in [0, 1] from the paper's definition (11 x 11 Gaussian window, sigma 1.5,
    population (co)variances), averaged over channels and over a window centred on *every* pixel, the image
    extended by reflection: torchmetrics' convention (>= 1.x). Wang et al.'s MATLAB code and skimage average
    only the windows wholly inside the image, which gives about 0.01-0.03 more on the toy world's 64 px scenes."""
    x, y = (np.pad(image, ((5, 5), (5, 5), (0, 0)), mode="reflect") for image in (x, y))  # numpy's = torch's reflect
    offsets = np.arange(11) - 5
    g = np.exp(-offsets**2 / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()  # (11, 11)
    values = []
    for channel in range(3):
        wx = sliding_window_view(x[..., channel].astype(np.float64), (11, 11))  # (H-10, W-10, 11, 11)
        wy = sliding_window_view(y[..., channel].astype(np.float64), (11, 11))
        mean = lambda w: (w * window).sum(axis=(-1, -2))
        mu_x, mu_y = mean(wx), mean(wy)
        var_x, var_y = mean(wx**2) - mu_x**2, mean(wy**2) - mu_y**2
        cov = mean(wx * wy) - mu_x * mu_y
        values.append(((2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))).mean())
    return float(np.mean(values))


# ---- PSNR and SSIM ------------------------------------------------------------------------------------
def test_psnr_is_ten_log10_of_one_over_mse_per_image():
    references = rng(0).random((3, 16, 16, 3)).astype(np.float32)
    noise = rng(1).normal(size=references.shape) * np.array([0.01, 0.05, 0.2])[:, None, None, None]
    reconstructions = np.clip(references + noise, 0, 1).astype(np.float32)
    mse = ((reconstructions.astype(np.float64) - references) ** 2).mean(axis=(1, 2, 3))  # (B,): each image alone
    np.testing.assert_allclose(psnr(reconstructions, references), 10 * np.log10(1 / mse), rtol=1e-4)


def test_identical_images_give_ssim_one_and_infinite_psnr():
    images = rng(0).random((2, 24, 24, 3)).astype(np.float32)
    assert np.isposinf(psnr(images, images)).all()  # mse 0
    np.testing.assert_allclose(ssim(images, images), 1.0, atol=1e-5)


def test_ssim_of_flat_images_is_the_luminance_term_averaged_over_channels():
    # Flat images have zero variance and covariance, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    # in every window, whatever the window.
    x = np.broadcast_to(np.array([0.3, 0.6, 0.9], dtype=np.float32), (1, 32, 32, 3))
    y = np.full((1, 32, 32, 3), 0.5, dtype=np.float32)
    expected = np.mean([(2 * m * 0.5 + C1) / (m**2 + 0.25 + C1) for m in (0.3, 0.6, 0.9)])
    # 1e-4: float32 E[x^2] - mu^2 leaves variances of ~1e-8 against C2 = 9e-4.
    np.testing.assert_allclose(ssim(x, y), [expected], atol=1e-4)


def test_ssim_matches_the_gaussian_window_definition_per_image():
    references = rng(0).random((2, 24, 24, 3)).astype(np.float32)
    noise = rng(1).normal(size=references.shape) * np.array([0.05, 0.3])[:, None, None, None]
    reconstructions = np.clip(references + noise, 0, 1).astype(np.float32)
    expected = [reference_ssim(r, x) for r, x in zip(reconstructions, references)]
    np.testing.assert_allclose(ssim(reconstructions, references), expected, atol=1e-5)


# ---- summaries and the color error --------------------------------------------------------------------
def test_summary_is_the_mean_with_a_normal_95_percent_half_width():
    values = [0.2, 0.5, 0.1, 0.9, 0.4, 0.7]
    summary = summarize(values)
    assert summary["n"] == 6
    assert summary["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["ci95"] == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(6))  # sample std
    one = summarize([0.3])
    assert one["mean"] == 0.3 and one["n"] == 1 and math.isnan(one["ci95"])  # no spread from one value


@pytest.fixture(scope="module")
def rendered_scenes():
    scenes = make_scenes(6, SPLITS["test"])
    images = np.stack([np.asarray(s.render(), dtype=np.float32) / 255 for s in scenes])  # (B, H, W, 3)
    masks = np.stack([object_mask(s.objects[0]) for s in scenes])  # (B, H, W)
    colors = np.array([s.objects[0].rgb for s in scenes], dtype=np.float64)  # (B, 3)
    return images, masks, colors


def test_color_error_of_the_scene_itself_is_under_one_level(rendered_scenes):
    images, masks, colors = rendered_scenes
    # Only rounding to uint8 separates the drawn shade from the pixels: at most 0.5 per channel.
    assert (color_error(images, masks, colors) <= math.sqrt(3) * 0.5).all()


def test_color_error_of_a_recolored_object_is_the_rgb_distance(rendered_scenes):
    images, masks, colors = rendered_scenes
    recolored = images.copy()
    new_color = np.array([100.0, 200.0, 50.0])
    for image, mask in zip(recolored, masks):
        image[mask > 0.99] = new_color / 255
    expected = np.linalg.norm(colors - new_color, axis=1)
    np.testing.assert_allclose(color_error(recolored, masks, colors), expected, atol=1e-3)


# ---- the caption baseline: text-to-image through the same text encoder --------------------------------
def stock_generation(pipeline, prompts, guidance_scale):
    """The same components run by diffusers' StableDiffusionPipeline, on the stock CLIP text encoder's states."""
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline(vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                                    unet=pipeline.unet, scheduler=pipeline.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    encode = lambda texts: pipeline.text_encoder(input_ids=pipeline.tokenizer(
        texts, padding="max_length", max_length=77, return_tensors="pt").input_ids).last_hidden_state
    with torch.no_grad():
        prompt_embeds, negative_embeds = encode(prompts), encode([""] * len(prompts))
    return stock(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=2,
                 guidance_scale=guidance_scale, output_type="np",
                 # `seed=0` gives every image a generator of its own seeded 0 (the seed rule; see seeded_generators)
                 generator=[torch.Generator().manual_seed(0) for _ in prompts]).images


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_text_only_generation_equals_stable_diffusion(tiny_pipeline, guidance_scale):
    prompts = ["a red circle", "a large blue square at the top left"]
    ours = tiny_pipeline.generate(None, prompt=prompts, num_inference_steps=2, guidance_scale=guidance_scale, seed=0,
                                  output_type="np").images
    stock = stock_generation(tiny_pipeline, prompts, guidance_scale)
    assert ours.shape == stock.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, stock, atol=1e-4)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the prompt matters


def test_text_only_generation_needs_a_prompt_and_no_text_guidance(tiny_pipeline):
    with pytest.raises(ViLexUsageError, match="give vilex_tokens, a prompt or both"):
        tiny_pipeline.generate(None, prompt=None, num_inference_steps=1)
    with pytest.raises(ViLexUsageError, match="text_guidance_scale needs vilex_tokens"):
        tiny_pipeline.generate(None, prompt=["a red circle"], text_guidance_scale=2.0, num_inference_steps=1)
