"""The export contract: one declaration per exported graph, read by everything downstream.

    vilex_encoder  pixel_values (batch, 3, S, S)                         -> vilex_tokens (batch, N, D)
    text_encoder   inputs_embeds (batch, T, D)                           -> last_hidden_state (batch, T, D)
    unet           sample (batch, C, latent_height, latent_width),
                   timestep (batch,), encoder_hidden_states (batch, T, D) -> noise_pred (batch, C, latent_height, latent_width)
    vae_decoder    latents (batch, C, latent_height, latent_width)       -> image (batch, 3, height, width)

A `GraphContract` holds the input and output names, dtypes and shapes (an int is a fixed size, a string
names a dynamic axis), the bounds of every dynamic axis (min/opt/max, and a multiple the size must
respect), the opset and the validation tolerance per precision. The exporter (dynamic axes, sample
inputs, validation), the TensorRT builder (optimization profiles, trtexec shapes), the runtime
backends (input checks, output allocation), the Triton configs and the tests all read it; it is saved
in each export's manifest.json and read back from there with `GraphContract.from_dict`.

The bounds come from the checkpoint (`ModelDims`) and the export options (`ExportOptions`):
`max_batch` counts images per call. The UNet runs the guidance branches stacked along its batch
(uncond / ViLex-only / ViLex+text, see `ViLexPipeline.generate`), so its batch goes up to 3x that and
its opt is 2x (classifier-free guidance, the default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vilex.errors import ViLexUsageError

from .precision import QUANT_POLICY

# Opset 17 is the first with LayerNormalization as one op: TensorRT (8.6+) parses it into its own
# normalization layer, which keeps fp32 accumulation under FP16 instead of a fragile ReduceMean/Pow/Sqrt
# chain, and onnxruntime's transformer optimizer fuses it. It is supported by the TorchScript exporter,
# onnxruntime >= 1.13 and TensorRT 8.6-11, and it is what we have checked here (../shared/FACTS.md).
DEFAULT_OPSET = 17
MIN_OPSET = 17  # below 17 LayerNorm is decomposed (see above)
MAX_OPSET = 20  # the TorchScript exporter's newest (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)

# fp16: the graphs FP16_POLICY converts; int8 / fp8: the UNet quantized (QUANT_POLICY), the others as fp16.
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
GRAPH_NAMES = ("vilex_encoder", "text_encoder", "unet", "vae_decoder")

# Branches the UNet batch stacks at most: [uncond, ViLex-only, ViLex+text] (generate()'s order).
MAX_GUIDANCE_BRANCHES = 3
DEFAULT_GUIDANCE_BRANCHES = 2  # classifier-free guidance without a prompt


@dataclass(frozen=True)
class Tolerance:
    """Validation passes where |onnx - torch| <= atol + rtol * |torch| everywhere (numpy.allclose) and, for an
    8-bit graph, where the error's RMS over the reference's RMS is at most rel_rms (export/validate.py)."""

    atol: float
    rtol: float
    rel_rms: float | None = None

    def allowed(self, reference_abs_max: float) -> float:
        return self.atol + self.rtol * reference_abs_max


# Tolerances per graph and precision, against the fp32 PyTorch module on random inputs.
# fp32: onnxruntime and PyTorch differ only in kernel summation order. Measured max |diff| (tiny / small /
# sd15-shaped): tokens 3e-8 / 1e-7 / 8e-8 (|x| <= 0.08), text 1e-6 / 3e-6 / 5e-6 (|x| <= 4.4), unet
# 2e-6 / 2e-6 / 2e-6 (|x| <= 1.5), vae 2e-6 / 1e-5 / 6e-5 (|x| <= 3, growing with the image size: 512 px
# for sd15). The VAE's bound, 3e-4, is still 1/25 of an 8-bit level of its [-1, 1] output (7.8e-3).
# fp16: 11 significant bits (relative step 5e-4) compounded over dozens of layers; measured on small:
# tokens 8e-5, text 5e-3, unet 1.5e-2 (|x| <= 1.4), about half the bounds. The VAE decoder stays fp32
# in an fp16 export (onnx_export.FP16_POLICY), so its fp16 tolerance is fp32's.
# int8 / fp8 (the UNet only): on held-out denoising inputs, not random ones (export/validate.py
# validate_quantized_graph); rel_rms bounds the error's RMS over the reference's, pooled over the calls, and
# atol/rtol only catch a broken region. Measured relative RMS (tiny / small / toy, onnx/ and ort/ formats):
# int8 0.044-0.052 / 0.046-0.049 / 0.031-0.042, max |diff| up to 0.41 (toy, |x| <= 6); fp8 (toy) 0.114, max
# |diff| 1.24: E4M3 keeps 3 significant bits, and onnxruntime scales it from each tensor's spread, not its max.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "vilex_encoder": {"fp32": Tolerance(1e-5, 1e-3), "fp16": Tolerance(2e-3, 2e-2)},
    "text_encoder": {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(3e-2, 3e-2)},
    "unet": {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(3e-2, 3e-2),
             "int8": Tolerance(1.0, 0.5, rel_rms=0.1), "fp8": Tolerance(2.0, 0.5, rel_rms=0.2)},
    "vae_decoder": {"fp32": Tolerance(3e-4, 1e-3), "fp16": Tolerance(3e-4, 1e-3)},
}


@dataclass(frozen=True)
class AxisBounds:
    """Sizes a dynamic axis takes: min <= opt <= max, each a multiple of `multiple`."""

    min: int
    opt: int
    max: int
    multiple: int = 1

    def check(self, what: str, value: int, enforce_range: bool = True) -> None:
        if value % self.multiple or (enforce_range and not self.min <= value <= self.max):
            allowed = f"{self.min}..{self.max}" if enforce_range else "any size"
            step = f", a multiple of {self.multiple}" if self.multiple > 1 else ""
            raise ViLexUsageError(f"{what} must be {allowed}{step}, got {value}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: "float32"
    shape: tuple  # int: fixed size; str: a named dynamic axis (see GraphContract.axes)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, AxisBounds]  # every dynamic axis that appears in an input
    derived_axes: dict[str, tuple[str, int]] = field(default_factory=dict)  # output axis = input axis * factor
    opset: int = DEFAULT_OPSET
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    # How validation draws random inputs: input name -> standard deviation, or (low, high) for uniform.
    sample_distribution: dict[str, object] = field(default_factory=dict)

    # ---- shapes ---------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`dynamic_axes` for torch.onnx.export."""
        return {spec.name: spec.dynamic_axes for spec in (*self.inputs, *self.outputs) if spec.dynamic_axes}

    def input_shapes(self, sizes: dict[str, int] | str) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for axis sizes (a dict) or for the profile point "min", "opt" or "max"."""
        if isinstance(sizes, str):
            sizes = {axis: getattr(bounds, sizes) for axis, bounds in self.axes.items()}
        return {spec.name: tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape) for spec in self.inputs}

    def axis_sizes(self, shapes: dict[str, tuple[int, ...]], enforce_range: bool = True) -> dict[str, int]:
        """Check input shapes against the contract and return the size of every axis.

        Raises ViLexUsageError naming the graph, input and axis: a missing or extra input, a wrong
        rank, a fixed size that differs, an axis whose size differs between inputs, or a size outside
        the bounds (outside min..max only when enforce_range) or not on its multiple.
        """
        missing = set(self.input_names) - set(shapes)
        extra = set(shapes) - set(self.input_names)
        if missing or extra:
            raise ViLexUsageError(f"graph '{self.name}' takes inputs {self.input_names}; "
                                  f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        sizes: dict[str, int] = {}
        for spec in self.inputs:
            shape = tuple(shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise ViLexUsageError(f"graph '{self.name}' input '{spec.name}' must have shape "
                                      f"{self._describe(spec)}, got {shape}")
            for i, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise ViLexUsageError(f"graph '{self.name}' input '{spec.name}' must have shape "
                                              f"{self._describe(spec)}, got {shape} (dimension {i})")
                elif sizes.setdefault(want, got) != got:
                    raise ViLexUsageError(f"graph '{self.name}': axis '{want}' is {sizes[want]} in one input "
                                          f"and {got} in '{spec.name}'; all inputs must agree")
        for axis, size in sizes.items():
            self.axes[axis].check(f"graph '{self.name}' axis '{axis}'", size, enforce_range)
        return sizes

    def output_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        sizes = dict(sizes)
        for axis, (source, factor) in self.derived_axes.items():
            sizes[axis] = sizes[source] * factor
        return {spec.name: tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape) for spec in self.outputs}

    def _describe(self, spec: TensorSpec) -> str:
        return "(" + ", ".join(str(d) for d in spec.shape) + ")"

    # ---- serialization (manifest.json) ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.outputs],
            "axes": {axis: asdict(bounds) for axis, bounds in self.axes.items()},
            "derived_axes": {axis: list(rule) for axis, rule in self.derived_axes.items()},
            "opset": self.opset,
            "tolerances": {precision: asdict(tol) for precision, tol in self.tolerances.items()},
            "sample_distribution": {name: list(d) if isinstance(d, (tuple, list)) else d
                                    for name, d in self.sample_distribution.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GraphContract":
        def specs(items):
            return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

        return cls(
            name=data["name"], inputs=specs(data["inputs"]), outputs=specs(data["outputs"]),
            axes={axis: AxisBounds(**bounds) for axis, bounds in data["axes"].items()},
            derived_axes={axis: (rule[0], int(rule[1])) for axis, rule in data.get("derived_axes", {}).items()},
            opset=int(data["opset"]),
            tolerances={p: Tolerance(**t) for p, t in data.get("tolerances", {}).items()},
            sample_distribution={n: tuple(d) if isinstance(d, list) else d
                                 for n, d in data.get("sample_distribution", {}).items()},
        )


# ---- what the contracts are derived from ---------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The sizes of a checkpoint that the graphs' shapes depend on."""

    image_size: tuple[int, int]  # the vision encoder's input (H, W) after preprocessing
    num_queries: int  # N, ViLex tokens produced
    hidden_size: int  # D, the text encoder's width (= token-embedding width)
    text_length: int  # T, the text encoder's positions (77 for CLIP)
    unet_in_channels: int
    unet_out_channels: int
    vae_latent_channels: int
    vae_scale_factor: int  # pixels per latent
    latent_multiple: int  # the UNet's down-sampling: latent sizes must be multiples of this
    default_size: int  # the checkpoint's native image side in pixels
    num_train_timesteps: int
    word_embedding_std: float

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @classmethod
    def from_pipeline(cls, pipeline) -> "ModelDims":
        import PIL.Image

        pixel_values = pipeline.preprocess([PIL.Image.new("RGB", (64, 64))])  # (1, 3, H, W)
        return cls(
            image_size=(int(pixel_values.shape[2]), int(pixel_values.shape[3])),
            num_queries=int(pipeline.num_queries),
            hidden_size=int(pipeline.text_encoder.config.hidden_size),
            text_length=int(pipeline.prompt_builder.max_length),
            unet_in_channels=int(pipeline.unet.config.in_channels),
            unet_out_channels=int(pipeline.unet.config.out_channels),
            vae_latent_channels=int(pipeline.vae.config.latent_channels),
            vae_scale_factor=int(pipeline.vae_scale_factor),
            latent_multiple=2 ** (len(pipeline.unet.config.block_out_channels) - 1),
            default_size=int(pipeline.default_size),
            num_train_timesteps=int(pipeline.scheduler.config.num_train_timesteps),
            word_embedding_std=float(pipeline.text_encoder.get_input_embeddings().weight.detach().float().std()),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDims":
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)


@dataclass(frozen=True)
class ExportOptions:
    """What the user chose at export (or build) time. Image sides are in pixels; None = from the checkpoint.

    height/width: the optimal (most common) image size; min_size/max_size bound both sides
    (default: half and twice the checkpoint's native size, as NVIDIA's diffusion demo does).
    max_batch: images per call; opt_batch: the batch TensorRT tunes for.
    """

    precision: str = "fp32"
    opset: int | None = None  # None: DEFAULT_OPSET, or the first opset the precision's Q/DQ types need (fp8: 19)
    max_batch: int = 4
    opt_batch: int = 1
    height: int | None = None
    width: int | None = None
    min_size: int | None = None
    max_size: int | None = None

    def resolved(self, dims: ModelDims) -> "ExportOptions":
        """Fill the image sizes from the checkpoint and check everything; ViLexUsageError names the flag."""
        m = dims.pixel_multiple
        if self.precision not in PRECISIONS:
            raise ViLexUsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        quantization = QUANT_POLICY.get(self.precision)
        opset = self.opset if self.opset is not None else max(DEFAULT_OPSET, quantization.min_opset if quantization else 0)
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ViLexUsageError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
        if quantization and opset < quantization.min_opset:
            raise ViLexUsageError(f"--precision {self.precision} needs --opset {quantization.min_opset} or later "
                                  f"(QuantizeLinear/DequantizeLinear take {self.precision} from opset "
                                  f"{quantization.min_opset}), got {opset}")
        if not 1 <= self.max_batch <= 256:
            raise ViLexUsageError(f"--max-batch must be in 1..256, got {self.max_batch}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ViLexUsageError(f"--opt-batch must be in 1..{self.max_batch} (--max-batch), got {self.opt_batch}")
        height = self.height or dims.default_size
        width = self.width or dims.default_size
        min_size = self.min_size or max(m, (min(height, width) // 2) // m * m)
        max_size = self.max_size or 2 * max(height, width)
        for flag, value in (("--height", height), ("--width", width), ("--min-size", min_size), ("--max-size", max_size)):
            if value <= 0 or value % m or value > 4096:
                raise ViLexUsageError(f"{flag} must be a positive multiple of {m} up to 4096 (the VAE factor "
                                      f"{dims.vae_scale_factor} x the UNet's down-sampling {dims.latent_multiple}), got {value}")
        if not min_size <= min(height, width) or not max(height, width) <= max_size:
            raise ViLexUsageError(f"--height/--width ({height}x{width}) must lie within --min-size..--max-size "
                                  f"({min_size}..{max_size})")
        return ExportOptions(self.precision, opset, self.max_batch, self.opt_batch, height, width, min_size, max_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExportOptions":
        return cls(**data)


def build_contracts(dims: ModelDims, options: ExportOptions) -> dict[str, GraphContract]:
    """The four graphs' contracts for a checkpoint's sizes and (resolved) export options."""
    options = options.resolved(dims)
    f, lm = dims.vae_scale_factor, dims.latent_multiple
    B, opt_B = options.max_batch, options.opt_batch
    N, D, T = dims.num_queries, dims.hidden_size, dims.text_length
    batch = AxisBounds(1, opt_B, B)
    # The UNet's batch stacks up to three guidance branches; opt is classifier-free guidance's two.
    unet_batch = AxisBounds(1, DEFAULT_GUIDANCE_BRANCHES * opt_B, MAX_GUIDANCE_BRANCHES * B)
    latent_height = AxisBounds(options.min_size // f, options.height // f, options.max_size // f, lm)
    latent_width = AxisBounds(options.min_size // f, options.width // f, options.max_size // f, lm)
    S_h, S_w = dims.image_size
    C_unet, C_vae = dims.unet_in_channels, dims.vae_latent_channels
    f32 = "float32"

    def graph(name, inputs, outputs, axes, derived=None, distribution=None) -> GraphContract:
        return GraphContract(name=name, inputs=tuple(TensorSpec(*i) for i in inputs),
                             outputs=tuple(TensorSpec(*o) for o in outputs), axes=axes,
                             derived_axes=derived or {}, opset=options.opset, tolerances=TOLERANCES[name],
                             sample_distribution=distribution or {})

    return {
        "vilex_encoder": graph(
            "vilex_encoder",
            [("pixel_values", f32, ("batch", 3, S_h, S_w))],
            [("vilex_tokens", f32, ("batch", N, D))],
            {"batch": batch},
            distribution={"pixel_values": 1.0}),
        "text_encoder": graph(
            "text_encoder",
            [("inputs_embeds", f32, ("batch", T, D))],
            [("last_hidden_state", f32, ("batch", T, D))],
            {"batch": batch},
            # Real inputs are word embeddings and ViLex tokens, both at the table's scale.
            distribution={"inputs_embeds": dims.word_embedding_std}),
        "unet": graph(
            "unet",
            [("sample", f32, ("batch", C_unet, "latent_height", "latent_width")),
             ("timestep", f32, ("batch",)),
             ("encoder_hidden_states", f32, ("batch", T, D))],
            [("noise_pred", f32, ("batch", dims.unet_out_channels, "latent_height", "latent_width"))],
            {"batch": unet_batch, "latent_height": latent_height, "latent_width": latent_width},
            distribution={"sample": 1.0, "timestep": (0.0, float(dims.num_train_timesteps - 1)),
                          "encoder_hidden_states": 1.0}),
        "vae_decoder": graph(
            "vae_decoder",
            [("latents", f32, ("batch", C_vae, "latent_height", "latent_width"))],
            [("image", f32, ("batch", 3, "height", "width"))],
            {"batch": batch, "latent_height": latent_height, "latent_width": latent_width},
            derived={"height": ("latent_height", f), "width": ("latent_width", f)},
            # The loop hands over scheduler latents (unit variance); the stage divides by the VAE's scale.
            distribution={"latents": 1.0}),
    }
