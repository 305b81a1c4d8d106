"""The built wheel carries what `vilex triton-repo` needs: run from an installed wheel, with no source
checkout in sight, it writes a complete model repository.

Why this stands for "a fresh venv": a fresh virtual environment would need torch, diffusers, transformers,
onnx and tritonclient from the network (about 2 minutes here, and not at all on a host without a package
index). What the wheel itself must bring is the same either way, so the test installs only the wheel, with
`pip install --no-deps --target SITE`, and puts SITE first on the import path of a subprocess that runs in
a folder outside the checkout; the dependencies come from this environment, and the test asserts that vilex
itself (and the repository sources) came from SITE. The checkout's editable install stays where it is,
but Python's path finder, which reads PYTHONPATH first, finds SITE's vilex before the editable finder runs.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the distribution is built from (pyproject.toml's packages and package-dir, and its readme).
DISTRIBUTION = ("pyproject.toml", "README.md", "vilex", "export", "benchmarks", "triton_repo")
PIPELINE_MODELS = ("vilex_tokenize", "vilex_generate", "vilex_reconstruct")
GRAPH_MODELS = ("vilex_encoder", "text_encoder", "unet", "vae_decoder")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """SITE: the wheel built from this working tree, installed alone with `pip install --target`."""
    root = tmp_path_factory.mktemp("wheel")
    # 1. Build from a copy, so setuptools' build/ and *.egg-info never land in the shared checkout.
    source = root / "source"
    for name in DISTRIBUTION:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # 2. The wheel, offline: setuptools from this environment (no isolated build environment to download).
    #    Verbose, to read setuptools' own output: no data folder may be taken for an unlisted package (issue 19:
    #    the shipped weights' ten folders made an install print about 95 lines of warnings).
    build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
                 "-w", str(root / "dist"), str(source)])
    absent = re.findall(r"Package '([\w.]+)' is absent from the `packages` configuration", build.stdout + build.stderr)
    assert not absent, absent
    (wheel,) = (root / "dist").glob("vilex-*.whl")
    # 3. Installed on its own.
    site = root / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    return site


def test_the_wheel_carries_every_data_file(installed_wheel):
    """The shipped toy checkpoint, probe and model card, and the demo's sample images: every file of the checkout's
    data folders is in the wheel (pyproject.toml's package-data lists them; nothing else adds data)."""
    for folder in ("vilex/toyworld/weights", "vilex/samples"):
        files = {root: {p.relative_to(root) for p in (root / folder).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts} for root in (ROOT, installed_wheel)}
        assert files[ROOT] and files[installed_wheel] == files[ROOT], folder


def test_installed_wheel_writes_a_model_repository(installed_wheel, tiny_ckpt, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from vilex.engines.contract import ExportOptions
    from vilex.export.onnx_export import export_checkpoint

    site = installed_wheel
    engines = tmp_path / "engines"
    export_checkpoint(tiny_ckpt, engines, ExportOptions(max_batch=2), log=lambda *_: None)
    outside = tmp_path / "elsewhere"  # the command's working folder: not the checkout, nothing importable
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTHONSAFEPATH", None)

    # Where vilex and the repository sources come from, as the installed package sees it.
    where = run([sys.executable, "-c", "import vilex; from vilex.serving.config import source_dir; "
                 "print(vilex.__file__); print(source_dir())"], cwd=outside, env=env).stdout.split("\n")
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "vilex" / "triton_repo", where
    # The installed console script, as a user would run it.
    result = run([sys.executable, str(site / "bin" / "vilex"), "triton-repo", str(engines), "--out", "repository",
                  "--max-batch", "2"], cwd=outside, env=env)
    assert "wrote model repository repository (python-ort)" in result.stdout

    repository = outside / "repository"
    sources = site / "vilex" / "triton_repo"
    for name in (*GRAPH_MODELS, *PIPELINE_MODELS):
        # Each config is a valid ModelConfig (a misspelled field would fail the parse, as it fails the server).
        config = text_format.Parse((repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.backend == "python"
        assert config.max_batch_size == (3 * 2 if name == "unet" else 2)
        expected = sources / ("pipeline_model.py" if name in PIPELINE_MODELS else "onnxruntime_model.py")
        assert filecmp.cmp(repository / name / "1" / "model.py", expected, shallow=False), name
    for name in GRAPH_MODELS:
        assert (repository / name / "1" / "model.onnx").is_file()
    for name in PIPELINE_MODELS:
        assert (repository / name / "1" / "engine" / "manifest.json").is_file()
        assert (repository / name / "1" / "engine" / "host" / "model_index.json").is_file()
    assert (repository / "repository.json").is_file()
    # Only the sources ship: the committed tiny configs of the checkout are not package data.
    assert not list(sources.glob("*/config.pbtxt"))
