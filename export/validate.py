"""Validation of exported graphs: onnxruntime against the PyTorch stage on fresh random inputs.

Each graph is run at two points of its contract (see `validation_cases`); every output must match
in shape and lie within the contract's tolerance for the graph's precision. Failures raise typed
errors that name the graph, the output and the max difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vilex.engines.contract import GraphContract

# Seed of the validation inputs; the exporter traces with other values, so validation inputs are fresh.
VALIDATION_SEED = 1234


class ExportError(Exception):
    """An export that cannot be completed (not a usage error: the model or a tool misbehaved)."""


class ValidationError(ExportError):
    def __init__(self, graph: str, output: str, message: str):
        super().__init__(message)
        self.graph = graph
        self.output = output


class OutputShapeError(ValidationError):
    """The graph's output has a different shape than PyTorch's."""


class ToleranceError(ValidationError):
    """The graph's output differs from PyTorch's by more than the contract's tolerance."""

    def __init__(self, graph: str, output: str, max_abs_diff: float, allowed: float, case: str):
        super().__init__(graph, output, f"graph '{graph}' output '{output}' differs from PyTorch by max |diff| "
                                        f"{max_abs_diff:.3g} > allowed {allowed:.3g} ({case})")
        self.max_abs_diff = max_abs_diff
        self.allowed = allowed


def sample_inputs(contract: GraphContract, sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 inputs for the given axis sizes, drawn as the contract's `sample_distribution` says."""
    inputs = {}
    for name, shape in contract.input_shapes(sizes).items():
        distribution = contract.sample_distribution.get(name, 1.0)
        if isinstance(distribution, (tuple, list)):  # uniform(low, high)
            low, high = distribution
            inputs[name] = low + (high - low) * torch.rand(shape, generator=generator)
        else:
            inputs[name] = float(distribution) * torch.randn(shape, generator=generator)
    return inputs


def validation_cases(contract: GraphContract) -> list[dict[str, int]]:
    """Two points: batch at its min with other axes at opt, then batch 3 (or the max, if lower) with
    the spatial axes at (min, opt) so that a non-square size other than the traced one is covered."""
    first = {axis: bounds.opt for axis, bounds in contract.axes.items()}
    first["batch"] = contract.axes["batch"].min
    second = dict(first)
    second["batch"] = min(3, contract.axes["batch"].max)
    if "latent_height" in contract.axes:
        second["latent_height"] = contract.axes["latent_height"].min
    return [first, second]


def describe_case(sizes: dict[str, int]) -> str:
    return ", ".join(f"{axis} {size}" for axis, size in sizes.items())


def validate_graph(contract: GraphContract, module: torch.nn.Module, onnx_path: str | Path, precision: str,
                   seed: int = VALIDATION_SEED) -> list[dict]:
    """Run the graph in onnxruntime (CPU) and the module in PyTorch (fp32) on the same random inputs.

    Returns one record per case: {"sizes", "outputs": {name: {"max_abs_diff", "reference_abs_max", "allowed"}}}.
    Raises OutputShapeError or ToleranceError on the first output that does not match.
    """
    import onnxruntime as ort

    tolerance = contract.tolerances[precision]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    records = []
    for sizes in validation_cases(contract):
        inputs = sample_inputs(contract, sizes, generator)
        with torch.no_grad():
            expected = module(**inputs)
        expected = {contract.output_names[0]: expected} if torch.is_tensor(expected) else dict(expected)
        got = dict(zip(contract.output_names,
                       session.run(contract.output_names, {n: t.numpy() for n, t in inputs.items()})))
        case = describe_case(sizes)
        outputs = {}
        for name in contract.output_names:
            reference = expected[name].float().numpy()
            if got[name].shape != reference.shape:
                raise OutputShapeError(contract.name, name, f"graph '{contract.name}' output '{name}' has shape "
                                                            f"{got[name].shape}, PyTorch gives {reference.shape} ({case})")
            diff = np.abs(got[name].astype(np.float64) - reference)
            max_abs_diff = float(diff.max()) if np.isfinite(diff).all() else float("inf")
            reference_abs_max = float(np.abs(reference).max())
            allowed = tolerance.allowed(np.abs(reference))  # elementwise, as numpy.allclose
            if not np.all(diff <= allowed):
                worst = int(np.argmax(diff - allowed))
                raise ToleranceError(contract.name, name, max_abs_diff, float(allowed.flat[worst]),
                                     f"{precision}, {case}, atol {tolerance.atol:g}, rtol {tolerance.rtol:g}")
            outputs[name] = {"max_abs_diff": max_abs_diff, "reference_abs_max": reference_abs_max,
                             "atol": tolerance.atol, "rtol": tolerance.rtol}
        records.append({"sizes": sizes, "outputs": outputs})
    return records


# ---- 8-bit graphs ----------------------------------------------------------------------------------------
class QuantizedToleranceError(ValidationError):
    """A quantized graph is outside its 8-bit tolerance: the message has every figure, so one run says by how much."""

    def __init__(self, graph: str, output: str, figures: dict, precision: str, case: str, failed: list[str]):
        super().__init__(graph, output, (
            f"graph '{graph}' ({precision}) output '{output}' is outside its tolerance against PyTorch fp32 "
            f"({'; '.join(failed)}): relative RMS {figures['rel_rms']:.3g} (allowed {figures['allowed_rel_rms']:g}), "
            f"worst call's {figures['worst_call_rel_rms']:.3g}; max |diff| {figures['max_abs_diff']:.3g} "
            f"(reference |x| <= {figures['reference_abs_max']:.3g}), at most {figures['max_diff_over_allowed']:.3g} "
            f"of atol {figures['atol']:g} + rtol {figures['rtol']:g} * |x|; {case}"))
        self.figures = figures


class EndToEndError(ExportError):
    """The 8-bit export's reconstructions are further from the fp32 PyTorch ones than its tolerance."""


def validate_quantized_graph(contract: GraphContract, module: torch.nn.Module, onnx_path: str | Path, precision: str,
                             calls: list[dict[str, np.ndarray]]) -> dict:
    """Run an 8-bit graph in onnxruntime (CPU) and the module in PyTorch (fp32) on held-out recorded inputs.

    Random inputs, as validate_graph draws them, would lie outside the ranges the graph was calibrated on,
    which is not how it is used: the held-out inputs are the UNet's own inputs over the denoising
    trajectories of images that were not in the calibration set. Two figures must hold: every element within
    atol + rtol * |reference| (no region broken), and the RMS of the error over the RMS of the reference
    (pooled over all calls) at most the tolerance's rel_rms. Returns one record (as validate_graph's, with
    the relative figures); raises QuantizedToleranceError (with every figure) otherwise."""
    import onnxruntime as ort

    tolerance = contract.tolerances[precision]
    if tolerance.rel_rms is None:
        raise ExportError(f"graph '{contract.name}' has no relative RMS tolerance for {precision}")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = contract.output_names[0]
    error_square = reference_square = 0.0
    max_abs_diff = reference_abs_max = worst_call = over_allowed = 0.0
    case = (f"{Path(onnx_path).parent.name}/{Path(onnx_path).name} on {len(calls)} held-out denoising calls of "
            f"batch {calls[0][contract.input_names[0]].shape[0]}")
    for call in calls:
        with torch.no_grad():
            reference = module(**{n: torch.from_numpy(a) for n, a in call.items()}).float().numpy().astype(np.float64)
        got = session.run([name], call)[0].astype(np.float64)
        if got.shape != reference.shape:
            raise OutputShapeError(contract.name, name, f"graph '{contract.name}' output '{name}' has shape "
                                                        f"{got.shape}, PyTorch gives {reference.shape} ({case})")
        diff = np.abs(got - reference)
        if not np.isfinite(diff).all():
            raise ToleranceError(contract.name, name, float("inf"), tolerance.atol, f"{precision}, {case}")
        error_square += float(np.square(diff).sum())
        reference_square += float(np.square(reference).sum())
        worst_call = max(worst_call, float(np.sqrt(np.square(diff).sum() / max(np.square(reference).sum(), 1e-30))))
        max_abs_diff = max(max_abs_diff, float(diff.max()))
        reference_abs_max = max(reference_abs_max, float(np.abs(reference).max()))
        over_allowed = max(over_allowed, float((diff / tolerance.allowed(np.abs(reference))).max()))
    figures = {"max_abs_diff": max_abs_diff, "reference_abs_max": reference_abs_max,
               "rel_rms": float(np.sqrt(error_square / max(reference_square, 1e-30))), "worst_call_rel_rms": worst_call,
               "max_diff_over_allowed": over_allowed, "atol": tolerance.atol, "rtol": tolerance.rtol,
               "allowed_rel_rms": tolerance.rel_rms}
    failed = ([f"relative RMS above {tolerance.rel_rms:g}"] if figures["rel_rms"] > tolerance.rel_rms else []) + \
        (["an element beyond atol + rtol * |x|"] if over_allowed > 1 else [])
    if failed:
        raise QuantizedToleranceError(contract.name, name, figures, precision, case, failed)
    sizes = contract.axis_sizes({n: a.shape for n, a in calls[0].items()}, enforce_range=False)
    return {"precision": precision, "case": case, "sizes": sizes, "outputs": {name: figures}}


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [0, 1] (inf when equal)."""
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def validate_end_to_end(pipeline, folder, variant: str, images: list, reference, first_index: int, steps: int,
                        guidance: float, seed: int, precision: str, figures: str = "") -> dict:
    """Reconstruct `images` through onnxruntime (CPU) over the `variant` graphs of the export in `folder`, with
    the seeds and token counts the fp32 PyTorch `reference` reconstructions had (calibration.record_trajectories),
    and compare the images: their mean PSNR must reach the precision's end_to_end_psnr_db. Returns the manifest's
    record; raises EndToEndError with the per-image and per-graph figures otherwise."""
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.precision import QUANT_POLICY

    from .calibration import record_trajectories

    allowed = QUANT_POLICY[precision].end_to_end_psnr_db
    torch_backend = pipeline.backend
    pipeline.set_backend(OnnxRuntimeBackend(folder, providers=["cpu"], variant=variant))
    try:
        exported = record_trajectories(pipeline, images, first_index, steps, guidance, seed, log=lambda *_: None)
    finally:
        pipeline.set_backend(torch_backend)
    psnr = [psnr_db(a, b) for a, b in zip(exported.images, reference.images)]
    record = {"images": len(images), "steps": steps, "guidance": guidance, "token_counts": reference.token_counts,
              "psnr_db": [round(p, 2) for p in psnr], "mean_psnr_db": float(np.mean(psnr)),
              "allowed_mean_psnr_db": allowed,
              "what": "PSNR between the export's reconstructions (onnxruntime, CPU) and the fp32 PyTorch ones, "
                      "same images, seeds and token counts"}
    if np.mean(psnr) < allowed:
        raise EndToEndError(
            f"the {precision} export's reconstructions ({variant}/ graphs) of {len(images)} held-out images are too "
            f"far from the fp32 PyTorch ones: mean PSNR {np.mean(psnr):.1f} dB "
            f"({', '.join(f'{p:.1f}' for p in psnr)}), allowed >= {allowed:g} dB; per graph: {figures}")
    return record
