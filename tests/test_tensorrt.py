"""TensorRT: profiles, build plans, trtexec commands and manifest entries from the contract (on CPU),
and engine building and running (marked `tensorrt`, skipped without TensorRT and a GPU)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from vilex.errors import ViLexUsageError
from vilex.engines.contract import ExportOptions
from vilex.engines.folder import EngineFolder
from vilex.export.onnx_export import export_checkpoint
from vilex.export.tensorrt_build import (
    SCRIPT, build_script, engine_file_name, plan_builds, profile_shapes, record_engines, shapes_arg, trtexec_command,
)


def tensorrt_ready() -> str | None:
    """None when TensorRT and a CUDA GPU are both there, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (it has no PyPI wheel installable without NVIDIA's index)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


NOT_READY = tensorrt_ready()
needs_tensorrt = pytest.mark.skipif(NOT_READY is not None, reason=f"needs TensorRT and a GPU: {NOT_READY}")


@pytest.fixture(scope="module")
def trt_ckpt(tiny_ckpt) -> Path:
    """The session's tiny checkpoint (conftest.py)."""
    return tiny_ckpt


@pytest.fixture(scope="module")
def exported(trt_ckpt, tmp_path_factory) -> EngineFolder:
    out = tmp_path_factory.mktemp("trt-engines") / "tiny"
    return export_checkpoint(trt_ckpt, out, ExportOptions(max_batch=2), log=lambda *_: None)


@pytest.fixture()
def folder(exported, tmp_path) -> EngineFolder:
    """A private copy: these tests write engines, scripts and manifest entries into it."""
    return EngineFolder.open(shutil.copytree(exported.root, tmp_path / "tiny"))


# ---- profiles and commands (CPU) ---------------------------------------------------------------------------
def test_profiles_come_from_the_contract(folder):
    unet = folder.contract("unet")
    profile = profile_shapes(unet)
    # max_batch 2 images -> up to 3 guidance branches -> 6; latents 16..64 (32..128 px), opt 32 (64 px)
    assert profile["min"] == {"sample": (1, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)}
    assert profile["opt"] == {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    assert profile["max"] == {"sample": (6, 4, 64, 64), "timestep": (6,), "encoder_hidden_states": (6, 77, 32)}
    assert shapes_arg(profile["max"]) == "sample:6x4x64x64,timestep:6,encoder_hidden_states:6x77x32"
    assert profile_shapes(folder.contract("vilex_encoder"))["max"] == {"pixel_values": (2, 3, 32, 32)}


def test_build_plans_names_precision_and_overrides(folder):
    builds = {b.graph: b for b in plan_builds(folder, fp16=True, trt_version="10.3.0", compute_capability="90")}
    assert builds["unet"].engine == "tensorrt/unet.fp16.trt10.3.0.sm90.plan"
    assert engine_file_name("unet", "fp16", "10.3.0", "90") == "unet.fp16.trt10.3.0.sm90.plan"
    # fp32 graphs + --fp16: the FP16 builder flag, except for the VAE decoder, which stays fp32
    assert builds["unet"].fp16_flag and not builds["unet"].strongly_typed
    assert builds["vae_decoder"].precision == "fp32" and builds["vae_decoder"].strongly_typed
    assert not any(b.up_to_date for b in builds.values())
    wide = {b.graph: b for b in plan_builds(folder, True, "10.3.0", "90", overrides={"max_batch": 4, "max_size": 256})}
    assert wide["unet"].profile["max"]["sample"] == (12, 4, 128, 128)
    assert wide["unet"].key != builds["unet"].key
    with pytest.raises(ViLexUsageError, match="--max-size must be a positive multiple of 4"):
        plan_builds(folder, True, "10.3.0", "90", overrides={"max_size": 130})


def test_trtexec_command_matches_the_plan(folder):
    build = {b.graph: b for b in plan_builds(folder, fp16=False, trt_version="10.3.0", compute_capability="90")}["unet"]
    command = trtexec_command(build, build.engine, "tensorrt/timing.cache", workspace_gb=4)
    assert command == [
        "trtexec", "--onnx=onnx/unet.onnx", "--saveEngine=tensorrt/unet.fp32.trt10.3.0.sm90.plan",
        "--minShapes=sample:1x4x16x16,timestep:1,encoder_hidden_states:1x77x32",
        "--optShapes=sample:2x4x32x32,timestep:2,encoder_hidden_states:2x77x32",
        "--maxShapes=sample:6x4x64x64,timestep:6,encoder_hidden_states:6x77x32",
        "--stronglyTyped", "--timingCacheFile=tensorrt/timing.cache", "--memPoolSize=workspace:4096M"]


def test_build_script_runs_trtexec_with_the_names_the_python_build_uses(folder, tmp_path):
    """Run the generated script with a stand-in `trtexec` that records its arguments."""
    builds = plan_builds(folder, fp16=True, trt_version="${TRT_VERSION}", compute_capability="${SM}")
    script = folder.root / SCRIPT
    script.write_text(build_script(builds))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$TRTEXEC_LOG"; echo ---- >> "$TRTEXEC_LOG"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "trtexec.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TRT_VERSION": "10.3.0", "SM": "90",
           "TRTEXEC_LOG": str(log)}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    calls = [call.strip().split("\n") for call in log.read_text().split("----") if call.strip()]
    expected = plan_builds(folder, fp16=True, trt_version="10.3.0", compute_capability="90")
    assert len(calls) == len(expected) == 4
    for call, build in zip(calls, expected):
        assert call == trtexec_command(build, build.engine, "tensorrt/timing.trt10.3.0.sm90.cache")[1:]
    assert (folder.root / "tensorrt").is_dir()  # the script made the engine folder


def test_up_to_date_by_hash_not_by_existence(folder):
    """Record engines as build-engines does after a build (stand-in bytes for the engines), then change
    one input of the key at a time."""
    def plans(**kwargs):
        return {b.graph: b for b in plan_builds(folder, True, "10.3.0", "90", **kwargs)}

    builds = plans()
    (folder.root / "tensorrt").mkdir()
    for build in builds.values():
        (folder.root / build.engine).write_bytes(f"engine of {build.graph}".encode())
    record_engines(folder, list(builds.values()), "10.3.0", "90", None)
    entry = folder.manifest["tensorrt"]["engines"]["unet.fp16.trt10.3.0.sm90.plan"]
    assert entry["key"] == builds["unet"].key and entry["profile"]["max"]["sample"] == [6, 4, 64, 64]
    assert folder.verify() == []  # the engines are listed with their hashes
    reopened = EngineFolder.open(folder.root)
    assert all(b.up_to_date for b in plan_builds(reopened, True, "10.3.0", "90"))

    assert not plans(overrides={"max_batch": 1})["unet"].up_to_date  # another profile
    assert not any(b.up_to_date for b in plan_builds(reopened, True, "10.4.0", "90"))  # another TensorRT
    (folder.root / builds["text_encoder"].engine).write_bytes(b"same name, other bytes")
    assert not plans()["text_encoder"].up_to_date and plans()["unet"].up_to_date
    folder.manifest["files"]["onnx/unet.onnx"]["sha256"] = "0" * 64  # as after re-exporting the graph
    assert not plans()["unet"].up_to_date


def test_build_engines_without_tensorrt_exits_2_and_leaves_the_script(exported, tmp_path, capsys):
    if NOT_READY is None:
        pytest.skip("TensorRT and a GPU are present: the command would build")
    from vilex.cli import main

    root = shutil.copytree(exported.root, tmp_path / "tiny")
    assert main(["build-engines", str(root), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "vilex build-engines: error:" in err and ("TensorRT is not installed" in err or "no CUDA GPU" in err)
    assert f"{root / SCRIPT}" in err
    assert (root / SCRIPT).is_file() and os.access(root / SCRIPT, os.X_OK)
    assert EngineFolder.open(root).verify() == []  # the script is in the manifest, nothing else changed
    assert main(["build-engines", str(root), "--max-batch", "0"]) == 2
    assert "--max-batch must be in 1..256" in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(exported, trt_ckpt, tmp_path, capsys):
    if NOT_READY is None:
        pytest.skip("TensorRT and a GPU are present")
    from vilex.backends.tensorrt import TensorRTBackend
    from vilex.cli import main
    from vilex.samples import sample_paths

    with pytest.raises(ViLexUsageError, match="TensorRT is not installed|no CUDA GPU"):
        TensorRTBackend(exported)
    assert main(["reconstruct", str(trt_ckpt), str(sample_paths()[0]), "--out", str(tmp_path / "out"),
                 "--backend", "tensorrt", "--engines", str(exported.root)]) == 2
    assert "the tensorrt backend" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- building and running (TensorRT and a GPU) ----------------------------------------------------------------
@pytest.mark.tensorrt
@needs_tensorrt
def test_build_engines_then_skip_when_up_to_date(folder):
    from vilex.export.tensorrt_build import build_engines

    messages = []
    builds = build_engines(folder, fp16=False, log=messages.append)
    assert all((folder.root / b.engine).is_file() for b in builds)
    assert EngineFolder.open(folder.root).verify() == []
    messages.clear()
    build_engines(EngineFolder.open(folder.root), fp16=False, log=messages.append)
    assert sum("is up to date" in m for m in messages) == 4


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_stages_match_onnxruntime(folder, cuda_graph):
    from vilex.backends.onnxruntime import OnnxRuntimeBackend
    from vilex.backends.tensorrt import TensorRTBackend
    from vilex.export.tensorrt_build import build_engines
    from vilex.export.validate import sample_inputs, validation_cases

    build_engines(folder, fp16=False, log=lambda *_: None)
    trt_backend = TensorRTBackend(folder, cuda_graph=cuda_graph)
    ort_backend = OnnxRuntimeBackend(folder, providers=["cpu"])
    generator = torch.Generator().manual_seed(0)
    for graph in folder.graph_names:
        contract = folder.contract(graph)
        for sizes in validation_cases(contract):
            inputs = sample_inputs(contract, sizes, generator)
            expected = ort_backend(graph, **inputs)
            for _ in range(3):  # with cuda_graph: plain run, capture, replay
                got = trt_backend(graph, **inputs)
                assert got.device.type == "cpu" and got.shape == expected.shape
                tolerance = contract.tolerances["fp32"]
                # TF32 may be on for fp32 engines: allow 10x the fp32 tolerance.
                assert float((got - expected).abs().max()) <= 10 * tolerance.allowed(float(expected.abs().max()))
    with pytest.raises(ViLexUsageError, match="outside the engine's profile"):
        trt_backend("vae_decoder", latents=torch.randn(3, 4, 32, 32))


@pytest.mark.tensorrt
@needs_tensorrt
def test_cli_reconstruct_through_tensorrt(folder, trt_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    from vilex.cli import main
    from vilex.samples import sample_paths

    assert main(["build-engines", str(folder.root)]) == 0
    image = str(sample_paths()[0])
    common = ["--steps", "3", "--seed", "0", "--tokens", "8"]
    assert main(["reconstruct", str(trt_ckpt), image, "--out", str(tmp_path / "ort"), *common,
                 "--backend", "onnxruntime", "--engines", str(folder.root)]) == 0
    assert main(["reconstruct", str(trt_ckpt), image, "--out", str(tmp_path / "trt"), *common,
                 "--backend", "tensorrt", "--engines", str(folder.root)]) == 0
    name = Path(image).stem + ".png"
    a = np.asarray(Image.open(tmp_path / "ort" / name), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "trt" / name), dtype=np.int16)
    assert np.abs(a - b).max() <= 3  # fp32 engines (TF32 allowed): a few levels at most after 3 steps


def test_manifest_tensorrt_section_is_json_serializable(folder):
    builds = plan_builds(folder, True, "10.3.0", "90")
    (folder.root / "tensorrt").mkdir()
    for build in builds:
        (folder.root / build.engine).write_bytes(b"x")
    record_engines(folder, builds, "10.3.0", "90", 2.0)
    data = json.loads((folder.root / "manifest.json").read_text())
    assert set(data["tensorrt"]["engines"]) == {Path(b.engine).name for b in builds}
    assert data["tensorrt"]["script"] == SCRIPT
