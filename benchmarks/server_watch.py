"""The server's footprint while `vilex stress` runs: RSS, open files and shared memory of tritonserver and
its Python-backend stubs, sampled with psutil (after Triton's L0_memory_growth).

The server is found by a port it listens on (the URL's), or given by pid. Its command line says the rest:
the other ports, the model repository, and the prefix of the Python backend's shared-memory files in
/dev/shm (`--backend-config=python,shm-region-prefix-name=...`; Triton's default prefix otherwise).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from vilex.errors import ViLexUsageError

STUB_NAME = "triton_python_backend_stub"
DEFAULT_SHM_PREFIX = "triton_python_backend_shm_region_"  # the Python backend's own default


def find_server(port: int) -> psutil.Process:
    """The tritonserver process listening on `port` (by its command line, then by its sockets)."""
    flags = (f"--http-port={port}", f"--grpc-port={port}")
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(Path(part).name == "tritonserver" for part in cmdline[:1]) and any(f in cmdline for f in flags):
            return process
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid)
    raise ViLexUsageError(f"no tritonserver on this host listens on port {port}; pass --server-pid")


def server_flag(process: psutil.Process, name: str) -> str | None:
    for part in process.cmdline():
        if part.startswith(f"--{name}="):
            return part.split("=", 1)[1]
    return None


def shm_prefix(process: psutil.Process) -> str:
    for part in process.cmdline():
        match = re.search(r"shm-region-prefix-name=([^,\s]+)", part)
        if match:
            return match.group(1)
    return DEFAULT_SHM_PREFIX


@dataclass
class Sample:
    t: float  # seconds since the watch started
    server_rss_mb: float
    stubs_rss_mb: float  # all Python-backend stubs together
    stubs: int
    fds: int  # open file descriptors of the server and the stubs
    shm_mb: float  # apparent size of the backend's /dev/shm files
    shm_resident_mb: float  # blocks actually used by them
    shm_files: int
    server_alive: bool

    @property
    def total_rss_mb(self) -> float:
        return self.server_rss_mb + self.stubs_rss_mb


class ServerWatch:
    """Samples a tritonserver and its stubs; `sample()` once, or `start()`/`stop()` a sampling thread."""

    def __init__(self, process: psutil.Process, interval_s: float = 1.0):
        self.process = process
        self.prefix = shm_prefix(process)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stubs(self) -> list[psutil.Process]:
        try:
            return [c for c in self.process.children(recursive=True) if c.name() == STUB_NAME]
        except psutil.Error:
            return []

    def sample(self) -> Sample:
        alive = self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        server_rss = fds = 0
        stubs_rss = 0
        stubs = self.stubs() if alive else []
        for process in ([self.process] if alive else []) + stubs:
            try:
                rss, n = process.memory_info().rss, process.num_fds()
            except psutil.Error:
                continue
            fds += n
            if process is self.process:
                server_rss = rss
            else:
                stubs_rss += rss
        size = resident = files = 0
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith(self.prefix):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                size, resident, files = size + stat.st_size, resident + stat.st_blocks * 512, files + 1
        sample = Sample(round(time.monotonic() - self._t0, 2), server_rss / 2**20, stubs_rss / 2**20, len(stubs), fds,
                        size / 2**20, resident / 2**20, files, alive)
        self.samples.append(sample)
        return sample

    def start(self) -> "ServerWatch":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="server-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def as_dict(sample: Sample) -> dict:
    return {**asdict(sample), "total_rss_mb": sample.total_rss_mb}
