"""ViLexPipeline: determinism, save/load, schedulers, checkpoint checks; the denoising loop against diffusers'
StableDiffusionPipeline, and text-free guidance against its formula computed from separate UNet calls."""

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
    with pytest.raises(ViLexUsageError, match=r"width must be in 1\.\.4096, got 0"):  # 0 is not "the default"
        tiny_pipeline.generate(tokens, num_inference_steps=STEPS, width=0, seed=0)


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


# ---- the loop against references -------------------------------------------------------------------------
# Schedulers as a checkpoint's scheduler_config.json would name them, all from the tiny preset's noise
# schedule. DDIM's scale_model_input is the identity and its init_noise_sigma is 1, so Euler is there to
# cover both; v-prediction with zero terminal SNR and trailing spacing is what the toy base trains with.
SCHEDULERS = {
    "ddim-epsilon": ("DDIMScheduler", {"prediction_type": "epsilon"}),
    "ddim-v": ("DDIMScheduler", {"prediction_type": "v_prediction"}),
    "ddim-v-zero-snr-trailing": ("DDIMScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                                   "timestep_spacing": "trailing"}),
    "euler-epsilon": ("EulerDiscreteScheduler", {"prediction_type": "epsilon"}),
}
REFERENCE_STEPS = 3
# Both sides run the same float32 operations on the CPU, except that the reference feeds the UNet
# one guidance branch at a time where the pipeline stacks them: batch-dependent kernel choices stay
# below 1e-5 after a few steps; an 8-bit pixel level is 4e-3.
REFERENCE_ATOL = 1e-5


def stock_pipeline(pipeline):
    """diffusers' own StableDiffusionPipeline on the same components: the reference."""
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline(vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                                    unet=pipeline.unet, scheduler=pipeline.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return stock


def with_scheduler(pipeline, name: str):
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    pipeline.scheduler = getattr(diffusers, class_name).from_config(pipeline.scheduler.config, **overrides)
    return pipeline


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_generate_equals_stable_diffusion_pipeline(tiny_pipeline, sample_images, scheduler, guidance_scale):
    """diffusers' own StableDiffusionPipeline over the same modules, given our text-encoder states (ViLex
    tokens + a prompt per image) as prompt_embeds and the empty prompt's as negative_prompt_embeds. With
    seed=0 every image has a generator of its own seeded with 0: diffusers' list of generators."""
    pipeline = with_scheduler(tiny_pipeline, scheduler)
    tokens = pipeline.tokenize(sample_images, num_tokens=8)  # (2, 8, 32)
    prompts = ["a watercolor painting", "a red house"]
    ours = pipeline.generate(tokens, prompt=prompts, num_inference_steps=REFERENCE_STEPS,
                             guidance_scale=guidance_scale, seed=0, output_type="np").images

    stock = stock_pipeline(pipeline)
    with torch.no_grad():
        prompt_embeds = pipeline.encode_prompt(tokens, prompts)  # (2, 77, 32)
        negative_prompt_embeds = pipeline.encode_prompt(None, ["", ""])
    reference = stock(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      num_inference_steps=REFERENCE_STEPS, guidance_scale=guidance_scale,
                      generator=[torch.Generator().manual_seed(0) for _ in prompts], output_type="np").images

    # The scheduler the test asked for is the one that ran.
    config = pipeline.scheduler.config
    assert (type(pipeline.scheduler).__name__, config.prediction_type) == (
        SCHEDULERS[scheduler][0], SCHEDULERS[scheduler][1]["prediction_type"])
    if scheduler.endswith("trailing"):
        assert int(pipeline.scheduler.timesteps[0]) == 999 and config.rescale_betas_zero_snr
    assert ours.shape == reference.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=REFERENCE_ATOL)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the conditioning matters: not a constant image


def test_negative_prompt_equals_stable_diffusion_pipeline(tiny_pipeline, sample_images):
    """negative_prompt replaces the empty prompt of the unconditional branch, as in diffusers: against
    StableDiffusionPipeline given our text-encoder states as prompt_embeds and the negative prompts as
    text, which diffusers tokenizes and encodes itself with the stock CLIP forward."""
    pipeline = with_scheduler(tiny_pipeline, "ddim-v")
    tokens = pipeline.tokenize(sample_images, num_tokens=8)  # (2, 8, 32)
    prompts, negatives = ["a watercolor painting", None], ["a blurry photo", "dark"]
    ours = pipeline.generate(tokens, prompt=prompts, negative_prompt=negatives, num_inference_steps=REFERENCE_STEPS,
                             guidance_scale=7.5, seed=0, output_type="np").images

    stock = stock_pipeline(pipeline)
    with torch.no_grad():
        prompt_embeds = pipeline.encode_prompt(tokens, prompts)  # (2, 77, 32)
    reference = stock(prompt_embeds=prompt_embeds, negative_prompt=negatives, num_inference_steps=REFERENCE_STEPS,
                      guidance_scale=7.5, generator=[torch.Generator().manual_seed(0) for _ in prompts],
                      output_type="np").images
    np.testing.assert_allclose(ours, reference, rtol=0, atol=REFERENCE_ATOL)
    # The negative prompt matters, and "" (or None) is the empty prompt of plain classifier-free guidance.
    plain = pipeline.generate(tokens, prompt=prompts, num_inference_steps=REFERENCE_STEPS, guidance_scale=7.5, seed=0,
                              output_type="np").images
    empty = pipeline.generate(tokens, prompt=prompts, negative_prompt=["", None], num_inference_steps=REFERENCE_STEPS,
                              guidance_scale=7.5, seed=0, output_type="np").images
    assert np.abs(ours - plain).max() > 1e-3
    np.testing.assert_array_equal(empty, plain)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_an_image_is_the_same_alone_or_batched(tiny_pipeline, sample_images, scheduler):
    """With a seed every image has a generator of its own (issue 19; the served models' rule): image b of the
    batch [a, b] is b alone, also with a scheduler that draws noise at every step (ancestral sampling), and the
    j-th of num_images_per_prompt copies is the image alone with seed + j. Only batch-dependent kernel
    choices differ (REFERENCE_ATOL); one shared generator gave b other noise (differences of ~1)."""
    import diffusers

    pipeline = tiny_pipeline
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    tokens = pipeline.tokenize(sample_images, num_tokens=8)  # (2, 8, 32)
    kwargs = dict(num_inference_steps=REFERENCE_STEPS, seed=7, output_type="np")
    batch = pipeline.generate(tokens, **kwargs).images  # (2, 64, 64, 3)
    alone = np.concatenate([pipeline.generate(tokens[i:i + 1], **kwargs).images for i in range(2)])
    np.testing.assert_allclose(batch, alone, rtol=0, atol=REFERENCE_ATOL)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # two different images, not one noise for both

    copies = pipeline.generate(tokens[1:], num_images_per_prompt=2, **kwargs).images
    np.testing.assert_allclose(copies[0], alone[1], rtol=0, atol=REFERENCE_ATOL)
    next_seed = pipeline.generate(tokens[1:], **{**kwargs, "seed": 8}).images[0]
    np.testing.assert_allclose(copies[1], next_seed, rtol=0, atol=REFERENCE_ATOL)


def test_negative_prompt_is_refused_where_it_would_be_ignored(tiny_pipeline):
    tokens = torch.randn(1, 4, 32) * 0.02
    with pytest.raises(ViLexUsageError, match=r"negative_prompt needs guidance_scale > 1 .* guidance_scale 1 turns off"):
        tiny_pipeline.generate(tokens, negative_prompt="blurry", guidance_scale=1.0)
    with pytest.raises(ViLexUsageError, match="got 2 negative prompts for 1 images"):
        tiny_pipeline.generate(tokens, negative_prompt=["a", "b"])
    with pytest.raises(ViLexUsageError, match=r"negative_prompt: prompt is too long: \d+ text tokens, but with 0 ViLex"):
        tiny_pipeline.generate(tokens, negative_prompt="a small red house " * 20)


def stock_text_states(text_encoder, tokenizer, vilex_tokens: torch.Tensor | None, prompt: str) -> torch.Tensor:
    """[BOS] [ViLex tokens] [prompt] [EOS] [PAD ...] -> last_hidden_state (1, 77, D), by the stock CLIPTextModel
    forward on token ids: the k ViLex tokens become k extra rows of a copy's embedding table."""
    import copy

    encoder = copy.deepcopy(text_encoder)
    table = encoder.get_input_embeddings().weight  # (V, D)
    k = 0 if vilex_tokens is None else vilex_tokens.shape[0]
    if k:
        encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([table, vilex_tokens])))
    text_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    ids = [tokenizer.bos_token_id, *range(table.shape[0], table.shape[0] + k), *text_ids, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
    with torch.no_grad():
        return encoder(input_ids=torch.tensor([ids])).last_hidden_state


@pytest.mark.parametrize("guidance_scale, negative_prompt", [(1.0, None), (7.5, None), (7.5, "a blurry photo")])
def test_text_free_guidance_equals_its_formula(tiny_pipeline, sample_images, guidance_scale, negative_prompt):
    """ViLex tokens + prompt with text_guidance_scale w, against the formula in generate's docstring (the
    paper's text-free guidance, with classifier-free guidance g against the empty prompt on top):

        eps = eps_u + g (eps_v - eps_u) + w (eps_vc - eps_v)     g > 1
        eps = eps_v + w (eps_vc - eps_v)                          g <= 1

    computed here from separate UNet calls on the three conditionings (empty prompt, or the negative prompt
    in its place; ViLex only; ViLex + prompt), each encoded by the stock CLIP forward, through the
    scheduler and the VAE by hand."""
    pipeline = with_scheduler(tiny_pipeline, "ddim-v")
    w, g = 3.0, guidance_scale
    prompt = "a watercolor painting"
    tokens = pipeline.tokenize(sample_images[:1], num_tokens=6)  # (1, 6, 32)
    ours = pipeline.generate(tokens, prompt=prompt, num_inference_steps=REFERENCE_STEPS, guidance_scale=g,
                             negative_prompt=negative_prompt, text_guidance_scale=w, seed=0, output_type="np").images

    unet, vae, scheduler = pipeline.unet, pipeline.vae, pipeline.scheduler
    encode = lambda vilex, text: stock_text_states(pipeline.text_encoder, pipeline.tokenizer, vilex, text)
    states_u, states_v, states_vc = encode(None, negative_prompt or ""), encode(tokens[0], None), encode(tokens[0], prompt)
    scheduler.set_timesteps(REFERENCE_STEPS)
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            eps_u, eps_v, eps_vc = (unet(model_input, t, states).sample for states in (states_u, states_v, states_vc))
            if g > 1:
                eps = eps_u + g * (eps_v - eps_u) + w * (eps_vc - eps_v)
            else:
                eps = eps_v + w * (eps_vc - eps_v)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample  # (1, 3, 64, 64) in [-1, 1]
    reference = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    np.testing.assert_allclose(ours, reference, rtol=0, atol=REFERENCE_ATOL)
    # w matters: without text guidance (ViLex + prompt, plain CFG) the image is another one.
    plain = pipeline.generate(tokens, prompt=prompt, num_inference_steps=REFERENCE_STEPS, guidance_scale=g, seed=0,
                              output_type="np").images
    assert np.abs(ours - plain).max() > 1e-3


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
