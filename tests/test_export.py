"""ONNX export of the tiny checkpoint: contracts, checker, validation against PyTorch, manifest,
re-export, the onnxruntime backend and end-to-end parity with PyTorch.

The tiny checkpoint is exported once per session in fp32 and once in fp16 with onnxruntime-optimized
graphs; tests that change a folder work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vilex.errors import ViLexUsageError
from vilex.engines.contract import (
    GRAPH_NAMES, MAX_GUIDANCE_BRANCHES, ExportOptions, GraphContract, ModelDims, build_contracts,
)
from vilex.engines.folder import MANIFEST, EngineFolder, checkpoint_sha256
from vilex.engines.precision import FP16_POLICY
from vilex.export.graphs import fp32_nodes
from vilex.export.onnx_export import export_checkpoint, export_graph
from vilex.export.validate import OutputShapeError, ToleranceError, validate_graph

STEPS = 3


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def export_ckpt(tiny_ckpt) -> Path:
    """The session's tiny checkpoint (conftest.py); tests that change a checkpoint copy it first."""
    return tiny_ckpt


@pytest.fixture(scope="session")
def fp32_export(export_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("engines") / "tiny"
    return export_checkpoint(export_ckpt, out, ExportOptions(), log=lambda *_: None)


@pytest.fixture(scope="session")
def fp16_export(export_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("engines") / "tiny-fp16"
    return export_checkpoint(export_ckpt, out, ExportOptions(precision="fp16"), optimize="cpu", log=lambda *_: None)


@pytest.fixture(scope="session")
def reference_pipeline(export_ckpt):
    from vilex import ViLexPipeline

    pipeline = ViLexPipeline.from_pretrained(export_ckpt)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def tiny_dims(reference_pipeline) -> ModelDims:
    return ModelDims.from_pipeline(reference_pipeline)


def copy_export(folder: EngineFolder, dest: Path) -> Path:
    shutil.copytree(folder.root, dest)
    return dest


# ---- the contract ----------------------------------------------------------------------------------------
def test_contract_bounds_follow_checkpoint_and_options(tiny_dims):
    # tiny: 64 px images, VAE factor 2, UNet with two blocks (latent multiple 2), 75 tokens of width 32
    contracts = build_contracts(tiny_dims, ExportOptions(max_batch=4))
    assert list(contracts) == list(GRAPH_NAMES)
    unet = contracts["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.axes["batch"].max == MAX_GUIDANCE_BRANCHES * 4 and unet.axes["batch"].opt == 2
    assert (unet.axes["latent_height"].min, unet.axes["latent_height"].opt, unet.axes["latent_height"].max) == (16, 32, 64)
    assert unet.axes["latent_height"].multiple == 2
    assert unet.input_shapes("max") == {"sample": (12, 4, 64, 64), "timestep": (12,),
                                        "encoder_hidden_states": (12, 77, 32)}
    assert contracts["vilex_encoder"].input_shapes("opt") == {"pixel_values": (1, 3, 32, 32)}
    assert contracts["vilex_encoder"].outputs[0].shape == ("batch", 75, 32)
    vae = contracts["vae_decoder"]
    assert vae.output_shapes({"batch": 3, "latent_height": 16, "latent_width": 24}) == {"image": (3, 3, 32, 48)}
    assert vae.dynamic_axes() == {"latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
                                  "image": {0: "batch", 2: "height", 3: "width"}}
    for contract in contracts.values():
        assert GraphContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract


def test_contract_checks_inputs_by_name(tiny_dims):
    unet = build_contracts(tiny_dims, ExportOptions())["unet"]
    good = {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    assert unet.axis_sizes(good) == {"batch": 2, "latent_height": 32, "latent_width": 32}
    with pytest.raises(ViLexUsageError, match="input 'encoder_hidden_states' must have shape"):
        unet.axis_sizes({**good, "encoder_hidden_states": (2, 77, 16)})
    with pytest.raises(ViLexUsageError, match="axis 'batch' is 2 in one input and 3 in 'timestep'"):
        unet.axis_sizes({**good, "timestep": (3,)})
    with pytest.raises(ViLexUsageError, match="axis 'latent_width' must be .*a multiple of 2, got 33"):
        unet.axis_sizes({**good, "sample": (2, 4, 32, 33)}, enforce_range=False)
    with pytest.raises(ViLexUsageError, match=r"axis 'batch' must be 1\.\.12, got 13"):
        unet.axis_sizes({"sample": (13, 4, 32, 32), "timestep": (13,), "encoder_hidden_states": (13, 77, 32)})
    with pytest.raises(ViLexUsageError, match="missing \\['timestep'\\]"):
        unet.axis_sizes({"sample": (2, 4, 32, 32), "encoder_hidden_states": (2, 77, 32)})


@pytest.mark.parametrize("options, message", [
    (ExportOptions(height=30), "--height must be a positive multiple of 4"),
    (ExportOptions(precision="int4"), "--precision must be one of fp32, fp16, int8, fp8, got 'int4'"),
    (ExportOptions(opset=13), "--opset must be in 17..20"),
    (ExportOptions(max_batch=0), "--max-batch must be in 1..256"),
    (ExportOptions(height=256, max_size=128), "must lie within --min-size..--max-size"),
])
def test_export_options_errors_name_the_flag(tiny_dims, options, message):
    with pytest.raises(ViLexUsageError, match=message):
        options.resolved(tiny_dims)


# ---- export and validation -----------------------------------------------------------------------------
def test_every_graph_exports_passes_checker_and_matches_pytorch_at_batch_1_and_3(fp32_export, reference_pipeline):
    from vilex.stages import stage_modules

    modules = stage_modules(reference_pipeline)
    assert fp32_export.graph_names == list(GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        path = fp32_export.graph_path(graph)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        contract = fp32_export.contract(graph)
        assert [i.name for i in model.graph.input] == contract.input_names
        assert [o.name for o in model.graph.output] == contract.output_names
        assert model.opset_import[0].version == 17
        # The export's own validation, and again here on other random inputs (seed 99).
        for records in (fp32_export.manifest["graphs"][graph]["validation"]["onnx"],
                        validate_graph(contract, modules[graph].eval(), path, "fp32", seed=99)):
            assert [r["sizes"]["batch"] for r in records] == [1, 3]
            tolerance = contract.tolerances["fp32"]
            for record in records:
                for figures in record["outputs"].values():
                    assert figures["max_abs_diff"] <= tolerance.allowed(figures["reference_abs_max"])


def test_validation_failure_names_graph_output_and_difference(fp32_export, reference_pipeline):
    from vilex.stages import stage_modules

    contract = fp32_export.contract("text_encoder")
    module = stage_modules(reference_pipeline)["text_encoder"].eval()

    class Shifted(torch.nn.Module):  # PyTorch "reference" off by 0.01: the graph no longer matches it
        def forward(self, inputs_embeds):
            return module(inputs_embeds) + 0.01

    with pytest.raises(ToleranceError, match=r"graph 'text_encoder' output 'last_hidden_state' differs from "
                                             r"PyTorch by max \|diff\| 0\.01") as caught:
        validate_graph(contract, Shifted(), fp32_export.graph_path("text_encoder"), "fp32")
    assert caught.value.graph == "text_encoder" and caught.value.output == "last_hidden_state"
    assert caught.value.max_abs_diff == pytest.approx(0.01, rel=1e-3)

    class Truncated(torch.nn.Module):
        def forward(self, inputs_embeds):
            return module(inputs_embeds)[:, :10]

    with pytest.raises(OutputShapeError, match="output 'last_hidden_state' has shape"):
        validate_graph(contract, Truncated(), fp32_export.graph_path("text_encoder"), "fp32")


def test_large_graphs_keep_weights_in_one_external_data_file(fp32_export, reference_pipeline, tmp_path):
    from vilex.stages import stage_modules

    contract = fp32_export.contract("text_encoder")
    module = stage_modules(reference_pipeline)["text_encoder"].eval()
    path = tmp_path / "text_encoder.onnx"
    files = export_graph(module, contract, path, external_data_threshold=0)  # as if above 2 GB
    assert files == [path, tmp_path / "text_encoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert path.stat().st_size < 50_000 < files[1].stat().st_size  # structure here, weights there
    records = validate_graph(contract, module, path, "fp32")
    assert all(r["outputs"]["last_hidden_state"]["max_abs_diff"] < 1e-4 for r in records)


def test_fp16_export_keeps_io_and_fragile_parts_fp32(fp16_export, reference_pipeline):
    from vilex.stages import stage_modules

    modules = stage_modules(reference_pipeline)
    assert fp16_export.precision == "fp16"
    precisions = {g: fp16_export.graph_precision(g) for g in GRAPH_NAMES}
    assert precisions == {"vilex_encoder": "fp16", "text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for graph in GRAPH_NAMES:
        for variant in ("onnx", "ort"):
            model = onnx.load(str(fp16_export.graph_path(graph, variant)))
            io = list(model.graph.input) + list(model.graph.output)
            assert all(v.type.tensor_type.elem_type == float32 for v in io), (graph, variant)
            weights = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
            if graph == "vae_decoder":
                assert set(weights.values()) == {float32}
            else:  # fp16 weights, except (UNet only) those of the timestep path
                fp32_users = {n.name for n in model.graph.node for i in n.input if weights.get(i) == float32}
                assert float16 in weights.values(), (graph, variant)
                assert all("/time_proj/" in n or "/time_embedding/" in n for n in fp32_users), (graph, variant, fp32_users)
                assert bool(fp32_users) == (graph == "unet"), (graph, variant)
            records = validate_graph(fp16_export.contract(graph), modules[graph].eval(),
                                     fp16_export.graph_path(graph, variant), precisions[graph], seed=7)
            assert [r["sizes"]["batch"] for r in records] == [1, 3]
    # The UNet's timestep path stays fp32: its Gemms have fp32 weights, the other Gemms fp16.
    unet = onnx.load(str(fp16_export.graph_path("unet")))
    initializer_types = {t.name: t.data_type for t in unet.graph.initializer}
    gemms = {n.name: initializer_types.get(n.input[1]) for n in unet.graph.node if n.op_type == "Gemm"}
    assert gemms["/unet/time_embedding/linear_1/Gemm"] == float32
    assert gemms["/unet/down_blocks.0/resnets.0/time_emb_proj/Gemm"] == float16


def test_fp32_nodes_include_the_timestep_path_ancestors(fp32_export):
    unet = onnx.load(str(fp32_export.graph_path("unet")))
    kept = fp32_nodes(unet, FP16_POLICY["unet"])
    assert "/unet/time_proj/Sin" in kept and "/unet/time_embedding/linear_2/Gemm" in kept
    assert not any(name.startswith("/unet/down_blocks") for name in kept)
    producers = {o: n for n in unet.graph.node for o in n.output}
    sin = next(n for n in unet.graph.node if n.name == "/unet/time_proj/Sin")
    parent = producers[sin.input[0]]
    assert parent.name in kept  # ancestors outside the prefixes are kept too


def test_optimized_graphs_are_fused_and_used_by_the_backend(fp16_export):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend

    fused = fp16_export.manifest["graphs"]["unet"]["fused_operators"]
    assert fused.get("MultiHeadAttention", 0) + fused.get("Attention", 0) > 0
    assert OnnxRuntimeBackend(fp16_export).variant == "ort"  # exported --optimize cpu, running on CPU
    assert OnnxRuntimeBackend(fp16_export, variant="onnx").variant == "onnx"


# ---- the manifest and the folder -----------------------------------------------------------------------
def test_manifest_describes_the_files_truly(fp32_export, export_ckpt, tiny_dims):
    import hashlib

    manifest = fp32_export.manifest
    # Every file under the folder, hashed here (not by the library that wrote the manifest), and nothing else.
    on_disk = {path.relative_to(fp32_export.root).as_posix(): {"bytes": path.stat().st_size,
                                                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
               for path in fp32_export.root.rglob("*") if path.is_file() and path.name != MANIFEST}
    assert manifest["files"] == on_disk
    assert fp32_export.verify() == []
    for graph in GRAPH_NAMES:
        assert manifest["graphs"][graph]["files"]["onnx"] in on_disk
        recorded = manifest["graphs"][graph]["contract"]
        assert recorded == build_contracts(tiny_dims, ExportOptions())[graph].to_dict()
        # The recorded contract is what the ONNX file itself declares for its inputs: names, element types,
        # fixed sizes, and a named dynamic axis exactly where the contract has one; outputs: names and types
        # (their sizes: test_onnx_outputs_declare_the_contracts_fixed_sizes).
        model = onnx.load(str(fp32_export.root / manifest["graphs"][graph]["files"]["onnx"]), load_external_data=False)
        assert onnx_signature(model.graph.input) == [(s["name"], s["dtype"], s["shape"]) for s in recorded["inputs"]]
        assert [(name, dtype, len(shape)) for name, dtype, shape in onnx_signature(model.graph.output)] == \
            [(s["name"], s["dtype"], len(s["shape"])) for s in recorded["outputs"]]
    assert manifest["source"]["sha256"] == checkpoint_sha256(export_ckpt)
    assert manifest["precision"] == "fp32" and manifest["opset"] == 17
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert "host/text_encoder/token_embedding.safetensors" in on_disk
    assert not any(name.endswith(".safetensors") and "token_embedding" not in name for name in on_disk)
    umask = os.umask(0)
    os.umask(umask)
    assert fp32_export.root.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: servers can read it
    # nor safetensors' 0600 for the host's embedding table: every file as open() makes one
    assert {path.stat().st_mode & 0o777 for path in fp32_export.root.rglob("*") if path.is_file()} == {0o666 & ~umask}


def onnx_signature(values) -> list[tuple[str, str, list]]:
    """(name, numpy dtype name, dims) of ONNX graph inputs or outputs; a dynamic dim is its symbol."""
    return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def test_onnx_outputs_declare_the_contracts_fixed_sizes(fp32_export):
    for graph in GRAPH_NAMES:
        entry = fp32_export.manifest["graphs"][graph]
        model = onnx.load(str(fp32_export.root / entry["files"]["onnx"]), load_external_data=False)
        assert onnx_signature(model.graph.output) == \
            [(s["name"], s["dtype"], s["shape"]) for s in entry["contract"]["outputs"]], graph


def test_verify_finds_changed_missing_and_extra_files(fp32_export, tmp_path):
    root = copy_export(fp32_export, tmp_path / "tiny")
    folder = EngineFolder.open(root)
    graph = root / "onnx" / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    (root / "host" / "scheduler" / "scheduler_config.json").unlink()
    (root / "stray.txt").write_text("x")
    assert sorted(folder.verify()) == ["changed: onnx/text_encoder.onnx", "missing: host/scheduler/scheduler_config.json",
                                       "not in manifest: stray.txt"]
    with pytest.raises(ViLexUsageError, match="'host/scheduler/scheduler_config.json' is missing or has the wrong size"):
        EngineFolder.open(root)


def test_second_export_is_refused_unless_replace(fp32_export, export_ckpt):
    before = fp32_export.verify()
    with pytest.raises(ViLexUsageError, match="already holds an export; pass --replace"):
        export_checkpoint(export_ckpt, fp32_export.root, ExportOptions())
    assert fp32_export.verify() == before == []


def test_replace_swaps_the_whole_folder(fp32_export, export_ckpt, tmp_path):
    root = copy_export(fp32_export, tmp_path / "tiny")
    (root / "tensorrt").mkdir()
    (root / "tensorrt" / "unet.plan").write_bytes(b"an engine of the old graphs")
    folder = export_checkpoint(export_ckpt, root, ExportOptions(max_batch=2), replace=True, log=lambda *_: None)
    assert folder.options.max_batch == 2 and folder.contract("unet").axes["batch"].max == 6
    assert not (root / "tensorrt").exists()  # nothing of the old export survives
    assert folder.verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging or retired folders left


def test_failed_replace_leaves_the_old_export_untouched(fp32_export, export_ckpt, tmp_path, monkeypatch):
    import vilex.export.onnx_export as onnx_export

    root = copy_export(fp32_export, tmp_path / "tiny")
    before = (root / MANIFEST).read_text()

    def failing_validation(contract, *args, **kwargs):
        raise ToleranceError(contract.name, contract.output_names[0], 1.0, 1e-4, "injected")

    monkeypatch.setattr(onnx_export, "validate_graph", failing_validation)
    with pytest.raises(ToleranceError, match="graph 'vilex_encoder' output 'vilex_tokens'"):
        export_checkpoint(export_ckpt, root, ExportOptions(max_batch=2), replace=True)
    assert (root / MANIFEST).read_text() == before and EngineFolder.open(root).verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_export_refuses_a_folder_that_is_not_an_export(export_ckpt, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ViLexUsageError, match="non-empty folder that is not an export"):
        export_checkpoint(export_ckpt, tmp_path / "mine", ExportOptions(), replace=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- the onnxruntime backend and the pipeline ----------------------------------------------------------
def test_backend_checks_inputs_against_the_contract(fp32_export):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(fp32_export)
    out = backend("vae_decoder", latents=torch.randn(2, 4, 12, 20))
    assert out.shape == (2, 3, 24, 40) and out.dtype == torch.float32
    with pytest.raises(ViLexUsageError, match="graph 'vae_decoder' input 'latents' must have shape"):
        backend("vae_decoder", latents=torch.randn(2, 3, 12, 20))
    with pytest.raises(ViLexUsageError, match="axis 'latent_height' must be any size, a multiple of 2, got 13"):
        backend("vae_decoder", latents=torch.randn(2, 4, 13, 20))


def test_onnxruntime_pipeline_matches_pytorch(fp32_export, reference_pipeline, sample_images_small):
    """Same seed, same images. Every fp32 stage differs from PyTorch by <= 2e-6 (validation); the
    bound 1e-4 on images in [0, 1] leaves 50x for the loop to amplify that and is still 1/40 of one
    8-bit level (3.9e-3), so any real difference in the computation fails it."""
    from vilex.backends import TorchBackend
    from vilex.backends.onnxruntime import OnnxRuntimeBackend

    kwargs = dict(num_tokens=8, num_inference_steps=STEPS, seed=0, output_type="pt")
    torch_images = reference_pipeline.set_backend(TorchBackend(reference_pipeline))(sample_images_small, **kwargs).images
    ort_images = reference_pipeline.set_backend(OnnxRuntimeBackend(fp32_export))(sample_images_small, **kwargs).images
    reference_pipeline.set_backend(TorchBackend(reference_pipeline))
    assert ort_images.shape == torch_images.shape == (2, 3, 64, 64)
    assert float((ort_images - torch_images).abs().max()) < 1e-4


def test_pipeline_from_engines_runs_without_pytorch_weights(fp32_export, reference_pipeline, sample_images_small):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.host import pipeline_from_engines

    weightless = pipeline_from_engines(fp32_export)
    weightless.set_progress_bar_config(disable=True)
    assert next(weightless.unet.parameters()).device.type == "meta"
    kwargs = dict(num_tokens=8, prompt="a red cat", text_guidance_scale=2.0, num_inference_steps=STEPS, seed=3,
                  output_type="pt")
    expected = reference_pipeline.set_backend(OnnxRuntimeBackend(fp32_export))(sample_images_small, **kwargs).images
    from vilex.backends import TorchBackend

    reference_pipeline.set_backend(TorchBackend(reference_pipeline))
    assert torch.equal(weightless(sample_images_small, **kwargs).images, expected)


def test_an_export_carries_the_mixing_adapter_to_the_host(fp32_export, export_ckpt, sample_images_small, tmp_path):
    """The mixing adapter runs on the host, beside the token-embedding table: the weightless pipeline of an export
    folder (onnxruntime, and the Triton server's, which is built the same way) loads it and makes the images the
    PyTorch-weighted pipeline makes on the same graphs; a folder whose config names one it lacks is an error.
    (The graphs of a checkpoint with an adapter are those of the one without: step 5 of the export is redone.)"""
    from vilex import ViLexPipeline
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.engines.folder import checkpoint_paths
    from vilex.engines.host import MIX_ADAPTER_FILE, pipeline_from_engines, save_host_files

    adapted = ViLexPipeline.from_pretrained(export_ckpt)
    adapted.set_progress_bar_config(disable=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in adapted.vilex.add_mix_adapter(8, words=True).parameters():  # the kind that reads the words
            parameter.add_(torch.randn_like(parameter) * 0.5)
    adapted.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    root = copy_export(fp32_export, tmp_path / "engines")
    save_host_files(adapted, tmp_path / "ckpt", root / "host", checkpoint_paths(tmp_path / "ckpt"))
    folder = EngineFolder(root, json.loads((root / MANIFEST).read_text()))

    weightless = pipeline_from_engines(folder)
    weightless.set_progress_bar_config(disable=True)
    assert weightless.vilex.config.mix_adapter_hidden == 8 and weightless.vilex.config.mix_adapter_words
    kwargs = dict(num_tokens=8, prompt="blue", text_guidance_scale=7.5, num_inference_steps=STEPS, seed=3,
                  output_type="pt")
    expected = adapted.set_backend(OnnxRuntimeBackend(folder))(sample_images_small, **kwargs).images
    assert torch.equal(weightless(sample_images_small, **kwargs).images, expected)
    plain = pipeline_from_engines(fp32_export)
    plain.set_progress_bar_config(disable=True)
    assert not torch.allclose(plain(sample_images_small, **kwargs).images, expected, atol=1e-3)  # the adapter ran

    (root / "host" / MIX_ADAPTER_FILE).unlink()
    with pytest.raises(ViLexUsageError, match="has a mixing adapter, but .*mix_adapter.safetensors is missing"):
        pipeline_from_engines(folder)


@pytest.fixture(scope="session")
def sample_images_small():
    from vilex.images import load_image
    from vilex.samples import sample_paths

    return [load_image(p) for p in sample_paths()[:2]]


# ---- the command line ----------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_cli_reconstruct_through_onnxruntime_equals_pytorch(fp32_export, export_ckpt, tmp_path):
    """End to end through the command: the 8-bit PNGs must agree to PSNR >= 50 dB (at most a few
    pixels one level apart: fp32 stage differences of ~1e-6 only flip values that sit on a rounding
    edge). Anything that changed the computation (a wrong timestep, a missing guidance branch) gives
    PSNR below 30 dB on these images."""
    from PIL import Image

    from vilex.cli import main
    from vilex.samples import sample_paths

    images = [str(p) for p in sample_paths()[:2]]
    common = ["--steps", str(STEPS), "--seed", "5", "--tokens", "16"]
    assert main(["reconstruct", str(export_ckpt), *images, "--out", str(tmp_path / "torch"), *common]) == 0
    assert main(["reconstruct", str(export_ckpt), *images, "--out", str(tmp_path / "ort"), *common,
                 "--backend", "onnxruntime", "--engines", str(fp32_export.root)]) == 0
    for name in (Path(p).stem + ".png" for p in images):
        a = np.asarray(Image.open(tmp_path / "torch" / name))
        b = np.asarray(Image.open(tmp_path / "ort" / name))
        assert a.shape == b.shape == (64, 64, 3)
        assert psnr(a, b) >= 50.0


def test_cli_runs_from_the_export_folder_alone(fp32_export, export_ckpt, tmp_path, monkeypatch):
    """With --engines and no CKPT nothing loads PyTorch weights, and the images are those of the same
    graphs run with CKPT given."""
    from PIL import Image

    from vilex import ViLexPipeline
    from vilex.cli import main
    from vilex.samples import sample_paths

    images = [str(p) for p in sample_paths()[:2]]
    common = ["--steps", str(STEPS), "--seed", "5", "--tokens", "16", "--backend", "onnxruntime",
              "--engines", str(fp32_export.root)]
    assert main(["reconstruct", str(export_ckpt), *images, "--out", str(tmp_path / "with-ckpt"), *common]) == 0

    def no_weights(*args, **kwargs):
        raise AssertionError("an engines-only run loaded a PyTorch checkpoint")

    monkeypatch.setattr(ViLexPipeline, "from_pretrained", no_weights)
    assert main(["reconstruct", *images, "--out", str(tmp_path / "alone"), *common]) == 0
    assert main(["tokenize", images[0], "--out", str(tmp_path / "t.safetensors"), *common[4:]]) == 0
    assert main(["generate", "--tokens", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "gen"),
                 "--steps", "1", *common[6:]]) == 0
    for name in (Path(p).stem + ".png" for p in images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "alone" / name)),
                              np.asarray(Image.open(tmp_path / "with-ckpt" / name)))
    assert (tmp_path / "gen" / "000.png").is_file()


def test_pipeline_from_engines_refuses_classes_the_folder_should_not_choose(fp32_export, tmp_path):
    """The host files are data: a scheduler config naming a non-scheduler, or model_index.json naming
    another library, is an error naming the file, not an import."""
    from vilex.engines.host import pipeline_from_engines

    root = copy_export(fp32_export, tmp_path / "copy")
    folder = EngineFolder(root, json.loads((root / MANIFEST).read_text()))
    config = root / "host" / "scheduler" / "scheduler_config.json"
    original = config.read_text()
    config.write_text(original.replace('"DDIMScheduler"', '"UNet2DConditionModel"'))
    with pytest.raises(ViLexUsageError, match="UNet2DConditionModel.*not a diffusers scheduler"):
        pipeline_from_engines(folder)
    config.write_text(original)
    index = root / "host" / "model_index.json"
    entries = json.loads(index.read_text())
    entries["tokenizer"] = ["os", "system"]
    index.write_text(json.dumps(entries))
    with pytest.raises(ViLexUsageError, match=r"names os\.system for tokenizer; it must come from transformers"):
        pipeline_from_engines(folder)


def test_cli_backend_errors_exit_2(fp32_export, export_ckpt, tmp_path, capsys):
    from vilex.cli import main
    from vilex.samples import sample_paths

    image = str(sample_paths()[0])
    base = ["reconstruct", str(export_ckpt), image, "--out", str(tmp_path / "out"), "--steps", "1"]
    assert main(base + ["--backend", "onnxruntime"]) == 2
    assert "--backend onnxruntime needs --engines" in capsys.readouterr().err
    assert main(base + ["--backend", "openvino"]) == 2
    assert "--backend must be one of torch, onnxruntime, tensorrt" in capsys.readouterr().err
    assert main(base + ["--backend", "onnxruntime", "--engines", str(tmp_path)]) == 2
    assert "is not an export folder" in capsys.readouterr().err
    other = tmp_path / "other-ckpt"
    shutil.copytree(export_ckpt, other)
    config = other / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert main(["reconstruct", str(other), image, "--out", str(tmp_path / "out"), "--steps", "1",
                 "--backend", "onnxruntime", "--engines", str(fp32_export.root)]) == 2
    assert "was exported from a different checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_export_usage_errors_exit_2(export_ckpt, tmp_path, capsys):
    from vilex.cli import main

    assert main(["export", str(export_ckpt), "--out", str(tmp_path / "e"), "--height", "30"]) == 2
    assert "--height must be a positive multiple of 4" in capsys.readouterr().err
    assert main(["export", str(export_ckpt), "--out", str(tmp_path / "e"), "--precision", "bf16"]) == 2
    assert "--precision must be one of fp32, fp16" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))


def test_demo_exports_and_compares_pytorch_with_onnx(tmp_path, capsys):
    from vilex.demo import ensure_export, run_demo

    grid = run_demo(out=tmp_path / "demo", cache=tmp_path / "cache", steps=1, checkpoint="tiny", eval_images=4)
    printed = capsys.readouterr().out
    assert grid.is_file() and "[3/6] ONNX graphs at" in printed and "exported and validated" in printed
    assert "| torch | vilex-75 |" in printed and "| torch | caption |" in printed  # the fidelity table
    line = next(line for line in printed.splitlines() if "PyTorch vs ONNX: max |diff|" in line)
    assert float(line.split("max |diff|")[1].split()[0]) < 1e-4
    assert "stage timings (onnxruntime, CPU):" in printed
    engines, exported = ensure_export(tmp_path / "cache" / "tiny-seed0", tmp_path / "cache", name="tiny")
    assert not exported and EngineFolder.open(engines).verify() == []  # the second run reuses the export


def test_backend_provider_errors(fp32_export, monkeypatch):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend, default_providers

    with pytest.raises(ViLexUsageError, match="providers \\['NoSuchExecutionProvider'\\] are not available"):
        OnnxRuntimeBackend(fp32_export, providers=["NoSuchExecutionProvider"])
    monkeypatch.setenv("VILEX_ORT_PROVIDERS", "cpu")
    assert default_providers() == ["cpu"]
    assert OnnxRuntimeBackend(fp32_export).providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding_matches_cpu(fp32_export):
    import onnxruntime as ort

    from vilex.backends.onnxruntime import OnnxRuntimeBackend

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    gpu, cpu = OnnxRuntimeBackend(fp32_export, providers=["cuda"]), OnnxRuntimeBackend(fp32_export, providers=["cpu"])
    inputs = {"sample": torch.randn(2, 4, 32, 32), "timestep": torch.tensor([999.0, 10.5]),
              "encoder_hidden_states": torch.randn(2, 77, 32)}
    on_cpu = gpu("unet", **inputs)
    on_gpu = gpu("unet", **{k: v.cuda() for k, v in inputs.items()})
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"  # back where the inputs came from
    expected = cpu("unet", **inputs)
    assert float((on_cpu - expected).abs().max()) < 1e-3 and float((on_gpu.cpu() - expected).abs().max()) < 1e-3


def test_checkpoint_hash_covers_the_components_only(export_ckpt, tmp_path):
    copy = shutil.copytree(export_ckpt, tmp_path / "ckpt")
    (copy / "NOTES.md").write_text("a user's notes next to the checkpoint")
    assert checkpoint_sha256(copy) == checkpoint_sha256(export_ckpt)
    weights = copy / "vilex" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # as after more training: same size, other weights
    weights.write_bytes(bytes(data))
    assert checkpoint_sha256(copy) != checkpoint_sha256(export_ckpt)


def test_checkpoint_hash_is_computed_once_then_read_from_file_metadata(export_ckpt, tmp_path, monkeypatch):
    """A second check of the same unchanged checkpoint reads no file; a rewritten file is hashed anew."""
    import vilex.engines.folder as folder_module

    copy = shutil.copytree(export_ckpt, tmp_path / "ckpt")
    first = checkpoint_sha256(copy)
    assert first == checkpoint_sha256(copy, cache=False)
    real_sha256_file = folder_module.sha256_file
    monkeypatch.setattr(folder_module, "sha256_file", lambda path: pytest.fail(f"hashed {path} again"))
    assert checkpoint_sha256(copy) == first
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    monkeypatch.setattr(folder_module, "sha256_file", real_sha256_file)
    assert checkpoint_sha256(copy) != first
