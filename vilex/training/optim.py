"""The optimisation: AdamW with a learning rate per trained part, and the warmup-cosine schedule."""

from __future__ import annotations

import math

import torch


def adamw(vilex, config) -> torch.optim.AdamW:
    """AdamW over the trainable ViLex parameters: the pooler (or with --mix-adapter the mixing adapter) at
    config.pooler_lr, the vision encoder (with --train-vision) at config.vision_lr; weight decay on weight
    matrices and queries, not on biases and norms. Each group is named ("pooler", "pooler_no_decay", ...) for
    the lr_* lines of metrics.jsonl."""
    groups = []
    parts = (("pooler", config.pooler_lr), ("mix_adapter", config.pooler_lr), ("vision_model", config.vision_lr))
    for part, lr in parts:
        named = [(n, p) for n, p in vilex.named_parameters() if p.requires_grad and n.startswith(part + ".")]
        for decay in (True, False):
            params = [p for n, p in named if (p.ndim >= 2) == decay]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0,
                               "name": f"{part}{'' if decay else '_no_decay'}"})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base learning rates at optimizer step `step` (0-based): linear warmup, cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """The schedule, stepped once per optimizer step. Pass the bare optimizer: accelerate's scheduler
    wrapper would step it once per process."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, max_steps))
