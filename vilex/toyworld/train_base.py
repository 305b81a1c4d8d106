"""Train the toy world's text-to-image base from scratch: the VAE, then the text encoder and UNet on captions.

    vilex toyworld train-base OUT [--vae-steps 2000] [--unet-steps 8000] [--seed 0]
    vilex toyworld train-base OUT --init-from OLD/pipeline [--unet-steps 4000]   a warm start: the old base's VAE
                                  kept (no stage 2), its text encoder and UNet the starting weights of stage 3
                                  (--unet-steps 0: kept as they are, e.g. to fine-tune only the decoder)

1. scenes: `num_scenes` training scenes rendered once (split "train"), held in memory as uint8
2. VAE stage: AutoencoderKL on whole scenes (`vae_crop` 64; smaller crops are cheaper but leave a frame
   along the border of whole-image reconstructions), loss MSE + L1 + a small KL term, its PSNR on
   held-out scenes logged at every checkpoint; then the latent scaling factor is set to 1 / std of the
   latents, as Stable Diffusion's 0.18215 was
3. text-to-image stage: every scene's latent distribution is encoded once with the frozen VAE; the CLIP
   text encoder and the UNet train jointly on the v-prediction loss of a zero-terminal-SNR schedule
   (see `scheduler`; `--no-zero-terminal-snr` gives SD 1.x's epsilon schedule) with min-SNR weighting (see
   `training.objective.min_snr_weights`), the caption replaced by the empty prompt 10% of the time (classifier-free guidance),
   with an EMA of both; every `curve_every` steps the EMA weights sample held-out captions and the probe
   reads them (`curve`: the learning curve). With `partial_captions` / `shifted_captions`, captions of varied
   detail (a random subset of their parts) and place (after padding positions): a base that reads a word
   wherever it stands, as ViLex + text puts words after the tokens (`vary_caption`, `shifted_prompts`). With
   `detailed_captions`, some captions start with the object's exact place and size as digits (`detailed_caption`):
   words for what the coarse caption leaves open, which the learning curve then measures too
4. decoder stage: the VAE's decoder alone, fine-tuned on whole scenes with the encoder frozen (as Stable
   Diffusion's ft-MSE VAE was): the latent space the UNet learned stays the same, reconstructions sharpen
5. OUT/pipeline: a ViLex checkpoint (the trained base + an untrained ViLex encoder) for `vilex train`

Each stage saves a checkpoint every `checkpoint_every` steps (weights, EMA, optimizer, RNG) through
`vilex.training.checkpoint`, so a killed run continues where it stopped with the same numbers.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from ..bridge import TextEncoderFromEmbeds
from ..errors import ViLexUsageError
from ..outputs import atomic_folder
from ..pipeline import ViLexPipeline
from ..training import checkpoint as ckpt
from ..training.objective import min_snr_weights, training_noise_scheduler
from ..training.optim import lr_factor
from . import components, curve
from .config import BaseConfig
from .scenes import IMAGE_SIZE, SPLITS, detailed_caption, drawn_partial_caption, fingerprint, make_scenes, render_all


VAE_KL_WEIGHT = 1e-6
CAPTION_DROPOUT = 0.1
CONFIG_FILE = "base_config.json"


def scheduler(zero_terminal_snr: bool = True) -> DDIMScheduler:
    """SD 1.x's betas; with `zero_terminal_snr`, rescaled so that t = T-1 is pure noise (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"), with v-prediction and trailing steps.

    Without the rescale, x_T keeps sqrt(a_T) = 0.068 of the latent. This world's 16x16 latents have
    per-channel means that vary by up to 1.2 between scenes (the background fills most of the image),
    while the mean of 256 noise values varies by only 1/16: at t = T the UNet can read the background
    from x_T in training, never learns to choose it from the caption, and at inference (pure noise)
    paints every background the same gray.
    """
    if not zero_terminal_snr:
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                         prediction_type="v_prediction")


def render_pixels(scenes) -> torch.Tensor:
    """Scenes -> (N, 3, 64, 64) uint8."""
    return torch.from_numpy(render_all(scenes)).permute(0, 3, 1, 2).contiguous()


def to_unit(pixels_uint8: torch.Tensor) -> torch.Tensor:
    return pixels_uint8.float() / 127.5 - 1.0  # the VAE's [-1, 1]


class Stage:
    """One resumable training stage: modules, an AdamW optimizer, an optional EMA and a CPU generator,
    saved together under OUT/<name>/checkpoints."""

    def __init__(self, config: BaseConfig, name: str, modules: dict[str, torch.nn.Module], lr: float, seed: int,
                 total_steps: int, ema_decay: float | None):
        self.config = config
        self.name = name
        self.total_steps = total_steps
        self.started = time.time()
        self.folder = Path(config.out) / name
        self.modules = modules
        self.parameters = [p for m in modules.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        self.base_lr = lr
        self.ema = EMAModel(self.parameters, decay=ema_decay) if ema_decay else None
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        ckpt.remove_partial(self.folder)
        latest = ckpt.latest_checkpoint(self.folder)
        if latest is not None:
            self._load(latest)

    def _load(self, folder: Path) -> None:
        weights = load_file(str(folder / "trainable.safetensors"))
        for name, module in self.modules.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})
        meta = json.loads((folder / ckpt.STATE_FILE).read_text())
        self.optimizer.load_state_dict(ckpt.optimizer_from_files(load_file(str(folder / "optimizer.safetensors")),
                                                                 meta["optimizer"]))
        if self.ema is not None:
            ema = load_file(str(folder / "ema.safetensors"))
            self.ema.shadow_params = [ema[str(i)].to(p.device) for i, p in enumerate(self.parameters)]
            self.ema.optimization_step = meta["ema_optimization_step"]
        ckpt.restore_rng(load_file(str(folder / "rng-0.safetensors")), self.generator)
        self.step = meta["step"]
        print(f"{self.folder.name}: resumed at step {self.step} from {folder}", flush=True)

    def save(self) -> None:
        staging = ckpt.staging_folder(self.folder, self.step)
        staging.mkdir(parents=True, exist_ok=True)
        ckpt.save_tensors(staging / "trainable.safetensors",
                          {f"{n}.{k}": v for n, m in self.modules.items() for k, v in m.state_dict().items()})
        tensors, optimizer_meta = ckpt.optimizer_to_files(self.optimizer.state_dict())
        ckpt.save_tensors(staging / "optimizer.safetensors", tensors)
        meta = {"step": self.step, "optimizer": optimizer_meta}
        if self.ema is not None:
            ckpt.save_tensors(staging / "ema.safetensors", {str(i): p for i, p in enumerate(self.ema.shadow_params)})
            meta["ema_optimization_step"] = self.ema.optimization_step
        ckpt.save_tensors(staging / "rng-0.safetensors", ckpt.rng_tensors(self.generator))
        ckpt.save_json(staging / ckpt.STATE_FILE, meta)
        ckpt.commit(staging, self.folder / ckpt.CHECKPOINTS / ckpt.checkpoint_name(self.step))
        ckpt.prune(self.folder, 1)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def update(self, loss: torch.Tensor) -> None:
        """One AdamW step at this step's learning rate (warmup, cosine), the EMA, then a log line and a
        checkpoint when they are due."""
        scale = lr_factor(self.step, self.config.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.parameters)
        self.step += 1
        last = self.step == self.total_steps
        if self.step % self.config.log_every == 0 or last:
            print(json.dumps({"stage": self.name, "step": self.step, "of": self.total_steps,
                              "loss": round(loss.item(), 5), "elapsed_s": round(time.time() - self.started, 1)}),
                  flush=True)
        if self.step % self.config.checkpoint_every == 0 or last:
            self.save()

    def finish(self) -> None:
        """Put the EMA weights (when kept) into the modules."""
        if self.ema is not None:
            self.ema.copy_to(self.parameters)


# ---- 2. the VAE --------------------------------------------------------------------------------------
def train_vae(config: BaseConfig, pixels: torch.Tensor):
    device = torch.device(config.device)
    vae = components.toy_vae().to(device)
    stage = Stage(config, "vae", {"vae": vae}, config.vae_lr, config.seed, config.vae_steps, ema_decay=None)
    N, S, C = pixels.shape[0], pixels.shape[-1], config.vae_crop
    vae.train()
    while not stage.done:
        g = stage.generator
        index = torch.randint(0, N, (config.vae_batch_size,), generator=g)
        top, left = (int(v) for v in torch.randint(0, S - C + 1, (2,), generator=g))
        batch = to_unit(pixels[index, :, top:top + C, left:left + C]).to(device)  # (B, 3, C, C)
        posterior = vae.encode(batch).latent_dist
        # Every random draw comes from the stage's CPU generator: a seed gives the same run on any device.
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        reconstruction = vae.decode(z).sample
        loss = (F.mse_loss(reconstruction, batch) + F.l1_loss(reconstruction, batch)
                + VAE_KL_WEIGHT * posterior.kl().mean())
        stage.update(loss)
        if stage.step % config.checkpoint_every == 0 or stage.done:
            vae.eval()
            log_vae_psnr(vae, config, stage="vae", step=stage.step)
            vae.train()
    vae.eval()
    # 1 / std of the latents (posterior means of 1,024 scenes), so the UNet sees unit-variance latents.
    with torch.no_grad():
        sample = to_unit(pixels[:1024])
        latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean for chunk in sample.split(128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def vae_psnr(vae, n: int) -> float:
    """Mean round-trip PSNR (dB, 8-bit pixels, posterior mean) on the first n "test" scenes."""
    pixels = render_pixels(make_scenes(n, SPLITS["test"]))
    values = []
    for chunk in pixels.split(64):
        decoded = vae.decode(vae.encode(to_unit(chunk).to(vae.device)).latent_dist.mean).sample.cpu()
        restored = ((decoded.clamp(-1, 1) + 1) * 127.5).round()
        mse = (restored - chunk.float()).pow(2).flatten(1).mean(1)
        values.append(10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10)))
    return float(torch.cat(values).mean())


def log_vae_psnr(vae, config: BaseConfig, **fields) -> None:
    print(json.dumps({**fields, "heldout_psnr_db": round(vae_psnr(vae, config.vae_check_scenes), 2)}), flush=True)


def train_decoder(config: BaseConfig, vae, pixels: torch.Tensor):
    """Fine-tune the decoder (and post_quant_conv) on the frozen encoder's latents of whole scenes."""
    modules = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    stage = Stage(config, "vae_decoder", modules, config.decoder_lr, config.seed + 3, config.decoder_steps,
                  ema_decay=None)
    N = pixels.shape[0]
    vae.eval()
    if stage.step == 0:
        log_vae_psnr(vae, config, stage="vae_decoder", step=0)
    while not stage.done:
        g = stage.generator
        batch = to_unit(pixels[torch.randint(0, N, (config.vae_batch_size,), generator=g)]).to(vae.device)
        with torch.no_grad():
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(vae.device)
        reconstruction = vae.decode(z).sample
        stage.update(F.mse_loss(reconstruction, batch) + F.l1_loss(reconstruction, batch))
        if stage.step % config.checkpoint_every == 0 or stage.done:
            log_vae_psnr(vae, config, stage="vae_decoder", step=stage.step)
    return vae


# ---- 3. the text encoder and UNet ----------------------------------------------------------------------
@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every scene's latent posterior (mean, std), (N, 4, 16, 16) each, unscaled, on the CPU."""
    means, stds = [], []
    for chunk in pixels.split(256):
        posterior = vae.encode(to_unit(chunk).to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def vary_caption(scene, config: BaseConfig, generator: torch.Generator) -> str:
    """The scene's caption, or with probability `partial_captions` a random non-empty subset of its parts; a
    whole caption is preceded by its detail words (`detailed_caption`, `detail_digits` per coordinate) with
    probability `detailed_captions`."""
    # (No random draw for an option at 0: runs made before these options continue with the same numbers.)
    if not config.partial_captions or torch.rand((), generator=generator) >= config.partial_captions:
        if config.detailed_captions and torch.rand((), generator=generator) < config.detailed_captions:
            return detailed_caption(scene, config.detail_digits)
        return scene.caption
    return drawn_partial_caption(scene, lambda n: torch.rand(n, generator=generator).tolist())


def shifted_prompts(prompt_builder, prompts: list[str], share: float, generator: torch.Generator) -> torch.Tensor:
    """Word embeddings of the prompts, a `share` of them placed after 1 .. (as many as fit) padding positions:
    [BOS] [PAD x s] words [EOS] [PAD ...], built as ViLex + text is, with the padding embedding as the tokens."""
    if not share:
        return prompt_builder(None, prompts)
    room = [prompt_builder.max_vilex_tokens(p) if p else 0 for p in prompts]  # padding positions that fit
    shift = [int(torch.randint(1, r + 1, (), generator=generator)) if r and torch.rand((), generator=generator) < share
             else 0 for r in room]
    pad = prompt_builder.token_embedding.weight[prompt_builder.pad_id]
    prefix = pad.expand(len(prompts), max(max(shift), 1), -1)
    return prompt_builder(prefix, prompts, lengths=torch.tensor(shift))


def train_text_to_image(config: BaseConfig, vae, scenes: list, pixels: torch.Tensor):
    tokenizer = components.toy_tokenizer()
    torch.manual_seed(config.seed + 1)  # the initial weights
    device = torch.device(config.device)
    text_encoder = components.toy_text_encoder(tokenizer).to(device)
    unet = components.toy_unet().to(device)
    if config.init_from:  # a warm start; a checkpoint of this stage, when there is one, still wins (below)
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(Path(config.init_from) / "text_encoder").state_dict())
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(config.init_from) / "unet").state_dict())
    pipeline_scheduler = scheduler(config.zero_terminal_snr)
    noise_scheduler = training_noise_scheduler(pipeline_scheduler.config)
    stage = Stage(config, "text_to_image", {"text_encoder": text_encoder, "unet": unet}, config.unet_lr,
                  config.seed + 2, config.unet_steps, ema_decay=config.ema_decay)
    vae.eval()
    means, stds = encode_all(vae, pixels)
    scaling = float(vae.config.scaling_factor)
    # The same soft-prompt path as inference: [BOS] words [EOS] [PAD], through the embedding table.
    probe_pipeline = _assemble(tokenizer, text_encoder, unet, vae, pipeline_scheduler)
    prompt_builder = probe_pipeline.prompt_builder
    encoder = TextEncoderFromEmbeds(text_encoder)
    text_encoder.train()
    unet.train()
    N, T = means.shape[0], noise_scheduler.config.num_train_timesteps
    if config.curve_every and stage.step == 0:
        learning_curve_point(config, stage, probe_pipeline)  # the untrained start of the curve
    while not stage.done:
        g = stage.generator
        index = torch.randint(0, N, (config.unet_batch_size,), generator=g)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=g)) * scaling
        keep = torch.rand(len(index), generator=g) >= CAPTION_DROPOUT
        prompts = [vary_caption(scenes[i], config, g) if k else "" for i, k in zip(index.tolist(), keep.tolist())]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, T, (len(index),), generator=g)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        prompt_embeds = encoder(shifted_prompts(prompt_builder, prompts, config.shifted_captions, g))  # (B, 77, D)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, prompt_embeds).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(1)  # (B,)
        if config.min_snr_gamma:
            loss = loss * min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma)
        stage.update(loss.mean())
        if config.curve_every and (stage.step % config.curve_every == 0 or stage.done):
            learning_curve_point(config, stage, probe_pipeline)
    stage.finish()
    text_encoder.eval()
    unet.eval()
    return tokenizer, text_encoder, unet, pipeline_scheduler


def learning_curve_point(config: BaseConfig, stage: Stage, pipeline: ViLexPipeline) -> None:
    """Sample held-out captions with the EMA weights (as they would ship), read them with the probe, log."""
    from .probe import load_probe
    from .shipped import probe_path

    if any(p["step"] == stage.step for p in curve.read_points(config.out)):
        return
    started = time.time()
    modules = [pipeline.text_encoder, pipeline.unet]
    if stage.ema is not None:
        stage.ema.store(stage.parameters)
        stage.ema.copy_to(stage.parameters)
    for module in modules:
        module.eval()
    try:
        probe = load_probe(config.curve_probe or probe_path())
        point = curve.measure(pipeline, probe, config.curve_n, seed=config.seed)
        if config.detailed_captions:  # what the detail words add: the same scenes and noise from detailed captions
            detailed = curve.measure(pipeline, probe, config.curve_n, seed=config.seed,
                                     prompt_of=functools.partial(detailed_caption, digits=config.detail_digits))
            point |= {f"{curve.DETAILED}{name}": value for name, value in detailed.items()}
            point[curve.DIGITS] = config.detail_digits
    finally:
        if stage.ema is not None:
            stage.ema.restore(stage.parameters)
        for module in modules:
            module.train()
    curve.log_point(config.out, stage.step, point)
    print(json.dumps({"stage": "learning_curve", "step": stage.step, **{k: round(v, 3) for k, v in point.items()},
                      "seconds": round(time.time() - started, 1)}), flush=True)


def _assemble(tokenizer, text_encoder, unet, vae, pipeline_scheduler, pooler_self_attention: bool = False,
              seed: int = 0) -> ViLexPipeline:
    torch.manual_seed(seed)
    std = float(text_encoder.get_input_embeddings().weight.detach().std())
    vilex = components.toy_vilex(std, pooler_self_attention=pooler_self_attention)
    return ViLexPipeline(vilex=vilex, image_processor=components.toy_image_processor(), text_encoder=text_encoder,
                         tokenizer=tokenizer, unet=unet, vae=vae, scheduler=pipeline_scheduler)


def new_vilex_checkpoint(base: str, out: str, pooler_self_attention: bool = False, seed: int = 0,
                         pretrain_vision_steps: int = 0, device: str = "cpu", all_swaps: bool = False,
                         captioning: float = 0.0) -> Path:
    """A ViLex checkpoint on a trained base's frozen components, with a new ViLex encoder whose pooler is
    untrained and whose vision model is, with `pretrain_vision_steps`, pretrained SigLIP-style against the
    base's text encoder (`vision_pretrain`; all_swaps and captioning as there)."""
    source = ViLexPipeline.from_pretrained(base)
    pipeline = _assemble(source.tokenizer, source.text_encoder, source.unet, source.vae, source.scheduler,
                         pooler_self_attention=pooler_self_attention, seed=seed)
    if pretrain_vision_steps:
        from .vision_pretrain import pretrain_vision

        report = pretrain_vision(pipeline.vilex, pipeline.image_processor, pipeline.tokenizer, pipeline.text_encoder,
                                 steps=pretrain_vision_steps, seed=seed, device=device, all_swaps=all_swaps,
                                 captioning=captioning)
        print(json.dumps({"vision_pretrain": report}), flush=True)
    with atomic_folder(Path(out), must_be_new=True) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return Path(out)


def tune_vision_checkpoint(checkpoint: str, out: str, steps: int, device: str = "cpu", **options) -> Path:
    """A copy of a ViLex checkpoint whose vision model is fine-tuned with CapPa's captioning loss alone
    (`vision_pretrain.tune_vision_captioning`, options as there); every other weight is the checkpoint's."""
    from ..runtime import load_pipeline
    from .vision_pretrain import tune_vision_captioning

    pipeline = load_pipeline(checkpoint)
    size = pipeline.vilex.vision_model.config.image_size
    if size != IMAGE_SIZE:
        raise ViLexUsageError(f"CKPT '{checkpoint}' is not a toy-world checkpoint: its vision model takes "
                              f"{size}x{size} images, the toy world's scenes are {IMAGE_SIZE}x{IMAGE_SIZE}")
    report = tune_vision_captioning(pipeline.vilex.vision_model, pipeline.image_processor, pipeline.tokenizer,
                                    steps=steps, device=device, **options)
    print(json.dumps({"vision_captioning": report}), flush=True)
    with atomic_folder(Path(out), must_be_new=True) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return Path(out)


# ---- 1-4. the whole base -----------------------------------------------------------------------------
def train_base(config: BaseConfig) -> Path:
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG_FILE
    if saved.is_file() and json.loads(saved.read_text()) != config.identity():
        raise ViLexUsageError(f"OUT '{out}' holds a run with other options ({saved}); give a new OUT or the same options")
    saved.write_text(json.dumps(config.identity(), indent=1))
    started = time.time()
    scenes = make_scenes(config.num_scenes, SPLITS["train"])
    pixels = render_pixels(scenes)
    print(f"rendered {len(scenes)} scenes in {time.time() - started:.0f} s; data fingerprint {fingerprint(scenes)}",
          flush=True)
    torch.manual_seed(config.seed)
    if config.init_from:
        vae = AutoencoderKL.from_pretrained(Path(config.init_from) / "vae").to(config.device).eval()
        log_vae_psnr(vae, config, stage="vae", **{"from": config.init_from})
    else:
        vae = train_vae(config, pixels)
    if config.unet_steps:
        tokenizer, text_encoder, unet, pipeline_scheduler = train_text_to_image(config, vae, scenes, pixels)
    else:  # --init-from with --unet-steps 0: that base's text encoder and UNet as they are
        source = ViLexPipeline.from_pretrained(config.init_from)
        tokenizer, text_encoder, unet, pipeline_scheduler = (source.tokenizer, source.text_encoder, source.unet,
                                                             source.scheduler)
    if config.decoder_steps:
        vae = train_decoder(config, vae, pixels)
    vae, text_encoder, unet = vae.cpu(), text_encoder.cpu(), unet.cpu()  # the checkpoint is saved from the CPU
    pipeline = _assemble(tokenizer, text_encoder, unet, vae, pipeline_scheduler, seed=config.seed)
    final = out / "pipeline"
    with atomic_folder(final, must_be_new=False) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    report = {"data_fingerprint": fingerprint(scenes), "wall_time_s": round(time.time() - started, 1),
              "vae_scaling_factor": vae.config.scaling_factor,
              "vae_heldout_psnr_db": round(vae_psnr(vae, config.vae_check_scenes), 2), "device": config.device,
              "config": asdict(config)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote the toy base as a ViLex checkpoint {final} in {report['wall_time_s']:.0f} s", flush=True)
    return final
