"""Shared fixtures: one tiny checkpoint per test session, saved and loaded through the real code; its export;
and one `vilex serve` of that export for every module that only sends requests (a server start is the
costliest thing a served test does)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture(scope="session")
def in_process(tiny_engines):
    """The served tests' reference: the session's export run in-process by onnxruntime, through the same
    pipeline loop (tests call it; none changes its backend or scheduler)."""
    from vilex.engines.host import pipeline_from_engines

    pipeline = pipeline_from_engines(tiny_engines)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    from vilex.samples import sample_paths

    return sample_paths()


@dataclass
class Served:
    process: subprocess.Popen  # `vilex serve`
    server_pid: int  # tritonserver (its own process group)
    http: str
    grpc: str
    metrics_port: int
    admin_key: str
    engines: Path
    repository: Path
    workdir: Path  # where `vilex serve` ran: it holds a `triton/` package (issue 19)
    output: list[str]

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc


@pytest.fixture(scope="session")
def served(tiny_engines, tmp_path_factory):
    """`vilex serve` on a python-ort repository of the tiny export (the default UNet placement), on free ports,
    for the whole session. Tests send requests and read statistics as differences; none may stop it or change
    its repository (tests/test_faults.py starts its own servers for that).

    As the README lays folders out: the console script runs in a working folder that holds `triton/NAME` (the
    repository) and a `triton/__init__.py`, a package named like the one torch imports (issue 19)."""
    from vilex.serving.repository import build_repository
    from vilex.serving.server import Ports

    root = tmp_path_factory.mktemp("triton")
    workdir = root / "workdir"
    repository = build_repository(tiny_engines, workdir / "triton" / "tiny", platform="python-ort")
    (workdir / "triton" / "__init__.py").write_text("")
    ports = Ports.free()
    admin_key = "test-admin-key"
    command = [str(Path(sys.executable).with_name("vilex")), "serve", "triton/tiny", "--http-port", str(ports.http),
               "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--health-port", "0",
               "--log", str(root / "server.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
                               env={**os.environ, "VILEX_TRITON_ADMIN_KEY": admin_key})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("tritonserver ready" in line for line in output):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log = (root / "server.log").read_text(errors="replace")[-4000:] if (root / "server.log").exists() else ""
            pytest.fail("vilex serve did not become ready:\n" + "".join(output)[-4000:] + "\n" + log)
        time.sleep(0.2)
    pid = int(re.search(r"tritonserver ready \(pid (\d+)\)", "".join(output)).group(1))
    yield Served(process, pid, f"127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}", ports.metrics, admin_key,
                 tiny_engines, repository, workdir, output)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
