"""8-bit exports of the tiny checkpoint (issue 20): the UNet as QDQ graphs calibrated on its own denoising
trajectories, checked against the policy by reading the graphs with `onnx` and onnxruntime's optimizer, against
PyTorch fp32 by running them, and through the backends, the TensorRT builder's calls and the Triton repository.

The tiny checkpoint is exported once in int8 (both formats: onnx/ for TensorRT, ort/ for onnxruntime's CPU, which
an int8 export writes by default, as with --optimize cpu) and once in fp8, each calibrated on 2 images at 10 steps."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from vilex.errors import ViLexUsageError
from vilex.engines.contract import GRAPH_NAMES, TOLERANCES, ExportOptions
from vilex.engines.folder import EngineFolder
from vilex.engines.precision import KEEP_HIGH_PRECISION, QUANT_POLICY
from vilex.export.calibration import calibration_set, record_trajectories
from vilex.export.onnx_export import export_checkpoint
from vilex.export.validate import EndToEndError, QuantizedToleranceError, psnr_db

CALIBRATION_COUNT = 2
CALIBRATION_STEPS = 6  # the default is 25 (settings.DEFAULT_STEPS); fewer keeps the tests fast
NORMALIZATIONS = {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
                  "ReduceMean", "Sqrt", "Pow", "Softmax"}  # and the ops a decomposed normalization is made of


@pytest.fixture(scope="module")
def int8_export(tiny_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("engines") / "tiny-int8"
    return export_checkpoint(tiny_ckpt, out, ExportOptions(precision="int8", max_batch=2), log=lambda *_: None,
                             calibration_count=CALIBRATION_COUNT, calibration_steps=CALIBRATION_STEPS)


@pytest.fixture(scope="module")
def fp8_export(tiny_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("engines") / "tiny-fp8"
    return export_checkpoint(tiny_ckpt, out, ExportOptions(precision="fp8", max_batch=2), log=lambda *_: None,
                             calibration_count=CALIBRATION_COUNT, calibration_steps=CALIBRATION_STEPS)


@pytest.fixture(scope="module")
def fp32_unet(tiny_ckpt, tmp_path_factory) -> onnx.ModelProto:
    """The tiny UNet traced to fp32 ONNX on its own (the graph the quantizer starts from)."""
    from vilex import ViLexPipeline
    from vilex.engines.contract import ModelDims, build_contracts
    from vilex.export.onnx_export import export_graph
    from vilex.stages import stage_modules

    pipeline = ViLexPipeline.from_pretrained(tiny_ckpt)
    contract = build_contracts(ModelDims.from_pipeline(pipeline), ExportOptions(max_batch=2))["unet"]
    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_graph(stage_modules(pipeline)["unet"].eval(), contract, path)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def pipeline(tiny_ckpt):
    from vilex import ViLexPipeline

    pipeline = ViLexPipeline.from_pretrained(tiny_ckpt)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def weight_layers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv, MatMul and Gemm nodes whose second input is a weight (a layer with weights), by name."""
    weights = {t.name for t in model.graph.initializer}
    return {n.name: n for n in model.graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


# ---- the graph, read with onnx -----------------------------------------------------------------------------
def expected_int8_layers(fp32_unet: onnx.ModelProto) -> set[str]:
    """The layers an int8 UNet quantizes, decided here from the fp32 graph's layer names and demo/Diffusion's rules:
    every conv; of the linears the feed-forward ones and to_q/to_k/to_v; none of the kept layers."""
    return {name for name, node in weight_layers(fp32_unet).items()
            if not re.search(KEEP_HIGH_PRECISION, name)
            and (node.op_type == "Conv" or re.search(r"/ff/net\.\d+/|/to_[qkv]/", name))}


def quantized_layers(model: onnx.ModelProto) -> set[str]:
    """Conv/MatMul/Gemm nodes whose activation and weight both come through DequantizeLinear."""
    made_by = producers(model)
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
            and all(i in made_by and made_by[i].op_type == "DequantizeLinear" for i in n.input[:2])}


@pytest.mark.parametrize("variant", ["onnx", "ort"])
def test_int8_unet_is_qdq_where_the_policy_says_and_float_elsewhere(int8_export, fp32_unet, variant):
    unet = onnx.load(str(int8_export.graph_path("unet", variant)))
    made_by = producers(unet)
    initializers = {t.name: t for t in unet.graph.initializer}
    layers = {n.name: n for n in unet.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    expected = expected_int8_layers(fp32_unet)
    assert quantized_layers(unet) == expected and len(expected) > 10
    kept = {name for name in weight_layers(fp32_unet) if re.search(KEEP_HIGH_PRECISION, name)}
    assert {"/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/time_embedding/linear_1/Gemm"} <= kept
    assert any("/conv_shortcut/" in name for name in kept) and any("/proj_out/" in name for name in kept)
    # A kept layer reads its float weight straight from an initializer.
    for name in kept:
        weight = initializers.get(layers[name].input[1])
        assert weight is not None and weight.data_type == onnx.TensorProto.FLOAT, name

    dequantize = [n for n in unet.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequantize if initializers.get(n.input[0]) is not None
               and initializers[n.input[0]].data_type == onnx.TensorProto.INT8]
    biases = [n for n in dequantize if initializers.get(n.input[0]) is not None
              and initializers[n.input[0]].data_type == onnx.TensorProto.INT32]
    activations = [n for n in dequantize if n.input[0] not in initializers]
    zero_point_types = {initializers[n.input[2]].data_type for n in activations}
    assert all(not onnx.numpy_helper.to_array(initializers[n.input[2]]).any() for n in weights)  # symmetric
    for name in expected:  # one weight scale per output channel: Conv (out, in, kh, kw), MatMul (in, out)
        weight = made_by[layers[name].input[1]]
        channels = initializers[weight.input[0]].dims[0 if layers[name].op_type == "Conv" else 1]
        assert list(initializers[weight.input[1]].dims) == [channels], name
    outputs_quantized = [n for n in unet.graph.node if n.op_type == "QuantizeLinear"
                         and n.input[0] in made_by and made_by[n.input[0]].name in expected]
    if variant == "onnx":  # TensorRT's: int8 zero points 0, float biases, Q/DQ on layer inputs only
        assert zero_point_types == {onnx.TensorProto.INT8}
        assert all(not onnx.numpy_helper.to_array(initializers[n.input[2]]).any() for n in activations)
        assert biases == [] and outputs_quantized == []
    else:  # onnxruntime CPU's: uint8 activations, int32 biases, outputs quantized too
        assert zero_point_types == {onnx.TensorProto.UINT8}
        assert len(biases) > 10 and len(outputs_quantized) > 10

    # Normalizations, softmax and the attention's activation x activation products read no dequantized tensor.
    with_weights = weight_layers(fp32_unet)
    for node in unet.graph.node:
        if node.op_type in NORMALIZATIONS or (node.op_type == "MatMul" and node.name not in with_weights):
            assert not any(i in made_by and made_by[i].op_type == "DequantizeLinear" for i in node.input), node.name
    assert [i.name for i in unet.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*unet.graph.input, *unet.graph.output])


def test_onnxruntime_fuses_the_cpu_format_into_integer_kernels(int8_export, tmp_path):
    """What makes ort/ the CPU graph: onnxruntime's CPU optimizer turns its layers into QLinearConv/QLinearMatMul
    (integer kernels), while the TensorRT format in onnx/ (float biases, no output QuantizeLinear) gets none and
    runs its layers in float on dequantized tensors (docs/export.md has the timings)."""
    import onnxruntime as ort

    fused = {}
    for variant in ("onnx", "ort"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{variant}.onnx")
        ort.InferenceSession(str(int8_export.graph_path("unet", variant)), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{variant}.onnx")).graph.node]
        fused[variant] = sum(op in ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat") for op in ops)
        if variant == "ort":
            assert "QLinearConv" in ops
    assert fused["ort"] > 10 and fused["ort"] > 2 * fused["onnx"]


def test_int8_export_follows_the_precision_policy_for_the_other_graphs(int8_export):
    assert int8_export.precision == "int8"
    assert {g: int8_export.graph_precision(g) for g in GRAPH_NAMES} == {
        "vilex_encoder": "fp16", "text_encoder": "fp16", "unet": "int8", "vae_decoder": "fp32"}
    for graph, weight_type in (("text_encoder", onnx.TensorProto.FLOAT16), ("vae_decoder", onnx.TensorProto.FLOAT)):
        model = onnx.load(str(int8_export.graph_path(graph)))
        assert {t.data_type for t in model.graph.initializer if len(t.dims) >= 2} == {weight_type}, graph


def test_manifest_records_the_quantization(int8_export, fp32_unet):
    import onnxruntime

    records = int8_export.manifest["graphs"]["unet"]["quantization"]
    assert set(records) == {"onnx", "ort"} and int8_export.manifest["optimize"] == "cpu"  # int8's default
    assert "for TensorRT" in records["onnx"]["mode"] and "biases float" in records["onnx"]["mode"]
    assert "for onnxruntime CPU" in records["ort"]["mode"] and "uint8 activations" in records["ort"]["mode"]
    record = records["onnx"]
    assert record["tool"] == "onnxruntime.quantization" and record["version"] == onnxruntime.__version__
    assert record["precision"] == "int8" and "static, QDQ" in record["mode"] and "per output channel" in record["mode"]
    assert record["calibration"]["unet_samples"] == 2 * CALIBRATION_COUNT * CALIBRATION_STEPS
    assert record["calibration"]["source"] == "toyworld:train" and record["calibration"]["images"] == CALIBRATION_COUNT
    assert record["calibration"]["heldout_images"] == 2 and record["calibration"]["steps"] == CALIBRATION_STEPS
    assert record["calibration"]["method"] == "percentile" and "Percentile calibration" in record["mode"]  # default
    assert record["keep_high_precision"] == KEEP_HIGH_PRECISION
    # Excluded: the kept layers with weights, and the linears int8 leaves float; nothing else.
    layers = weight_layers(fp32_unet)
    assert set(record["excluded_nodes"]) == {
        name for name, node in layers.items() if re.search(KEEP_HIGH_PRECISION, name)
        or (node.op_type != "Conv" and not re.search(r"/ff/net\.\d+/|/to_[qkv]/", name))}
    assert record["quantized_nodes"] + len(record["excluded_nodes"]) == len(layers)
    # The files on disk are what the manifest says (a changed graph would rebuild a TensorRT engine: its key).
    assert int8_export.verify() == []
    json.dumps(int8_export.manifest)


# ---- against PyTorch fp32 -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["onnx", "ort"])
def test_int8_unet_is_close_to_fp32_on_fresh_trajectories_and_not_equal(int8_export, pipeline, variant):
    """Independently of the export's own validation: new images (beyond the export's calibration and held-out
    ones), their UNet inputs recorded through the PyTorch pipeline, run through the int8 graph in onnxruntime
    and the fp32 module in PyTorch. The error must be within the contract's int8 tolerance, and far above
    fp32's: the graph really is quantized."""
    import onnxruntime as ort

    from vilex.stages import stage_modules

    images = calibration_set(None, CALIBRATION_COUNT + 2, heldout=1).images[-1:]
    calls = record_trajectories(pipeline, images, CALIBRATION_COUNT + 2, steps=4, guidance=7.5, seed=11,
                                log=lambda *_: None).calls
    session = ort.InferenceSession(str(int8_export.graph_path("unet", variant)), providers=["CPUExecutionProvider"])
    unet = stage_modules(pipeline)["unet"].eval()
    errors, references = [], []
    for call in calls:
        with torch.no_grad():
            references.append(unet(**{n: torch.from_numpy(a) for n, a in call.items()}).numpy())
        errors.append(session.run(None, call)[0] - references[-1])
    rel_rms = float(np.sqrt(sum((e.astype(np.float64) ** 2).sum() for e in errors)
                            / sum((r.astype(np.float64) ** 2).sum() for r in references)))
    tolerance = TOLERANCES["unet"]["int8"]
    assert rel_rms <= tolerance.rel_rms
    assert max(float(np.abs(e).max()) for e in errors) > 10 * TOLERANCES["unet"]["fp32"].atol


def test_export_validated_the_quantized_graph_and_the_whole_export(int8_export):
    validation = int8_export.manifest["graphs"]["unet"]["validation"]
    fp32_cases = [r for r in validation["onnx"] if "case" not in r]
    assert [r["sizes"]["batch"] for r in fp32_cases] == [1, 3]  # the graph before quantization, as every fp32 graph
    for variant in ("onnx", "ort"):
        quantized = [r for r in validation[variant] if "case" in r]
        figures = quantized[0]["outputs"]["noise_pred"]
        assert len(quantized) == 1 and quantized[0]["precision"] == "int8"
        assert figures["rel_rms"] <= figures["allowed_rel_rms"] == TOLERANCES["unet"]["int8"].rel_rms
        end_to_end = int8_export.manifest["end_to_end"][variant]
        assert end_to_end["images"] == 2 and len(end_to_end["psnr_db"]) == 2
        assert end_to_end["mean_psnr_db"] >= end_to_end["allowed_mean_psnr_db"] \
            == QUANT_POLICY["int8"].end_to_end_psnr_db


@pytest.mark.parametrize("variant", ["onnx", "ort"])
def test_onnxruntime_runs_the_int8_export_like_pytorch(int8_export, pipeline, variant):
    """The export folder alone (no PyTorch weights) through onnxruntime, against PyTorch fp32 on the same images
    and seeds: within the end-to-end tolerance, and not identical (it is 8-bit). On CPU the backend takes ort/
    by itself (the export was optimized for cpu)."""
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.host import pipeline_from_engines

    assert OnnxRuntimeBackend(int8_export).variant == "ort"
    images = calibration_set(None, 1, heldout=0).images
    kwargs = dict(num_tokens=8, num_inference_steps=5, seed=3, output_type="pt")
    exported = pipeline_from_engines(int8_export, OnnxRuntimeBackend(int8_export, variant=variant))
    exported.set_progress_bar_config(disable=True)
    got = exported(images, **kwargs).images
    expected = pipeline(images, **kwargs).images
    assert QUANT_POLICY["int8"].end_to_end_psnr_db <= psnr_db(got, expected) < 60


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Each quantized activation's scale: the QuantizeLinear nodes whose input is not a weight."""
    initializers = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: float(onnx.numpy_helper.to_array(initializers[n.input[1]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers}


def test_percentile_calibration_cuts_the_ranges_minmax_takes_whole(fp32_unet, pipeline, tmp_path):
    """The same UNet calls calibrated by both methods: each activation's range is its 99.999th percentile under
    percentile, its whole range under minmax, so no percentile scale is wider than minmax's and some are
    narrower; the record names the method."""
    from vilex.export.quantize import FORMATS, quantize_unet

    calls = record_trajectories(pipeline, calibration_set(None, 1, heldout=0).images, 0, steps=4, guidance=7.5,
                                seed=0, log=lambda *_: None).calls
    onnx.save(fp32_unet, str(tmp_path / "unet.onnx"))
    scales = {}
    for method, named in (("minmax", "MinMax"), ("percentile", "Percentile")):
        record = quantize_unet(tmp_path / "unet.onnx", tmp_path / f"{method}.onnx", QUANT_POLICY["int8"],
                               FORMATS["onnx"], calls, {"method": method})
        assert f"{named} calibration" in record.mode
        scales[method] = activation_scales(onnx.load(str(tmp_path / f"{method}.onnx")))
    minmax, percentile = scales["minmax"], scales["percentile"]
    assert percentile.keys() == minmax.keys() and len(minmax) > 10
    assert all(percentile[name] <= minmax[name] * (1 + 1e-6) for name in minmax)
    assert sum(percentile[name] < 0.99 * minmax[name] for name in minmax) > len(minmax) // 4


def test_the_export_records_the_calibration_method_it_was_given(tiny_ckpt, tmp_path):
    folder = export_checkpoint(tiny_ckpt, tmp_path / "p", ExportOptions(precision="int8", max_batch=1),
                               log=lambda *_: None, calibration_count=1, calibration_steps=4,
                               calibration_method="minmax")
    for record in folder.manifest["graphs"]["unet"]["quantization"].values():
        assert record["calibration"]["method"] == "minmax" and "MinMax calibration" in record["mode"]


def test_an_export_outside_its_tolerance_fails_with_the_figures(tiny_ckpt, tmp_path, monkeypatch):
    from vilex.engines import contract as contract_module
    from vilex.engines.contract import Tolerance

    monkeypatch.setitem(contract_module.TOLERANCES["unet"], "int8", Tolerance(1.0, 0.5, rel_rms=1e-4))
    with pytest.raises(QuantizedToleranceError) as caught:
        export_checkpoint(tiny_ckpt, tmp_path / "e", ExportOptions(precision="int8", max_batch=1),
                          log=lambda *_: None, calibration_count=1, calibration_steps=4)
    message = str(caught.value)
    assert "graph 'unet' (int8) output 'noise_pred' is outside its tolerance against PyTorch fp32 (relative RMS " \
           "above 0.0001)" in message and "(allowed 0.0001)" in message and "worst call's" in message
    assert "max |diff|" in message and "onnx/unet.onnx on 8 held-out denoising calls of batch 2" in message
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))  # nothing left behind


def test_an_export_outside_its_end_to_end_tolerance_fails_with_the_figures(tiny_ckpt, tmp_path, monkeypatch):
    import dataclasses

    from vilex.engines import precision

    strict = dataclasses.replace(QUANT_POLICY["int8"], end_to_end_psnr_db=200.0)
    monkeypatch.setitem(precision.QUANT_POLICY, "int8", strict)
    with pytest.raises(EndToEndError) as caught:
        export_checkpoint(tiny_ckpt, tmp_path / "e", ExportOptions(precision="int8", max_batch=1),
                          log=lambda *_: None, calibration_count=1, calibration_steps=4)
    message = str(caught.value)
    assert "(onnx/ graphs)" in message and "allowed >= 200 dB" in message
    assert "per graph:" in message and "unet" in message and "relative RMS" in message
    assert not (tmp_path / "e").exists()


# ---- fp8 -------------------------------------------------------------------------------------------------
def test_fp8_unet_is_e4m3_qdq_at_opset_19_and_runs_in_onnxruntime(fp8_export, fp32_unet):
    assert fp8_export.manifest["opset"] == 19  # the default for fp8: float8 Q/DQ came in opset 19
    unet = onnx.load(str(fp8_export.graph_path("unet")))
    initializers = {t.name: t for t in unet.graph.initializer}
    dequantize = [n for n in unet.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and all(initializers[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in dequantize)
    # fp8 quantizes every layer with weights but the kept ones, one scale per tensor (demo/Diffusion's SD FP8 config)
    assert quantized_layers(unet) == {n for n in weight_layers(fp32_unet) if not re.search(KEEP_HIGH_PRECISION, n)}
    weight_dequantize = [n for n in dequantize if n.input[0] in initializers]
    assert weight_dequantize and all(len(initializers[n.input[1]].dims) == 0 for n in weight_dequantize)
    assert set(fp8_export.manifest["graphs"]["unet"]["files"]) == {"onnx"}
    figures = next(r for r in fp8_export.manifest["graphs"]["unet"]["validation"]["onnx"] if "case" in r)
    assert figures["outputs"]["noise_pred"]["rel_rms"] <= TOLERANCES["unet"]["fp8"].rel_rms


def test_fp8_below_opset_19_is_a_usage_error(tiny_ckpt, tmp_path):
    with pytest.raises(ViLexUsageError, match="--precision fp8 needs --opset 19 or later"):
        export_checkpoint(tiny_ckpt, tmp_path / "e", ExportOptions(precision="fp8", opset=17))


# ---- usage errors -----------------------------------------------------------------------------------------
def test_cli_usage_errors_name_the_flag(tiny_ckpt, tmp_path, capsys):
    from vilex.cli import main

    def error(*args) -> str:
        assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "e"), *args]) == 2
        return capsys.readouterr().err

    assert "--precision must be one of fp32, fp16, int8, fp8, got 'int4'" in error("--precision", "int4")
    assert "--calibration-count must be an integer in 1..1024, got 0" in error("--precision", "int8",
                                                                              "--calibration-count", "0")
    assert "--calibration-images, --calibration-count, --calibration-steps and --calibration-method are for " \
           "--precision int8 or fp8, not fp16" in error("--precision", "fp16", "--calibration-count", "4")
    assert "--calibration-method for --precision int8 must be one of percentile, minmax, got 'entropy'" \
        in error("--precision", "int8", "--calibration-method", "entropy")
    assert "--calibration-method for --precision fp8 must be one of distribution (onnxruntime's only method for " \
           "float8), got 'percentile'" in error("--precision", "fp8", "--calibration-method", "percentile")
    assert "are for --precision int8 or fp8, not fp32" in error("--calibration-method", "percentile")
    assert "--calibration-steps must be in 1..1000, got 0" in error("--precision", "int8", "--calibration-steps", "0")
    assert "--optimize gpu cannot be combined with --precision int8: on GPUs the 8-bit UNet runs through TensorRT" \
        in error("--precision", "int8", "--optimize", "gpu")
    assert "--optimize cpu cannot be combined with --precision fp8: onnxruntime has no FP8 kernels" \
        in error("--precision", "fp8", "--optimize", "cpu")
    (tmp_path / "few").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "few" / "a.png")
    (tmp_path / "few" / "b.png").write_bytes(b"not an image")
    assert "--calibration-images" in (message := error("--precision", "int8", "--calibration-images",
                                                       str(tmp_path / "few"), "--calibration-count", "2"))
    assert "holds 1 readable images" in message and "needs 4" in message
    assert not (tmp_path / "e").exists()


def test_calibration_images_from_a_folder(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (20 + i, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    chosen = calibration_set(tmp_path, 2, heldout=2)
    assert chosen.count == 2 and len(chosen.images) == 4 and chosen.source == str(tmp_path.resolve())
    assert [image.size for image in chosen.images] == [(20, 20), (21, 20), (22, 20), (23, 20)]  # sorted, first 4


# ---- TensorRT: plans and the builder's calls (CPU; the build itself needs TensorRT and a GPU) --------------------
def test_tensorrt_plans_build_the_8bit_graph_strongly_typed(int8_export, tmp_path):
    from vilex.export.tensorrt_build import build_script, plan_builds

    folder = EngineFolder.open(shutil.copytree(int8_export.root, tmp_path / "int8"))
    for fp16 in (False, True):  # --fp16 concerns fp32 graphs only; the VAE decoder stays fp32 by policy
        builds = {b.graph: b for b in plan_builds(folder, fp16=fp16, trt_version="10.8.0", compute_capability="89")}
        assert builds["unet"].engine == "tensorrt/unet.int8.trt10.8.0.sm89.plan"
        assert builds["unet"].strongly_typed and not builds["unet"].fp16_flag
        assert {g: b.precision for g, b in builds.items()} == {
            "vilex_encoder": "fp16", "text_encoder": "fp16", "unet": "int8", "vae_decoder": "fp32"}
    script = build_script(list(builds.values()))
    unet_command = script.split("# unet: int8, strongly typed")[1].split("\n\n")[0]
    assert "--stronglyTyped" in unet_command and "--int8" not in unet_command and "--fp16" not in unet_command


class FakeBuilder:
    """TensorRT's Builder as tensorrt_build.build_engine calls it, recording the network flags and builder flags."""

    def __init__(self, calls: list):
        self.calls = calls

    def create_network(self, flags):
        self.calls.append(("create_network", flags))
        return SimpleNamespace()

    def create_builder_config(self):
        calls = self.calls

        class Config:
            def set_flag(self, flag):
                calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                pass

            def add_optimization_profile(self, profile):
                pass

            def create_timing_cache(self, data):
                return b""

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return SimpleNamespace(serialize=lambda: b"cache")

        return Config()

    def create_optimization_profile(self):
        return SimpleNamespace(set_shape=lambda *args: None)

    def build_serialized_network(self, network, config):
        return b"plan"


def fake_tensorrt(calls: list):
    """The `tensorrt` names build_engine uses; the builder records what it is asked for."""

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    parser = SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    return SimpleNamespace(__version__="10.8.0", Logger=Logger, Builder=lambda logger: FakeBuilder(calls),
                           OnnxParser=lambda network, logger: parser,
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5),
                           BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8"),
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))


@pytest.mark.parametrize("capability, refused", [((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_build_engines_fp8_strongly_typed_and_refused_below_sm89(fp8_export, tmp_path, monkeypatch, capability,
                                                                  refused):
    from vilex.export.tensorrt_build import build_engines

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: capability)
    folder = EngineFolder.open(shutil.copytree(fp8_export.root, tmp_path / "fp8"))
    if refused:
        with pytest.raises(ViLexUsageError, match=r"fp8 export: TensorRT builds fp8 engines on GPUs of compute "
                                                  r"capability 8\.9 or newer .* this one is 8\.6 \(sm86\)"):
            build_engines(folder, log=lambda *_: None)
        assert calls == [] and not (folder.root / "tensorrt").exists()
        return
    builds = build_engines(folder, log=lambda *_: None)
    sm = f"{capability[0]}{capability[1]}"
    assert {b.graph: Path(b.engine).name for b in builds}["unet"] == f"unet.fp8.trt10.8.0.sm{sm}.plan"
    # Every graph of an 8-bit export is built strongly typed (bit 5 of the creation flags), with no precision flag.
    assert [c for c in calls if c[0] == "create_network"] == [("create_network", 1 << 5)] * 4
    assert not [c for c in calls if c[0] == "set_flag"]
    recorded = EngineFolder.open(folder.root).manifest["tensorrt"]["engines"][f"unet.fp8.trt10.8.0.sm{sm}.plan"]
    assert recorded["precision"] == "fp8" and recorded["strongly_typed"]


# ---- serving ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform,variant", [("python-ort", "ort"), ("onnxruntime", "onnx")])
def test_triton_repository_serves_the_variant_onnxruntime_runs_on_its_target(int8_export, tmp_path, platform, variant):
    """The CPU server (python-ort) serves the CPU format (`ort/`, integer kernels), as in-process onnxruntime on
    CPU runs it; the GPU platform the portable `onnx/`. The loop models' local UNet is the `unet` model's file."""
    from vilex.serving.repository import build_repository, read_repository

    repository = build_repository(int8_export.root, tmp_path / "repo", platform=platform, max_batch=2)
    served = onnx.load(str(repository / "unet" / "1" / "model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in served.graph.node) > 0
    expected = int8_export.graph_path("unet", variant).read_bytes()
    assert (repository / "unet" / "1" / "model.onnx").read_bytes() == expected
    for graph in ("vilex_encoder", "text_encoder", "vae_decoder"):
        assert ((repository / graph / "1" / "model.onnx").read_bytes()
                == int8_export.graph_path(graph, variant).read_bytes()), graph
    info = read_repository(repository)
    assert info["graph_variant"] == variant and info["graph_files"]["unet"] == f"{variant}/unet.onnx"
    if info["unet"] == "local":
        local = repository / "vilex_generate" / "1" / "engine" / variant / "unet.onnx"
        assert local.read_bytes() == expected


@pytest.mark.triton
@pytest.mark.slow
def test_a_real_tritonserver_serves_the_int8_export_as_in_process_onnxruntime_runs_it(int8_export, tmp_path,
                                                                                        sample_images):
    """tritonserver on the python-ort repository of the int8 export (the loop models run the `ort/` UNet
    locally): reconstructions equal in-process onnxruntime's on the same export."""
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.host import pipeline_from_engines
    from vilex.serving.client import TritonClient
    from vilex.serving.repository import build_repository
    from vilex.serving.server import Ports, TritonServer

    in_process = pipeline_from_engines(int8_export.root)
    assert isinstance(in_process.backend, OnnxRuntimeBackend) and in_process.backend.variant == "ort"
    in_process.set_progress_bar_config(disable=True)
    repository = build_repository(int8_export.root, tmp_path / "repo", platform="python-ort", max_batch=2)
    server = TritonServer(repository, ports=Ports.free(), log=tmp_path / "server.log", watchdog=False)
    server.start(timeout_s=900)
    try:
        with TritonClient(server.url("http")) as client:
            served = client.reconstruct(sample_images, num_tokens=8, steps=3, seed=5)
    finally:
        server.stop()
    expected = [np.asarray(image) for image in in_process(sample_images, num_tokens=8, num_inference_steps=3,
                                                         seed=5).images]
    for got, want in zip(served, expected):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
