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


def test_an_interrupted_concurrent_measurement_ends():
    """Ctrl-C (or SIGTERM, which vilex bench turns into it) while worker threads measure: the measuring thread
    used to wait at a barrier for workers that were waiting for it (seen: hung until killed), so the server of
    the run was never stopped. Now the interrupt comes out, and the workers end."""
    import faulthandler
    import os
    import signal
    import threading

    sent, calls, before_threads = threading.Event(), [], threading.active_count()

    def make_call():
        def call():
            time.sleep(0.02)
            if threading.current_thread() is not threading.main_thread() and not sent.is_set():
                calls.append(1)
                if len(calls) > 6:  # past the warm-up, inside the measured windows
                    sent.set()
                    os.kill(os.getpid(), signal.SIGINT)
        return call

    # A background job of a non-interactive shell (a CI step run with `&`, `nohup ... &`) starts with SIGINT
    # ignored: Python's own handler is put in for the test, as an interactive terminal would have it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the test run instead of blocking CI
    try:
        with pytest.raises(KeyboardInterrupt):
            measure(make_call, items_per_call=1, concurrency=2, window_s=0.2, stability=1e-6, max_windows=1000)
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGINT, previous)
    assert sent.is_set() and threading.active_count() == before_threads


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

    def end_to_end(bench, images, settings, **kwargs):
        if bench.name == "onnxruntime":
            raise RuntimeError("onnxruntime ran out of memory")
        return real_end_to_end(bench, images, settings, **kwargs)

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


def test_sigterm_ends_a_bench_run_as_ctrl_c_does(monkeypatch):
    """SIGTERM (`timeout`) used to end vilex bench on the spot, leaving the tritonserver it had started running
    (seen: reparented to init with its 7 stubs). Now it raises KeyboardInterrupt, so every `with` and `finally` on
    the way out runs, and the handlers are put back afterwards."""
    import os
    import signal

    from vilex.benchmarks import suite
    from vilex.cli import main

    def run_bench(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal arrives long before this ends
        raise AssertionError("SIGTERM did not interrupt the run")

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    monkeypatch.setattr(suite, "run_bench", run_bench)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        main(["bench", "--backends", "torch"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_the_server_sweep_is_closed_as_soon_as_the_run_leaves_it(tmp_path, tiny_ckpt, tiny_engines, monkeypatch):
    """The Triton sweep is a generator holding the server: when the run leaves it early (an error here; Ctrl-C or
    SIGTERM alike), it is closed then, stopping the server before the report is written, not when the generator
    happens to be collected."""
    from vilex.benchmarks import report, suite, triton
    from vilex.cli import main

    events = []

    def sweep(*args, **kwargs):
        try:
            yield ("a row the suite cannot unpack",)
        finally:
            events.append("server stopped")

    def write(data, out):
        events.append("report written")
        return real_write(data, out)

    real_write = report.write
    monkeypatch.setattr(triton, "measure_triton", sweep)
    monkeypatch.setattr(report, "write", write)
    code = main(["bench", str(tiny_ckpt), "--engines", str(tiny_engines), "--backends", "triton", "--stages", "",
                 "--steps", "1", "--out", str(tmp_path / "b")])
    assert code == 0 and events == ["server stopped", "report written"]
    assert "ValueError" in json.loads((tmp_path / "b" / "results.json").read_text())["skipped"]["triton"]


def test_bench_rejects_unknown_backend(capsys):
    from vilex.cli import main

    assert main(["bench", "--backends", "torch,cuda-magic"]) == 2
    assert "--backends must be a comma-separated list from" in capsys.readouterr().err


def test_isolation_reports_what_is_beside_a_measurement():
    """The check behind every row's `alongside` (issue 20) can fail: a backend still referenced after its release,
    a process the run started and a thread a released backend left behind are each reported; a caller's own
    process from before the run and the measured server's processes are not."""
    import subprocess
    import threading

    from vilex.benchmarks.isolation import Isolation, problems
    from vilex.benchmarks.runner import BenchBackend

    class Session:  # stands in for an onnxruntime session
        pass

    class Backend:
        def __init__(self):
            self.sessions = {"unet": Session()}

    class Pipeline:
        def __init__(self):
            self.backend = Backend()

    def bench(name):
        return BenchBackend(name, Pipeline(), "fp32", None, "cpu")

    before_run = subprocess.Popen(["sleep", "60"])
    try:
        isolation = Isolation()
        isolation.loading("clean")
        assert isolation.release("clean", bench("clean")) == []
        with isolation.watch("next") as seen:
            pass
        assert seen["backends"] == [] and seen["processes"] == [] and seen["threads"] == 0 and not problems(seen)

        # A session someone still holds keeps its backend's name in every later row.
        kept = bench("kept")
        session = kept.pipeline.backend.sessions["unet"]
        isolation.loading("kept")
        assert isolation.release("kept", kept) == ["unet session"]
        # A thread that appeared while a backend was loaded and outlives its release.
        isolation.loading("threaded")
        stop, work, done = threading.Event(), threading.Event(), threading.Event()

        def worker():  # idle until asked, then 50 ms of CPU, as a pool thread woken beside a measurement would
            while not stop.is_set():
                if work.wait(0.01):
                    work.clear()
                    begun = time.thread_time()
                    while time.thread_time() - begun < 0.05:
                        pass
                    done.set()
        threading.Thread(target=worker, daemon=True).start()
        assert isolation.release("threaded", bench("threaded")) == []
        server = subprocess.Popen(["sleep", "60"])
        try:
            with isolation.watch("next") as seen:
                work.set()
                assert done.wait(120)
            with isolation.watch("triton", own_pids=(server.pid,)) as served:
                pass
        finally:
            stop.set()
            server.kill()
            server.wait()
        assert seen["backends"] == ["kept"] and seen["processes"] == [f"sleep (pid {server.pid})"]
        assert seen["threads"] == 1 and seen["threads_cpu_s"] >= 0.04  # the kernel counts in 10 ms ticks
        why = problems(seen)
        assert "measured while kept was still loaded" in why and f"measured beside sleep (pid {server.pid})" in why
        assert served["processes"] == []  # the measured server is the backend, not beside it
        # Left-behind threads make a row unsound once they used more than 2 % of a core meanwhile.
        assert problems({"threads": 1, "threads_cpu_s": 0.05, "wall_s": 1.0}) and \
            not problems({"threads": 1, "threads_cpu_s": 0.01, "wall_s": 1.0})
        del session
        assert isolation.alive() == []
    finally:
        before_run.kill()
        before_run.wait()


def test_a_row_measured_beside_something_is_unsound():
    row = stats_row("onnxruntime", 50.0)
    row["stats"]["extra"] = {"alongside": {"backends": [], "processes": ["tritonserver (pid 7)"], "threads": 0,
                                           "threads_cpu_s": 0.0, "wall_s": 1.0}}
    report = bench_report([stats_row("torch", 100.0), row])
    (found,) = comparisons(report)
    assert not found["stable"]
    assert "unet onnxruntime batch 1 conc 1: measured beside tritonserver (pid 7)" in found["problems"]
    assert "measured beside tritonserver (pid 7)" in markdown(report)


class RunState:
    """What exists in the benchmark's process while each measurement runs, read from inside it (right after its
    first call, when every session the call needs exists) with psutil and the garbage collector, independently of
    benchmarks/isolation.py. It keeps counts and ids only: a reference kept here would itself keep a backend alive."""

    def __init__(self):
        import weakref

        import onnxruntime as ort
        import psutil

        from vilex import ViLexPipeline

        self.session_type, self.pipeline_type = ort.InferenceSession, ViLexPipeline
        # Sessions, pipelines and processes of other tests (session fixtures: `vilex serve`) are not the run's.
        self.before = weakref.WeakSet(self.objects())
        self.processes_before = {c.pid for c in psutil.Process().children(recursive=True)}
        self.backend = None  # the BenchBackend measured in process, as load_backend returned it
        self.seen = []  # (backend name, snapshot) per measurement and client thread

    def objects(self) -> list:
        import gc
        import warnings

        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated `reduce_op` warns
            warnings.simplefilter("ignore", FutureWarning)
            return [o for o in gc.get_objects() if isinstance(o, (self.session_type, self.pipeline_type))]

    def snapshot(self, name: str) -> dict:
        import gc

        import psutil

        gc.collect()
        measured = self.backend.pipeline if name != "triton" else None
        own = list(getattr(getattr(measured, "backend", None), "sessions", {}).values())
        objects = [o for o in self.objects() if o not in self.before]
        sessions = [o for o in objects if isinstance(o, self.session_type)]
        pipelines = [o for o in objects if isinstance(o, self.pipeline_type)]
        children = [c for c in psutil.Process().children(recursive=True) if c.pid not in self.processes_before]
        return {"sessions": len(sessions), "other_sessions": sum(not any(s is o for o in own) for s in sessions),
                "pipelines": len(pipelines), "measured_pipeline": any(p is measured for p in pipelines),
                "children": [(c.pid, c.name()) for c in children],
                "threads": {t.id for t in psutil.Process().threads()}}

    def spy(self, real_measure, name_of):
        def measure(make_call, *args, **kwargs):
            def make_spied_call():
                call, taken = make_call(), []

                def spied():
                    result = call()
                    if not taken:
                        taken.append(1)
                        self.seen.append((name_of(), self.snapshot(name_of())))
                    return result
                return spied
            return real_measure(make_spied_call, *args, **kwargs)
        return measure


@pytest.fixture(scope="module")
def run_with_triton(tiny_ckpt, tiny_engines, tmp_path_factory):
    """One `vilex bench` on tiny with two in-process backends and Triton (one placement: a server each), its
    process state read inside every measurement; the tests below read it."""
    import contextlib
    import io

    from vilex.benchmarks import runner, suite, triton
    from vilex.cli import main

    out = tmp_path_factory.mktemp("bench-triton") / "b"
    state = RunState()
    real_load = suite.load_backend

    def load_backend(name, ckpt, engines):
        state.backend = real_load(name, ckpt, engines)
        return state.backend

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(suite, "load_backend", load_backend)
        patch.setattr(runner, "measure", state.spy(runner.measure, lambda: state.backend.name))
        patch.setattr(triton, "measure", state.spy(triton.measure, lambda: "triton"))
        code = main(["bench", str(tiny_ckpt), "--engines", str(tiny_engines), "--backends", "torch,onnxruntime,triton",
                     "--stages", "text_encoder", "--batch-sizes", "1", "--steps", str(TRITON_STEPS), "--window", "0.05",
                     "--concurrency", "1,2", "--unet", "local", "--compare", "--out", str(out)])
    assert code == 0, printed.getvalue()
    return json.loads((out / "results.json").read_text()), state, printed.getvalue(), out


TRITON_STEPS = 2


@pytest.mark.triton
def test_each_backend_is_measured_alone(run_with_triton):
    """Issue 20 saw in-process figures 35 % slower in runs that also measured triton. Whatever else is in a run,
    a backend is measured alone: while an in-process backend runs, no process of the run (no server, starting or
    running) and no pipeline or session but its own; while Triton runs, its own server only, no in-process
    backend's pipeline or sessions, and none of onnxruntime's intra-op threads."""
    data, state, _, _ = run_with_triton
    import psutil

    # One snapshot per measurement: text_encoder and end to end in process, then per protocol concurrency 1 (one
    # client thread) and 2 (two). Every in-process measurement comes before the server starts.
    assert [name for name, _ in state.seen] == ["torch"] * 2 + ["onnxruntime"] * 2 + ["triton"] * 6
    started = {name: set().union(*(s["threads"] for n, s in state.seen if n == name))
               for name in ("torch", "onnxruntime")}
    for name, seen in state.seen:
        if name == "triton":
            assert seen["sessions"] == 0 and seen["pipelines"] == 0  # every in-process backend is gone
            # Only the bench's own server: one tritonserver and its Python-backend stubs.
            assert sorted({n for _, n in seen["children"]}) == ["triton_python_backend_stub", "tritonserver"]
            assert sum(n == "tritonserver" for _, n in seen["children"]) == 1
            # onnxruntime's intra-op threads went with its sessions.
            assert not (started["onnxruntime"] - started["torch"]) & seen["threads"]
        else:
            assert seen["children"] == [], (name, seen["children"])  # no server, starting or running
            assert seen["pipelines"] == 1 and seen["measured_pipeline"], name  # its own pipeline only
            assert seen["other_sessions"] == 0 and (seen["sessions"] > 0) == (name == "onnxruntime"), (name, seen)
    # The run's own account (benchmarks/isolation.py) says the same of every row, so none is marked unsound for it.
    for row in data["results"]:
        alongside = row["stats"]["extra"]["alongside"]
        assert alongside["backends"] == [] and alongside["processes"] == [], row
    assert not any("measured beside" in why or "still loaded" in why
                   for c in data["comparisons"] for why in c["problems"])
    # Nothing of the run outlives it.
    server_pids = {pid for name, s in state.seen if name == "triton" for pid, _ in s["children"]}
    assert not [pid for pid in server_pids
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.triton
def test_bench_triton_sweep_on_tiny(run_with_triton):
    data, _, printed, out = run_with_triton
    steps = TRITON_STEPS
    served = {(r["backend"], r["stats"]["concurrency"]): r for r in data["results"] if r["backend"].startswith("triton")}
    # One placement here (a server each); tests/test_serving.py reads the same account from a bls server.
    assert set(served) == {(f"triton-local-{protocol}", c) for protocol in ("http", "grpc") for c in (1, 2)}
    assert "triton-local-http/onnxruntime (in-process)" in printed
    assert (out / "triton_throughput_vs_concurrency.png").is_file()
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
