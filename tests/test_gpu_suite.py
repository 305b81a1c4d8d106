"""benchmarks/gpu_suite.sh and benchmarks/gpu_toy_base.sh in their CPU dry runs, with a stub `vilex` carried as a wheel.

The real dry run (the tiny preset through `vilex bench`, in an environment built like the GPU host's) takes
minutes on 2 cores and needs the wheels it carries built first; docs/performance.md says how to run it. Here the
scripts' own logic is checked in seconds against a stub `vilex` console script, delivered the way the real one
is: as a wheel in WHEELS_DIR. What is checked: the wheels install with `--no-index --target OUT/site` and come
first on PATH; the dependency check passes without a GPU in a dry run; every step runs, with the dry run's
options; the backends `vilex bench` skipped reach skipped.txt with their reasons; a failed step makes the exit
status 1, and the steps after it still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("benchmarks/gpu_suite.sh", "benchmarks/gpu_toy_base.sh", "benchmarks/gpu_env.sh")

# The stub: logs each command line to $VILEX_STUB_LOG and makes the folders the scripts look for next. `bench`
# writes a results.json whose skipped backends are the GPU-only ones, as `vilex bench` does on a CPU.
STUB = '''
import json, os, sys
from pathlib import Path

def main():
    args = sys.argv[1:]
    with open(os.environ["VILEX_STUB_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    value = lambda flag: args[args.index(flag) + 1]
    if args[0] == "init":
        Path(args[1]).mkdir(parents=True)
        (Path(args[1]) / "model_index.json").write_text("{}")
    elif args[0] == "bench":
        out = Path(value("--out"))
        if out.name == os.environ.get("VILEX_STUB_FAIL"):
            sys.exit(3)
        out.mkdir(parents=True)
        gpu_only = [b for b in value("--backends").split(",") if b != "torch"]
        (out / "results.json").write_text(json.dumps({"skipped": {b: f"{b} needs a CUDA GPU" for b in gpu_only}}))
    elif args[:2] == ["toyworld", "train-base"]:
        (Path(args[2]) / "pipeline").mkdir(parents=True)
    elif args[:2] in (["toyworld", "make-data"], ["toyworld", "new-vilex"]):
        Path(args[-1] if args[1] == "new-vilex" else args[2]).mkdir(parents=True)
'''


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_parses(script):
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def stub_wheels(tmp_path_factory) -> Path:
    """WHEELS_DIR with one wheel whose console script `vilex` is the stub (written by hand: no build backend). It is
    named vilex, as the real one, so that the scripts install it instead of building vilex from the checkout; the
    package `vilex` itself still comes from the environment."""
    wheels = tmp_path_factory.mktemp("wheels")
    info = "vilex-0.0.0.dist-info"
    files = {
        "vilex_stub.py": STUB,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: vilex\nVersion: 0.0.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nvilex = vilex_stub:main\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheels / "vilex-0.0.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return wheels


def dry_run(script: str, out: Path, wheels: Path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    log = out.parent / f"{out.name}-commands.jsonl"
    environment = {**os.environ, "PYTHON": sys.executable, "VILEX_STUB_LOG": str(log), **env}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(ROOT / script), "--dry-run", str(out), str(wheels)], capture_output=True,
                            text=True, env=environment, cwd=out.parent, timeout=600)
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, commands


def option(command: list[str], flag: str) -> str:
    """The value argparse keeps: the last one given."""
    return command[len(command) - 1 - command[::-1].index(flag) + 1]


def test_gpu_suite_dry_run_runs_every_step_on_cpu(stub_wheels, tmp_path):
    # One run: the e2e step fails, which must set the exit status without stopping the steps after it.
    out = tmp_path / "suite"
    result, commands = dry_run("benchmarks/gpu_suite.sh", out, stub_wheels, VILEX_STUB_FAIL="e2e")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run on CPU" in result.stdout and "building vilex" not in result.stdout
    # The stub ran from the carried wheel, installed under OUT/site, not from the project's environment.
    assert (out / "site" / "bin" / "vilex").exists() and (out / "site" / "vilex_stub.py").exists()
    init, *benches = commands
    assert init[:1] == ["init"] and option(init, "--preset") == "tiny"
    assert [option(c, "--out") for c in benches] == [str(out / n) for n in ("stages", "e2e", "compile")]
    checkpoint = init[1]
    for bench in benches:
        assert bench[:2] == ["bench", checkpoint]
        assert "torch" in option(bench, "--backends").split(",")  # every step measures something on a CPU
    assert option(benches[1], "--steps") == "2"
    skipped = (out / "skipped.txt").read_text().splitlines()
    for line in ("e2e (timed out or failed)", "stages: torch-fp16 (torch-fp16 needs a CUDA GPU)",
                 "compile: torch-compile (torch-compile needs a CUDA GPU)"):
        assert line in skipped
    assert (out / "suite.log").read_text().count("\n== ") >= 4  # the log has every step's header


def test_gpu_toy_base_dry_run_trains_a_few_steps_on_cpu(stub_wheels, tmp_path):
    out = tmp_path / "toy"
    result, commands = dry_run("benchmarks/gpu_toy_base.sh", out, stub_wheels)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    base, data, new_vilex, train = commands
    assert base[:2] == ["toyworld", "train-base"] and option(base, "--device") == "cpu"
    assert option(base, "--unet-steps") == "2" and option(base, "--curve-every") == "0"
    assert option(base, "--detailed-captions") == "0.5"  # the shipped base's recipe, not train-base's defaults
    assert data[:2] == ["toyworld", "make-data"] and option(data, "--n") == "64"
    assert new_vilex[:2] == ["toyworld", "new-vilex"]
    assert "--pretrain-all-swaps" in new_vilex and option(new_vilex, "--pretrain-captioning") == "4"
    assert train[0] == "train" and "--cpu" in train and option(train, "--max-steps") == "2"
