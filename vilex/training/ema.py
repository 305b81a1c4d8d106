"""EMA of the trainable weights (--ema): diffusers' EMAModel, swapped in for previews and the final
pipeline, and saved in checkpoints as safetensors by parameter name (not as a pickle)."""

from __future__ import annotations

import contextlib

import torch


def make_ema(trainable: list[torch.nn.Parameter], decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(trainable, decay=decay)


@contextlib.contextmanager
def ema_weights(ema, trainable: list[torch.nn.Parameter]):
    """Swap the EMA weights into `trainable` for evaluation, then back; nothing when ema is None."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


def ema_to_files(ema, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(shadow weights by parameter name, the JSON-able rest: decay, step counter, ...)."""
    state = ema.state_dict()
    tensors = dict(zip(names, state.pop("shadow_params")))
    state.pop("collected_params", None)  # some diffusers versions add it: a stored copy, not the average
    return tensors, state


def ema_from_files(ema, tensors: dict[str, torch.Tensor], meta: dict, names: list[str], device) -> None:
    state = dict(meta)
    state["shadow_params"] = [tensors[name] for name in names]
    ema.load_state_dict(state)
    ema.to(device)
