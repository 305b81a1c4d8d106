"""Benchmark machinery: percentiles, stability windows (on a simulated clock: no test here depends on how
fast the machine is), reports and their soundness flags, and a short real run on tiny."""

import importlib.util
import json
import time
import types

import numpy as np
import pytest

from vilex.benchmarks import measure as measure_module
from vilex.benchmarks.measure import measure, percentile
from vilex.benchmarks.report import UNSOUND_NOTE, comparisons, markdown, ratios


def test_percentile_matches_numpy():
    values = sorted(np.random.default_rng(0).random(101).tolist())
    for q in (50, 90, 95, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


class SimulatedClock:
    """Stands in for time.perf_counter in measure.py: only the measured calls advance it, by durations the test
    chooses (powers of two, so sums are exact in floating point)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def call_taking(self, durations):
        durations = iter(durations)

        def call():
            self.now += next(durations)
        return call


@pytest.fixture()
def clock(monkeypatch):
    clock = SimulatedClock()
    monkeypatch.setattr(measure_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def test_measure_steady_call_is_stable(clock):
    # Calls of 2**-7 s (7.8125 ms) in windows of 2**-4 s: 8 calls a window; three agreeing windows end it.
    call = clock.call_taking([2 ** -7] * 1000)
    stats = measure(lambda: call, items_per_call=2, window_s=2 ** -4, stability=0.05)
    assert stats.stable and stats.windows == 3 and stats.calls == 3 * 8
    assert stats.p50_ms == stats.p90_ms == stats.p99_ms == stats.mean_ms == 1000 * 2 ** -7
    assert stats.throughput == 2 / 2 ** -7  # items per second: 2 per call, back to back
    assert clock.now == (2 + 3 * 8) * 2 ** -7  # two warm-up calls, then the three windows


def test_measure_reports_the_last_windows(clock):
    # Slow at first (a cold start), then steady: windows of two calls take 1/8, 1/16, then 1/64 s per call.
    # The first three disagree, so do windows 2-4; windows 3-5 agree, and the statistics are theirs only.
    call = clock.call_taking([2 ** -3] * 2 + [2 ** -4] * 2 + [2 ** -6] * 1000)
    stats = measure(lambda: call, items_per_call=1, warmup_calls=0, window_s=0.0, min_calls=2, stability=0.05)
    assert stats.stable and stats.windows == 5 and stats.calls == 3 * 2
    assert stats.p99_ms == stats.p50_ms == 1000 * 2 ** -6 and stats.throughput == 2 ** 6


def test_measure_unsteady_call_is_not_stable(clock):
    # Windows of one call alternate between 1 ms and 31 ms: they never agree within 5 %.
    call = clock.call_taking([2 ** -10, 2 ** -5] * 1000)
    stats = measure(lambda: call, items_per_call=1, window_s=0.0, min_calls=1, stability=0.05, max_windows=6)
    assert not stats.stable and stats.windows == 6 and stats.calls == 3
    assert stats.p50_ms == 1000 * 2 ** -5 and stats.mean_ms == pytest.approx(1000 * (2 * 2 ** -5 + 2 ** -10) / 3)


def test_measure_concurrency_uses_one_callable_per_thread():
    made = []

    def make_call():
        made.append(1)
        return lambda: time.sleep(0.005)

    stats = measure(make_call, items_per_call=1, concurrency=4, window_s=0.05, stability=0.9)
    assert len(made) == 4 and stats.concurrency == 4


def stats_row(backend, p50, kind="stage", batch=1, stable=True, stage="unet"):
    stats = dict(items_per_call=batch, concurrency=1, calls=3, mean_ms=p50, p50_ms=p50, p90_ms=p50, p95_ms=p50,
                 p99_ms=p50, throughput=1000 * batch / p50, windows=3 if stable else 8, stable=stable,
                 peak_rss_mb=100.0, peak_gpu_mb=None)
    return {"backend": backend, "kind": kind, "stage": stage if kind == "stage" else None, "batch": batch,
            "steps": 20, "num_tokens": 16, "flops": 2e9, "fraction_of_peak": 0.1, "stats": stats}


def bench_report(results, stability=0.10):
    return {"date": "2026-01-01", "command": "vilex bench", "checkpoint": "ck", "peaks": {"cpu fp32": "x"},
            "skipped": {"tensorrt": "not installed"}, "settings": {"stability": stability},
            "environment": {"cpu": {"model": "CPU", "cores": 2}, "gpu": None}, "results": results}


def test_report_tables_and_ratios():
    report = bench_report([stats_row("torch", 100.0), stats_row("onnxruntime", 50.0),
                           stats_row("onnxruntime", 1000.0, "e2e"), stats_row("triton-http", 1050.0, "e2e")])
    table = markdown(report)
    assert "| unet | onnxruntime | 1 | 1 | 50.0 |" in table and "tensorrt (not installed)" in table
    assert "Unsound" not in table
    lines = ratios(report)
    assert any("onnxruntime/torch = 0.50x latency (2.00x speed-up)" in line for line in lines)
    assert any("triton-http/onnxruntime (in-process) = 1.05x" in line for line in lines)
    assert not any("unstable" in line for line in lines) and UNSOUND_NOTE not in lines
    assert all(c["stable"] and not c["problems"] for c in comparisons(report))


def test_ratios_from_unsound_rows_are_flagged():
    """The case seen on a GPU run: a 4.55x UNet speed-up over a torch row that was unstable and slower at
    batch 1 than at batch 2. The flags follow from the rows: stable: no, and p50 falling as the batch grows."""
    report = bench_report([
        stats_row("torch", 45.5, batch=1, stable=False), stats_row("torch", 30.0, batch=2),
        stats_row("torch", 60.0, batch=4),
        stats_row("torch-cudagraph", 10.0, batch=1), stats_row("torch-cudagraph", 15.0, batch=2),
        stats_row("torch-cudagraph", 30.0, batch=4),
        # Another stage, sound throughout; a 5 % dip with batch is within the 10 % stability margin.
        stats_row("torch", 21.0, batch=1, stage="vae_decoder"), stats_row("torch", 20.0, batch=2, stage="vae_decoder"),
        stats_row("torch-cudagraph", 10.0, batch=1, stage="vae_decoder"),
        stats_row("torch-cudagraph", 12.0, batch=2, stage="vae_decoder"),
    ])
    found = {(c["what"], c["batch"]): c for c in comparisons(report)}
    assert found["unet", 1]["speedup"] == pytest.approx(4.55)
    assert found["unet", 1]["stable"] is False
    assert any("unstable" in why for why in found["unet", 1]["problems"])
    assert any("batch 1 p50 45.5 ms is above batch 2's 30.0 ms" in why for why in found["unet", 1]["problems"])
    # Batch 2's torch figure is the other half of that contradiction; batch 4 is sound.
    assert found["unet", 2]["stable"] is False and found["unet", 4]["stable"] is True
    assert found["vae_decoder", 1]["stable"] is True and found["vae_decoder", 2]["stable"] is True

    lines = ratios(report)
    flagged = [line for line in lines[:-1] if "(unstable)" in line]
    assert len(flagged) == 2 and "4.55x speed-up) (unstable)" in flagged[0]
    assert lines[-1] == UNSOUND_NOTE
    assert "Unsound figures" in markdown(report) and "unet torch batch 1 conc 1: unstable" in markdown(report)
    # In results.json the comparisons carry the flag as data.
    data = json.loads(json.dumps({**report, "comparisons": comparisons(report)}))
    assert [c["stable"] for c in data["comparisons"] if c["what"] == "unet"] == [False, False, True]


def test_bench_cli_on_tiny(tmp_path, tiny_ckpt, capsys):
    from vilex.cli import main

    code = main(["bench", str(tiny_ckpt), "--backends", "torch,onnxruntime,tensorrt", "--stages", "text_encoder",
                 "--batch-sizes", "1,2", "--steps", "1", "--window", "0.05", "--compare", "--out", str(tmp_path / "b")])
    assert code == 0
    out = capsys.readouterr().out
    assert "text_encoder" in out and "onnxruntime/torch" in out
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    kinds = {(r["backend"], r["kind"], r["batch"]) for r in data["results"]}
    assert {("torch", "stage", 1), ("torch", "stage", 2), ("onnxruntime", "stage", 1), ("torch", "e2e", 1),
            ("onnxruntime", "e2e", 1)} <= kinds
    # tensorrt runs where the TensorRT package and a CUDA GPU both are; elsewhere its skip names what is missing.
    import torch

    has_tensorrt = importlib.util.find_spec("tensorrt") is not None
    if has_tensorrt and torch.cuda.is_available():
        assert "tensorrt" not in data["skipped"] and ("tensorrt", "stage", 1) in kinds
    elif not has_tensorrt:
        assert "TensorRT Python package is not installed" in data["skipped"]["tensorrt"]
    else:
        assert "needs a CUDA GPU" in data["skipped"]["tensorrt"]
    if "tensorrt" in data["skipped"]:
        assert not any(c["backend"] == "tensorrt" for c in data["comparisons"])
    # results.json carries every ratio with its soundness (a 0.05 s window on a busy machine may well be unsound).
    assert any(c["backend"] == "onnxruntime" and c["baseline"] == "torch" for c in data["comparisons"])
    assert all(isinstance(c["stable"], bool) and c["stable"] == (not c["problems"]) for c in data["comparisons"])
    assert all(r["flops"] > 0 for r in data["results"])
    assert (tmp_path / "b" / "latency_vs_batch.png").is_file() and (tmp_path / "b" / "results.md").is_file()
    assert data["environment"]["packages"]["torch"]


def test_a_failing_backend_is_skipped_and_the_others_results_are_written(tmp_path, tiny_ckpt, tiny_engines,
                                                                        monkeypatch, capsys):
    """Issue 19, item 4: a server that does not load (ModelLoadError, a usage error: it used to end the run with exit
    2 and no --out folder) and a backend that fails halfway are each skipped with the reason; the figures finished
    before are written."""
    from vilex.benchmarks import suite, triton
    from vilex.cli import main
    from vilex.serving.server import ModelLoadError

    def end_to_end(bench, images, settings):
        if bench.name == "onnxruntime":
            raise RuntimeError("onnxruntime ran out of memory")
        return real_end_to_end(bench, images, settings)

    def no_server(*args, **kwargs):
        raise ModelLoadError("tritonserver could not load 1 model(s): vilex_reconstruct (version 1): Internal")
        yield  # a generator, as the real one

    real_end_to_end = suite.run_end_to_end
    monkeypatch.setattr(suite, "run_end_to_end", end_to_end)
    monkeypatch.setattr(triton, "measure_triton", no_server)
    code = main(["bench", str(tiny_ckpt), "--engines", str(tiny_engines), "--backends", "torch,onnxruntime,triton",
                 "--stages", "text_encoder", "--batch-sizes", "1", "--steps", "1", "--window", "0.05",
                 "--out", str(tmp_path / "b")])
    assert code == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = {(r["backend"], r["kind"]) for r in data["results"]}
    assert rows == {("torch", "stage"), ("torch", "e2e"), ("onnxruntime", "stage")}  # onnxruntime's stage finished
    assert data["skipped"]["onnxruntime"] == "failed after 1 measurement: RuntimeError: onnxruntime ran out of memory"
    assert data["skipped"]["triton"].startswith("failed: ModelLoadError: tritonserver could not load 1 model(s)")
    assert "skipped triton: failed: ModelLoadError" in out and (tmp_path / "b" / "results.md").is_file()
    assert "triton (failed: ModelLoadError" in (tmp_path / "b" / "results.md").read_text()


def test_bench_rejects_unknown_backend(capsys):
    from vilex.cli import main

    assert main(["bench", "--backends", "torch,cuda-magic"]) == 2
    assert "--backends must be a comma-separated list from" in capsys.readouterr().err


@pytest.mark.triton
def test_bench_triton_sweep_on_tiny(tmp_path, tiny_ckpt, capsys):
    from vilex.cli import main

    steps = 2
    code = main(["bench", str(tiny_ckpt), "--backends", "onnxruntime,triton", "--stages", "", "--steps", str(steps),
                 "--concurrency", "1,2", "--unet", "local", "--compare", "--out", str(tmp_path / "b")])
    assert code == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    served = {(r["backend"], r["stats"]["concurrency"]): r for r in data["results"] if r["backend"].startswith("triton")}
    # One placement here (a server each); tests/test_serving.py reads the same account from a bls server.
    assert set(served) == {(f"triton-local-{protocol}", c) for protocol in ("http", "grpc") for c in (1, 2)}
    assert "triton-local-http/onnxruntime (in-process)" in capsys.readouterr().out
    assert (tmp_path / "b" / "triton_throughput_vs_concurrency.png").is_file()
    # The server's own account of each measurement: every execution of the pipeline model (one request, or
    # several batched) ran `steps` UNet calls (the guidance branches and batched images go as one call), as
    # `unet` model requests with bls and as runs of the pipeline's local UNet with local; a request's time is at
    # least its stages' runs.
    for (backend, _), row in served.items():
        server = row["server"]
        placement = backend.split("-")[1]
        assert server["unet_placement"] == placement and server["requests"] >= 2
        assert server["unet_calls"] == steps * server["executions"], server
        assert server["pipeline_ms"] >= server["stages_ms"] > server["unet_ms"] > 0, server
        assert ("unet_queue_ms" in server) == (placement == "bls")
        assert set(server["overhead_ms_by_steps"]) == {str(steps), str(2 * steps)}  # JSON keys
