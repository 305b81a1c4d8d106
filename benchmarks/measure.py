"""Measuring latency and throughput until the result is stable, as perf_analyzer does.

A measurement runs in windows (at least `window_s` seconds and `min_calls` calls each). It is stable
when the last `stable_windows` windows agree: each window's throughput and p50 latency are within
`stability` (a fraction) of those windows' mean. Statistics are taken over those last windows. If no
stable run is reached after `max_windows`, the last windows are reported with `stable: false`.

`watch` (isolation.Isolation.watch) is entered around the measured windows, after the warm-up, and what it
records (what else of the run was alive meanwhile) is kept in `Stats.extra["alongside"]`.

Concurrency > 1 runs that many threads, each with its own callable (`make_call()` is called once per
thread: tritonclient clients must not be shared between threads), all issuing calls back to back.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class Stats:
    items_per_call: int
    concurrency: int
    calls: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # items (images) per second
    windows: int
    stable: bool
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class PeakMemory:
    """Samples this process's RSS (and GPU memory in use, when torch sees a GPU) in a background thread."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_gpu = None
        self._stop = threading.Event()

    def _sample(self):
        try:
            import psutil

            rss = psutil.Process().memory_info
        except ImportError:  # the GPU image may lack psutil: fall back to the process's lifetime peak
            import resource

            self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        import torch

        self._gpu = torch.cuda.is_available()
        if self._gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self._gpu_base_used = total - free
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        if self._gpu:
            # torch's allocator peak covers PyTorch backends; device-wide use covers onnxruntime/TensorRT.
            free, total = torch.cuda.mem_get_info()
            self.peak_gpu = max(torch.cuda.max_memory_allocated(), total - free)
        return False


def measure(
    make_call: Callable[[], Callable[[], object]],
    items_per_call: int,
    concurrency: int = 1,
    warmup_calls: int = 2,
    window_s: float = 1.0,
    min_calls: int = 3,
    stability: float = 0.10,
    stable_windows: int = 3,
    max_windows: int = 8,
    sync: Callable[[], None] | None = None,
    watch: contextlib.AbstractContextManager | None = None,
) -> Stats:
    """Measure `make_call()()` until stable; `sync` (e.g. torch.cuda.synchronize) ends each call.

    With concurrency > 1 each worker thread calls make_call() itself and keeps its callable for the
    whole measurement: a tritonclient client then lives and dies in one thread, as it must.
    """

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        if sync is not None:
            sync()
        return time.perf_counter() - start

    per_thread = max(1, -(-min_calls // concurrency))  # calls each thread makes at least, per window
    windows: list[tuple[list[float], float]] = []  # (latencies, elapsed)
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    state = {"deadline": 0.0, "stop": False, "interrupted": False}
    start_window = threading.Barrier(concurrency + 1)
    end_window = threading.Barrier(concurrency + 1)

    def run_window(call) -> None:
        done = 0
        while time.perf_counter() < state["deadline"] or done < per_thread:
            latency = timed(call)
            with lock:
                latencies.append(latency)
            done += 1

    def worker() -> None:
        try:
            call = make_call()
            for _ in range(warmup_calls):
                timed(call)
        except BaseException as error:  # re-raised in the measuring thread
            errors.append(error)
        while True:
            try:
                start_window.wait()
                if state["stop"] or errors:
                    return
                try:
                    run_window(call)
                except BaseException as error:
                    errors.append(error)
                end_window.wait()
            except threading.BrokenBarrierError:  # the measuring thread gave up after an error
                return

    if concurrency == 1:
        call = make_call()
        for _ in range(warmup_calls):
            timed(call)
    else:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for thread in threads:
            thread.start()

    with PeakMemory() as memory, (watch or contextlib.nullcontext()) as alongside:
        try:
            while len(windows) < max_windows:
                latencies.clear()
                start = time.perf_counter()
                state["deadline"] = start + window_s
                if concurrency == 1:
                    run_window(call)
                else:
                    start_window.wait()
                    if errors:
                        break
                    end_window.wait()
                if errors:
                    break
                windows.append((list(latencies), time.perf_counter() - start))
                if len(windows) >= stable_windows and _agree(windows[-stable_windows:], items_per_call, stability):
                    break
        except BaseException:
            # Ctrl-C or SIGTERM (vilex bench turns it into KeyboardInterrupt): workers may be waiting at a
            # barrier for this thread, which will not come; break the barriers so they end and the run can stop
            # its server.
            state["interrupted"] = True
            raise
        finally:
            if concurrency > 1:
                state["stop"] = True
                if not errors and not state["interrupted"]:
                    start_window.wait()
                else:
                    start_window.abort()
                    end_window.abort()
                for thread in threads:
                    thread.join()
    if errors:
        raise errors[0]

    last = windows[-stable_windows:]
    all_latencies = sorted(x for lat, _ in last for x in lat)
    elapsed = sum(e for _, e in last)
    ms = [x * 1000 for x in all_latencies]
    return Stats(
        items_per_call=items_per_call, concurrency=concurrency, calls=len(ms),
        mean_ms=statistics.fmean(ms), p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90),
        p95_ms=percentile(ms, 95), p99_ms=percentile(ms, 99),
        throughput=len(ms) * items_per_call / elapsed, windows=len(windows),
        stable=len(windows) >= stable_windows and _agree(last, items_per_call, stability),
        peak_rss_mb=memory.peak_rss / 2**20,
        peak_gpu_mb=None if memory.peak_gpu is None else memory.peak_gpu / 2**20,
        extra={} if alongside is None else {"alongside": alongside},
    )


def _agree(windows, items_per_call: int, stability: float) -> bool:
    throughputs = [len(lat) * items_per_call / elapsed for lat, elapsed in windows]
    medians = [statistics.median(lat) for lat, _ in windows]
    return all(_within(values, stability) for values in (throughputs, medians))


def _within(values: list[float], fraction: float) -> bool:
    mean = statistics.fmean(values)
    return all(abs(v - mean) <= fraction * mean for v in values)
