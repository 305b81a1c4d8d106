"""What else of the benchmark's own is alive while a backend is measured, checked instead of assumed.

A figure stands for its backend only when nothing else of the run competes with it for the cores. So the
run holds one backend at a time: it loads a backend, measures it and releases it (its pipeline, its
onnxruntime sessions and their intra-op thread pools) before the next one loads, and Triton's server is
started only after the last in-process backend is gone, and stopped before anything else is measured
(benchmarks/suite.py). `Isolation` checks that this held for every measurement and says so in the row:

    backends     other backends of the run whose objects (pipeline, backend, sessions) are still alive
    processes    processes of the run other than the one measured (a tritonserver, its stubs, compile workers):
                 this process's descendants, less those it already had when the run began; processes_cpu_s is
                 the CPU they used meanwhile
    threads      threads a released backend left behind in this process, and the CPU they used meanwhile
    outside_cores  cores' worth of CPU that processes outside the run used during the measurement (another
                 job on the machine: not the benchmark's doing, but it distorts the figure all the same)

A row with another backend or process alongside, or with left-behind threads that used more than
`THREAD_CPU_LIMIT` of the measurement's wall time, is unsound (report.row_problems).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import weakref

try:  # the GPU image may lack psutil (as measure.PeakMemory allows): processes are then not checked
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency of the CPU install
    psutil = None

THREAD_CPU_LIMIT = 0.02  # left-behind threads may use this fraction of one core before a row is unsound


def _threads() -> dict[int, float]:
    """{thread id: CPU seconds} of this process's threads."""
    if psutil is None:
        return {thread.native_id: 0.0 for thread in threading.enumerate()}
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def _descendants() -> set[int]:
    return set() if psutil is None else {child.pid for child in psutil.Process().children(recursive=True)}


def _children(exclude: set[int]) -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds)} of this process's descendants, leaving out `exclude` and their descendants."""
    if psutil is None:
        return {}
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in exclude or any(p.pid in exclude for p in child.parents()):
                continue
            times = child.cpu_times()
            found[child.pid] = (child.name(), times.user + times.system)
        except psutil.Error:  # ended meanwhile
            continue
    return found


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot."""
    if psutil is None:
        return None
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _run_cpu_s(exclude: set[int]) -> float:
    """CPU seconds this process and its descendants (the run's own processes, less `exclude`) have used."""
    total = sum(os.times()[:2])
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # ended meanwhile
            pass
    return total


class Isolation:
    """The backends a run has loaded and released; `watch(name)` records what was alive beside `name`."""

    def __init__(self):
        # Processes this process already had (a caller's own server): not the run's, left out of `processes`.
        self._before_run = _descendants()
        self._held: dict[str, list[weakref.ref]] = {}  # backend -> what it holds, alive until released
        self._threads_before: dict[str, set[int]] = {}
        self.left_threads: dict[str, set[int]] = {}  # backend -> its threads still alive after release

    def loading(self, name: str) -> None:
        """Call before a backend loads: threads that appear from here to its release are its own."""
        self._threads_before[name] = set(_threads())

    def release(self, name: str, bench) -> list[str]:
        """Drop the backend's pipeline and everything it holds, then say what of it is still alive (nothing,
        when the release worked: the names of what is, otherwise)."""
        refs = _references(bench.pipeline)
        bench.pipeline = None  # the run's last strong reference
        gc.collect()
        self._held[name] = list(refs.values())
        before = self._threads_before.pop(name, None)
        if before is not None:
            left = set(_threads()) - before
            if left:
                self.left_threads[name] = left
        return [what for what, ref in refs.items() if ref() is not None]

    def alive(self) -> list[str]:
        """Backends with anything still alive (every one should be released by the time the next loads)."""
        return [name for name, refs in self._held.items() if any(ref() is not None for ref in refs)]

    @contextlib.contextmanager
    def watch(self, name: str, own_pids: tuple[int, ...] = ()):
        """Around one measurement of `name`: yields a dict filled in on exit (see the module docstring).
        own_pids: the processes that are the backend measured (Triton's server), with their descendants."""
        record: dict = {}
        exclude = set(own_pids) | self._before_run
        foreign = set().union(*self.left_threads.values()) if self.left_threads else set()
        children = _children(exclude)
        threads = _threads()
        busy = _busy_cpu_s()
        run = _run_cpu_s(self._before_run) if busy is not None else None
        start = time.perf_counter()
        try:
            yield record
        finally:
            wall = max(time.perf_counter() - start, 1e-9)
            children_after = _children(exclude)
            threads_after = _threads()
            left = [t for t in foreign if t in threads_after]
            thread_cpu = sum(threads_after[t] - threads.get(t, 0.0) for t in left)
            processes = {**children, **children_after}
            record.update(
                backends=[b for b in self.alive() if b != name],
                processes=[f"{processes[pid][0]} (pid {pid})" for pid in sorted(processes)],
                processes_cpu_s=round(sum(children_after[p][1] - children.get(p, ("", 0.0))[1]
                                          for p in children_after), 3),
                threads=len(left), threads_cpu_s=round(thread_cpu, 3), wall_s=round(wall, 3))
            if busy is not None:
                outside = (_busy_cpu_s() - busy) - (_run_cpu_s(self._before_run) - run)
                record["outside_cores"] = round(max(outside, 0.0) / wall, 2)


def problems(alongside: dict) -> list[str]:
    """Why a measurement with this record is unsound (empty when nothing of the run was beside it)."""
    why = []
    if alongside.get("backends"):
        why.append(f"measured while {', '.join(alongside['backends'])} was still loaded")
    if alongside.get("processes"):
        why.append(f"measured beside {', '.join(alongside['processes'])}")
    if alongside.get("threads_cpu_s", 0.0) > THREAD_CPU_LIMIT * alongside.get("wall_s", float("inf")):
        why.append(f"{alongside['threads']} thread(s) left by a released backend used "
                   f"{alongside['threads_cpu_s']:.2f} s of CPU during it")
    return why


def _references(pipeline) -> dict[str, weakref.ref]:
    """Weak references to a pipeline, its backend and the backend's onnxruntime sessions (in a function of its
    own, so that no local variable of the caller keeps one of them alive)."""
    backend = getattr(pipeline, "backend", None)
    held = {"pipeline": pipeline, "backend": backend}
    for owner in (backend, getattr(backend, "inner", None)):  # TimedBackend and CudaGraphBackend wrap another
        for graph, session in (getattr(owner, "sessions", None) or {}).items():
            held[f"{graph} session"] = session
    return {what: weakref.ref(obj) for what, obj in held.items() if obj is not None and _weakrefable(obj)}


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True
