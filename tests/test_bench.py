"""Benchmark machinery: percentiles, stability windows, reports, and a short real run on tiny."""

import json
import time

import numpy as np
import pytest

from vilex.benchmarks.measure import measure, percentile
from vilex.benchmarks.report import markdown, ratios


def test_percentile_matches_numpy():
    values = sorted(np.random.default_rng(0).random(101).tolist())
    for q in (50, 90, 95, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_measure_steady_call_is_stable():
    stats = measure(lambda: (lambda: time.sleep(0.01)), items_per_call=2, window_s=0.1, stability=0.5)
    assert stats.stable and stats.windows >= 3
    assert 9 <= stats.p50_ms <= 30  # a 10 ms sleep, plus scheduling noise on a busy machine
    assert stats.throughput == pytest.approx(2 / (stats.mean_ms / 1000), rel=0.3)
    assert stats.p50_ms <= stats.p90_ms <= stats.p99_ms


def test_measure_unsteady_call_is_not_stable():
    durations = iter([0.001, 0.03] * 1000)
    stats = measure(lambda: (lambda: time.sleep(next(durations))), items_per_call=1, window_s=0.0, min_calls=1,
                    stability=0.05, max_windows=6)
    assert not stats.stable and stats.windows == 6


def test_measure_concurrency_uses_one_callable_per_thread():
    made = []

    def make_call():
        made.append(1)
        return lambda: time.sleep(0.005)

    stats = measure(make_call, items_per_call=1, concurrency=4, window_s=0.05, stability=0.9)
    assert len(made) == 4 and stats.concurrency == 4


def test_report_tables_and_ratios():
    def row(backend, p50, kind="stage"):
        stats = dict(items_per_call=1, concurrency=1, calls=3, mean_ms=p50, p50_ms=p50, p90_ms=p50, p95_ms=p50,
                     p99_ms=p50, throughput=1000 / p50, windows=3, stable=True, peak_rss_mb=100.0, peak_gpu_mb=None)
        return {"backend": backend, "kind": kind, "stage": "unet" if kind == "stage" else None, "batch": 1,
                "steps": 20, "num_tokens": 16, "flops": 2e9, "fraction_of_peak": 0.1, "stats": stats}

    report = {"date": "2026-01-01", "command": "vilex bench", "checkpoint": "ck", "peaks": {"cpu fp32": "x"},
              "skipped": {"tensorrt": "not installed"},
              "environment": {"cpu": {"model": "CPU", "cores": 2}, "gpu": None},
              "results": [row("torch", 100.0), row("onnxruntime", 50.0), row("onnxruntime", 1000.0, "e2e"),
                          row("triton-http", 1050.0, "e2e")]}
    table = markdown(report)
    assert "| unet | onnxruntime | 1 | 1 | 50.0 |" in table and "tensorrt (not installed)" in table
    lines = ratios(report)
    assert any("onnxruntime/torch = 0.50x latency (2.00x speed-up)" in line for line in lines)
    assert any("triton-http/onnxruntime (in-process) = 1.05x" in line for line in lines)


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
    assert "tensorrt" in data["skipped"]  # no TensorRT on CPU machines: skipped with the reason
    assert all(r["flops"] > 0 for r in data["results"])
    assert (tmp_path / "b" / "latency_vs_batch.png").is_file() and (tmp_path / "b" / "results.md").is_file()
    assert data["environment"]["packages"]["torch"]


def test_bench_rejects_unknown_backend(capsys):
    from vilex.cli import main

    assert main(["bench", "--backends", "torch,cuda-magic"]) == 2
    assert "--backends must be a comma-separated list from" in capsys.readouterr().err


@pytest.mark.triton
def test_bench_triton_sweep_on_tiny(tmp_path, tiny_ckpt, capsys):
    from vilex.cli import main

    code = main(["bench", str(tiny_ckpt), "--backends", "onnxruntime,triton", "--stages", "", "--steps", "1",
                 "--concurrency", "1,2", "--compare", "--out", str(tmp_path / "b")])
    assert code == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    served = {(r["backend"], r["stats"]["concurrency"]) for r in data["results"] if r["backend"].startswith("triton")}
    assert served == {("triton-http", 1), ("triton-http", 2), ("triton-grpc", 1), ("triton-grpc", 2)}
    assert "triton-http/onnxruntime (in-process)" in capsys.readouterr().out
    assert (tmp_path / "b" / "triton_throughput_vs_concurrency.png").is_file()
