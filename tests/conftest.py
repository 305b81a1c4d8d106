"""Shared fixtures: one tiny checkpoint per test session, saved and loaded through the real code."""

from __future__ import annotations

import os

import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """$VILEX_CACHE (the checkpoint-hash cache, the demo's files) in a temporary folder, not the home."""
    previous = os.environ.get("VILEX_CACHE")
    os.environ["VILEX_CACHE"] = str(tmp_path_factory.mktemp("vilex-cache"))
    yield
    if previous is None:
        os.environ.pop("VILEX_CACHE", None)
    else:
        os.environ["VILEX_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny ViLex checkpoint folder (seed 0), written with save_pretrained."""
    from vilex.presets import tiny

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny(seed=0).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture()
def tiny_pipeline(tiny_ckpt):
    """A freshly loaded tiny pipeline (fresh per test, so tests may change its backend or scheduler)."""
    from vilex import ViLexPipeline

    pipeline = ViLexPipeline.from_pretrained(tiny_ckpt)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def sample_images():
    from vilex.images import load_image
    from vilex.samples import sample_paths

    return [load_image(p) for p in sample_paths()[:2]]


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_engines(tiny_ckpt, tmp_path_factory) -> Path:
    """The session's tiny checkpoint exported to ONNX with max batch 4 (what the served tests use). Tests
    must not change it: a repository built from it hard-links the graphs, so break a link before writing."""
    from vilex.engines.contract import ExportOptions
    from vilex.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("engines") / "tiny-max-batch-4"
    export_checkpoint(tiny_ckpt, out, ExportOptions(max_batch=4), log=lambda *_: None)
    return out
