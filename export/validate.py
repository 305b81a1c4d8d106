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
