"""The fp16 policy of an export: which graphs `--precision fp16` converts and what stays fp32, and why.

The export applies it (vilex.export.onnx_export), the TensorRT build reads it (which graphs get the
FP16 builder flag), and the manifest records each graph's `keep_fp32` text for whoever runs the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp16Policy:
    """How a graph is converted for `--precision fp16`. Inputs and outputs always stay fp32
    (keep_io_types), so callers and the contract do not change with the precision."""

    convert: bool
    keep_fp32: str  # what stays fp32 and why (written to the manifest)
    node_prefixes: tuple[str, ...] = ()  # nodes whose name starts with one of these stay fp32 ...
    with_ancestors: bool = False  # ... together with every node that feeds them
    op_block_list: tuple[str, ...] = ()  # extra op types kept fp32 (onnxruntime's default list always applies)


FP16_POLICY: dict[str, Fp16Policy] = {
    "vilex_encoder": Fp16Policy(True, "inputs/outputs only"),
    "text_encoder": Fp16Policy(True, "inputs/outputs only"),
    "unet": Fp16Policy(
        True,
        "the timestep path (timestep input -> sinusoidal projection -> time-embedding MLP): timesteps up to "
        "999, some fractional, times the projection's frequencies need more than fp16's 11 significant bits "
        "before sin/cos",
        node_prefixes=("/unet/time_proj/", "/unet/time_embedding/"), with_ancestors=True),
    "vae_decoder": Fp16Policy(
        False,
        "the whole graph: Stable Diffusion VAE decoders overflow fp16 in their last up-blocks (why diffusers "
        "has `force_upcast`); it runs once per image, so fp32 costs little next to the UNet's steps"),
}
