"""Pretrain the toy ViLex encoder's vision model the way SigLIP was pretrained: image-text pairs, the
sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

ViLex starts from a pretrained vision encoder (SigLIP in the paper), whose features already know what
is where. The toy encoder was trained from scratch by the diffusion loss alone, and learned only what a
global average gives: its tokens carried the background and the object's color, while the object's
position was not even linearly decodable from them (ridge regression on 32 tokens: centre error 10.3 px,
the same as predicting the mean; measured 2026-12-05). This stage gives it SigLIP's kind of start.

    the text tower: the base's own CLIP text encoder, frozen (LiT: "locked-image text tuning" with the
        roles swapped, as SigLIP's LiT variant does), and on its hidden states of each caption's tokens a
        trainable linear head (discarded afterwards)
    the image tower: the vision model, mean-pooled, then a linear head (discarded afterwards)
    loss: -mean log sigmoid(z_ij (t <x_i, y_j> + b)), z = +1 for an image with its own caption, -1 else,
        with SigLIP's learnable temperature t (init log 10) and bias b (init -10)

Why the caption's whole hidden-state sequence and a head, not the text encoder's pooled output (the first
version): the toy base's pooled output barely tells apart the words that matter here (cosine similarity of
two captions that differ in one word, 2026-12-05: left/right 0.998, circle/square 0.999), so features trained
against it learned the vertical position but not the horizontal one (ridge-regression centre error from 32
tokens: x 10.1 px, the mean's 10.2; y 3.6 px). Each word's own hidden state still differs, and a head trained
with the in-batch negatives (captions that differ in any word) learns to weigh every word that tells them apart.

Why hard negatives (NegCLIP's, Yuksekgonul et al. 2023, "When and why vision-language models behave like
bags-of-words"): a batch of in-batch negatives rarely holds two captions that differ only in shape, and a linear
read of the tokens of a ViLex encoder pretrained without them gave the shape of 39% of scenes (5 shapes, the most
common 19%; measured 2026-12-05). So each image also gets, per step, one caption per swappable word (shape,
color, size, cell, background color) with that word replaced (`scenes.caption_of(scene, **swap)`) as a negative;
the report gives, per word, how often the true caption outscores every caption with that word swapped. Measured
(1,500 steps, 512 held-out scenes, 2026-12-05): shape 0.19 -> 0.59, the other words 0.91-1.00. The shipped
encoder's reconstructions still drew the wrong shape in 68% of scenes (the model card).

Why two more options (2026-12-05, evening; the model card has the figures). Per-image token optimization through the
frozen text encoder and UNet (textual inversion from that encoder's tokens) drew the right shape in 75% of scenes
where the encoder's own tokens drew 25%, so the base can be steered to a shape by tokens and the encoder is what
loses it; and an attentive probe on that vision model's patch features read shape in 43% of scenes, where the same
probe on the raw 8x8 pixel patches read 78%. The features had dropped what the pixels hold. So:
- `all_swaps`: every caption with one word swapped (4 shapes, 7 colors, ...) is a negative of its image at every
  step, not one per word drawn at random;
- `captioning`: CapPa's parallel captioning loss (Tschannen et al. 2023, "Image Captioners Are Scalable Vision
  Learners Too"; with the contrastive loss, CoCa's pairing, Yu et al. 2022): a small decoder (`CaptionDecoder`,
  discarded afterwards) predicts each caption token from the patch features, so every word of the caption,
  the shape word among them, is a target of its own rather than one term of a similarity.

And a fine-tune of a trained encoder's vision model (`tune_vision_captioning`, `vilex toyworld tune-vision`,
2026-12-07): the captioning loss alone, no contrastive term, before more `vilex train`. Measured on the tenth
checkpoint's encoder, first with a one-off script of the same loss and hyperparameters (`runs/vision_cap.py`: its
cosine decay started at step 0, its decoder had no BOS query; the model card, "What the vision model can hold"), then
2,000 `vilex train` steps: an attentive head then reads the shape from the tokens in 0.80 of held-out scenes (0.70
before), and the reconstructions draw it in 0.665 (0.605). Through this command, then 6,000 `vilex train` steps (the
twelfth checkpoint's encoder): tokens 0.85, reconstructions 0.665 at 32 tokens (18.65 dB, +0.14) and 0.56 at 4
(0.515 before).

Captions are coarse (shape, color word, size word, 3x3 cell, background), so the features learn those;
what captions leave out (exact place, size and shade) is left to the diffusion loss of `vilex train`.
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

from ..training.optim import warmup_cosine
from .scenes import SPLITS, SWAPPABLE, caption_of, caption_words, make_scenes, render_all

HELDOUT_SCENES = 512  # "heldout" split scenes the caption retrieval accuracy is measured on


def _pixels(processor, scenes) -> torch.Tensor:
    """Scenes -> pixel values exactly as the pipeline's image processor makes them (same size, rescale and
    normalization), computed on the whole array at once."""
    images = torch.from_numpy(render_all(scenes)).permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (images * processor.rescale_factor - mean) / std


def _caption_ids(tokenizer, unique: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of distinct captions padded to the tokenizer's length: (U, 77), and as captioning targets over
    the longest caption's tokens (BOS, words, EOS): (U, L), -100 at BOS and padding."""
    encoded = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
    length = int(encoded.attention_mask.sum(dim=1).max())
    targets = encoded.input_ids[:, :length].masked_fill(encoded.attention_mask[:, :length] == 0, -100)
    targets[:, 0] = -100  # BOS
    return encoded.input_ids, targets


@torch.no_grad()
def _caption_states(tokenizer, text_encoder, captions: list[str], batch_size: int = 512
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen text encoder's last hidden states of each distinct caption over the longest caption's tokens
    (BOS, words, EOS): (U, L, D), each caption's row in them: (N,), and each distinct caption's token ids as
    captioning targets (U, L), -100 at BOS and padding."""
    unique = sorted(set(captions))
    ids, targets = _caption_ids(tokenizer, unique)
    length = targets.shape[1]
    states = torch.cat([text_encoder(input_ids=ids[start:start + batch_size]).last_hidden_state[:, :length]
                        for start in range(0, len(unique), batch_size)])
    index = {caption: i for i, caption in enumerate(unique)}
    return states, torch.tensor([index[c] for c in captions]), targets


def swapped_captions(scenes) -> tuple[list[list[str]], dict[str, slice]]:
    """Per scene, its caption with each swappable word replaced by every other value (`SWAPPABLE`), and the
    slice of that list each word's swaps take."""
    slices, start = {}, 0
    for word, values in SWAPPABLE.items():
        slices[word] = slice(start, start + len(values) - 1)
        start += len(values) - 1
    swapped = []
    for scene in scenes:
        current = caption_words(scene)
        swapped.append([caption_of(scene, **{word: value}) for word, values in SWAPPABLE.items()
                        for value in values if value != current[word]])
    return swapped, slices


class CaptionDecoder(torch.nn.Module):
    """CapPa's parallel caption decoder (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners
    Too"): one learned query per caption position, transformer decoder layers (self-attention among the queries,
    cross-attention to the patch features), then the vocabulary's logits. Discarded after pretraining."""

    def __init__(self, width: int, length: int, vocab_size: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(length, width) * 0.02)
        layer = torch.nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.decoder = torch.nn.TransformerDecoder(layer, layers)
        self.norm = torch.nn.LayerNorm(width)
        self.logits = torch.nn.Linear(width, vocab_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, width) patch features -> (B, length, vocab) logits."""
        return self.logits(self.norm(self.decoder(self.queries.expand(len(patches), -1, -1), patches)))


def _text_features(head, states: torch.Tensor) -> torch.Tensor:
    return F.normalize(head(states.flatten(1)), dim=-1)


def _image_features(head, patches: torch.Tensor) -> torch.Tensor:
    """(B, N, width) patch features -> (B, D) normalized image features (mean-pooled, through the head)."""
    return F.normalize(head(patches.mean(dim=1)), dim=-1)


@torch.no_grad()
def heldout_image_features(vision_model, head, pixels: torch.Tensor) -> torch.Tensor:
    """(N, D) normalized image features of held-out pixels, with the vision model in eval mode."""
    vision_model.eval()
    image = torch.cat([_image_features(head, vision_model(pixel_values=pixels[i:i + 256]).last_hidden_state)
                       for i in range(0, len(pixels), 256)])
    vision_model.train()
    return image


@torch.no_grad()
def swap_accuracy(image: torch.Tensor, text_head, states: torch.Tensor, swapped_states: torch.Tensor,
                  slices: dict[str, slice]) -> dict[str, float]:
    """Per swappable word: the fraction of images (features (N, D)) whose own caption (states (N, L, D))
    outscores every one of its captions with that word swapped (swapped_states (N, S, L, D))."""
    own = (image * _text_features(text_head, states)).sum(-1)  # (N,)
    swapped = (image[:, None] * _text_features(text_head, swapped_states.flatten(0, 1)).view(
        *swapped_states.shape[:2], -1)).sum(-1)  # (N, S)
    return {word: round(float((own > swapped[:, part].max(dim=1).values).float().mean()), 3)
            for word, part in slices.items()}


@torch.no_grad()
def retrieval_accuracy(image: torch.Tensor, text_head, captions: list[str], states: torch.Tensor) -> float:
    """Image (features (N, D)) -> caption top-1 among the held-out captions (a tie with an identical caption
    counts); states: each caption's hidden states (N, L, D)."""
    best = (image @ _text_features(text_head, states).T).argmax(dim=1)
    return sum(captions[j] == captions[i] for i, j in enumerate(best.tolist())) / len(captions)


def pretrain_vision(vilex, image_processor, tokenizer, text_encoder, steps: int, num_scenes: int = 20_000,
                    batch_size: int = 256, lr: float = 1e-3, seed: int = 0, log_every: int = 100,
                    heldout_scenes: int = HELDOUT_SCENES, device: str = "cpu", all_swaps: bool = False,
                    captioning: float = 0.0) -> dict:
    """Train `vilex.vision_model` in place with the sigmoid loss against features of the frozen text encoder's
    hidden states of each caption (through a trainable head), on `device` (every random draw from a CPU generator;
    the model is back on the CPU after); returns a report (loss; held-out caption retrieval and swapped-word
    accuracy, before and after; wall time).

    all_swaps: every swapped caption of an image is its negative at every step (else one per word, drawn).
    captioning: the weight of CapPa's captioning loss (`CaptionDecoder`) added to the sigmoid loss; 0 leaves it out.
    """
    started = time.time()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    scenes = make_scenes(num_scenes, SPLITS["train"])
    heldout = make_scenes(heldout_scenes, SPLITS["heldout"])
    pixels, heldout_pixels = _pixels(image_processor, scenes), _pixels(image_processor, heldout)
    text_encoder.eval()
    swapped, slices = swapped_captions(scenes + heldout)
    per_scene = 1 + len(swapped[0])  # own caption, then its swaps
    captions = [c for scene, swaps in zip(scenes + heldout, swapped) for c in [scene.caption] + swaps]
    states, caption_row, caption_ids = _caption_states(tokenizer, text_encoder, captions)
    states = states.to(device)
    caption_row = caption_row.view(-1, per_scene)
    swap_row, heldout_swap_row = caption_row[:len(scenes), 1:], caption_row[len(scenes):, 1:]
    caption_row, heldout_row = caption_row[:len(scenes), 0], caption_row[len(scenes):, 0]
    heldout_captions = [s.caption for s in heldout]
    heldout_pixels = heldout_pixels.to(device)

    vision_model = vilex.vision_model.to(device)
    vision_model.train()
    width, text_width = vision_model.config.hidden_size, states.shape[-1]
    head = torch.nn.Linear(width, text_width).to(device)
    text_head = torch.nn.Linear(states.shape[1] * text_width, text_width).to(device)
    caption_ids = caption_ids.to(device)
    caption_decoder = CaptionDecoder(width, caption_ids.shape[1], len(tokenizer)).to(device) if captioning else None
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    logit_bias = torch.nn.Parameter(torch.tensor(-10.0, device=device))
    parameters = (list(vision_model.parameters()) + list(head.parameters()) + list(text_head.parameters())
                  + [logit_scale, logit_bias] + ([] if caption_decoder is None else list(caption_decoder.parameters())))
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    heldout_states, heldout_swapped = states[heldout_row], states[heldout_swap_row]

    def measure() -> dict:
        image = heldout_image_features(vision_model, head, heldout_pixels)
        return {"caption_retrieval_top1": round(retrieval_accuracy(image, text_head, heldout_captions,
                                                                   heldout_states), 3),
                "beats_swapped_word": swap_accuracy(image, text_head, heldout_states, heldout_swapped, slices)}

    before = measure()
    labels = 2 * torch.eye(batch_size, device=device) - 1
    losses = []
    for step in range(1, steps + 1):
        batch = torch.randint(len(scenes), (batch_size,), generator=generator)
        hidden = vision_model(pixel_values=pixels[batch].to(device)).last_hidden_state  # (B, N, width)
        image = _image_features(head, hidden)
        own = caption_row[batch].to(device)  # each image's own caption: its row in states and caption_ids
        text = _text_features(text_head, states[own])
        logits = image @ text.T * logit_scale.exp() + logit_bias
        # hard negatives: per image, its caption with one word replaced; every such caption (all_swaps), or one
        # per swappable word, drawn
        if all_swaps:
            rows = swap_row[batch]  # (B, swaps)
        else:
            pick = torch.stack([part.start + torch.randint(part.stop - part.start, (batch_size,), generator=generator)
                                for part in slices.values()], dim=1)  # (B, words)
            rows = swap_row[batch][torch.arange(batch_size)[:, None], pick]
        hard = _text_features(text_head, states[rows.to(device)].flatten(0, 1)).view(batch_size, rows.shape[1], -1)
        hard_logits = (image[:, None] * hard).sum(-1) * logit_scale.exp() + logit_bias
        loss = (-F.logsigmoid(labels * logits).sum() - F.logsigmoid(-hard_logits).sum()) / batch_size
        if caption_decoder is not None:
            word_logits = caption_decoder(hidden)  # (B, L, vocab)
            loss = loss + captioning * F.cross_entropy(word_logits.flatten(0, 1), caption_ids[own].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            print(json.dumps({"stage": "vision-pretrain", "step": step, "of": steps,
                              "loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
                              "elapsed_s": round(time.time() - started, 1)}), flush=True)
    after = measure()
    vision_model.cpu()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "num_scenes": num_scenes, "seed": seed,
            "all_swaps": all_swaps, "captioning": captioning,
            "final_loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
            "heldout": {"scenes": heldout_scenes, "before": before, "after": after},
            "wall_time_s": round(time.time() - started, 1)}


@torch.no_grad()
def caption_accuracy(vision_model, decoder, pixels: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The decoder's greedy captions of pixels (N, 3, H, W) against targets (N, L; -100 not counted), the vision
    model in eval mode: the fraction of caption tokens right, and of captions right in every token."""
    vision_model.eval()
    predicted = torch.cat([decoder(vision_model(pixel_values=pixels[i:i + 256]).last_hidden_state).argmax(-1)
                           for i in range(0, len(pixels), 256)])
    vision_model.train()
    counted = targets != -100
    right = (predicted == targets) | ~counted
    return {"token_accuracy": round(float((predicted == targets)[counted].float().mean()), 3),
            "caption_accuracy": round(float(right.all(dim=1).float().mean()), 3)}


def tune_vision_captioning(vision_model, image_processor, tokenizer, steps: int, num_scenes: int = 20_000,
                           batch_size: int = 128, lr: float = 3e-4, decoder_lr: float = 1e-3, seed: int = 0,
                           log_every: int = 100, heldout_scenes: int = HELDOUT_SCENES, device: str = "cpu") -> dict:
    """Fine-tune a trained vision model in place with CapPa's captioning loss alone (`CaptionDecoder`, new and
    discarded after; no contrastive term), on `device` (random draws from a CPU generator; the model is back on the
    CPU after). Linear warm-up over a 30th of the steps, then cosine decay. Returns a report: the loss, the
    decoder's held-out captions (token and whole-caption accuracy, and the token accuracy of always answering each
    position's most common training token, what captions give without the image), wall time."""
    started = time.time()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    scenes = make_scenes(num_scenes, SPLITS["train"])
    heldout = make_scenes(heldout_scenes, SPLITS["heldout"])
    pixels, heldout_pixels = _pixels(image_processor, scenes), _pixels(image_processor, heldout).to(device)
    unique = sorted({s.caption for s in scenes + heldout})
    _, targets = _caption_ids(tokenizer, unique)
    row = {caption: i for i, caption in enumerate(unique)}
    train_targets = targets[torch.tensor([row[s.caption] for s in scenes])]
    heldout_targets = targets[torch.tensor([row[s.caption] for s in heldout])].to(device)
    majority = torch.tensor([int(column[column != -100].mode().values) if (column != -100).any() else -100
                             for column in train_targets.T])  # each position's most common training token
    counted = heldout_targets != -100
    prior = float((heldout_targets == majority.to(device))[counted].float().mean())

    vision_model.to(device).train().requires_grad_(True)  # a checkpoint may come with it frozen
    decoder = CaptionDecoder(vision_model.config.hidden_size, targets.shape[1], len(tokenizer)).to(device)
    optimizer = torch.optim.AdamW([{"params": decoder.parameters(), "lr": decoder_lr},
                                   {"params": vision_model.parameters(), "lr": lr}], weight_decay=0.01)
    schedule = warmup_cosine(optimizer, max(1, steps // 30), steps)
    losses = []
    for step in range(1, steps + 1):
        batch = torch.randint(len(scenes), (batch_size,), generator=generator)
        logits = decoder(vision_model(pixel_values=pixels[batch].to(device)).last_hidden_state)
        loss = F.cross_entropy(logits.flatten(0, 1), train_targets[batch].to(device).flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            print(json.dumps({"stage": "vision-captioning", "step": step, "of": steps,
                              "loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
                              "elapsed_s": round(time.time() - started, 1)}), flush=True)
    after = caption_accuracy(vision_model, decoder, heldout_pixels, heldout_targets)
    vision_model.cpu()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "decoder_lr": decoder_lr, "num_scenes": num_scenes,
            "seed": seed, "final_loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
            "heldout": {"scenes": heldout_scenes, **after, "token_accuracy_without_the_image": round(prior, 3)},
            "wall_time_s": round(time.time() - started, 1)}
