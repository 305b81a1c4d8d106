"""Is a served tritonserver able to serve? The watchdog of `vilex serve` and the readiness endpoint it owns.

Why vilex needs its own: when a Python-backend stub dies (`kill -9`, the OOM killer), tritonserver 2.51
answers every request that reaches the model with 500 "Stub process 'unet_0_0' is not healthy", while
its own `/v2/health/ready` and the model's ready endpoint keep answering 200 (the dead stub stays a
zombie under tritonserver, which never restarts it). A load balancer that trusts those endpoints keeps
sending traffic to a server that can serve nothing.

So:
* `stub_processes` lists the server's stubs (one per model instance) when it becomes ready, and
  `dead_stubs` says which of them have died since;
* `Watchdog` checks every second and has the server restarted (`TritonServer.restart`) when a stub died
  or tritonserver exited;
* `HealthEndpoint` serves `GET /ready` (200 only while every stub seen at start is alive and no restart is
  under way; 503 with the reason otherwise) and `GET /live` (200 while `vilex serve` runs): what a load
  balancer or a Kubernetes readinessProbe should use instead of tritonserver's own endpoints.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STUB_NAME = "triton_python_backend_stub"
CHECK_INTERVAL_S = 1.0


# ---- the stubs ---------------------------------------------------------------------------------------------
def stub_processes(server_pid: int) -> dict[str, "psutil.Process"]:
    """{model instance name ('unet_0_0'): process} of the Python-backend stubs tritonserver `server_pid` started.

    The stub's command line is `stub MODEL.py SHM_REGION SHM_SIZE SHM_GROWTH PARENT_PID BACKEND_DIR IPC_SIZE
    INSTANCE_NAME RUNTIME` (python_backend's stub_launcher.cc); the instance name is the one Triton's
    error messages use.
    """
    import psutil

    stubs = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return stubs
    for child in children:
        try:
            command = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if command and command[0].endswith(STUB_NAME):
            stubs[command[-2] if len(command) >= 10 else command[1]] = child
    return stubs


def dead_stubs(stubs: dict[str, "psutil.Process"]) -> list[str]:
    """Names of the stubs that are gone or zombies (a killed stub stays a zombie: tritonserver does not reap it).
    `is_running` also compares the start time, so a reused pid does not pass for the stub."""
    import psutil

    dead = []
    for name, process in stubs.items():
        try:
            alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            dead.append(f"{name} (pid {process.pid})")
    return dead


# ---- readiness ---------------------------------------------------------------------------------------------
class Readiness:
    """What `/ready` says: thread-safe, set by the server's start, stop and restarts."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ready = False
        self.reason = "starting"
        self.restarts = 0

    def set_ready(self) -> None:
        with self._lock:
            self.ready, self.reason = True, None

    def set_not_ready(self, reason: str) -> None:
        with self._lock:
            self.ready, self.reason = False, reason

    def count_restart(self) -> None:
        with self._lock:
            self.restarts += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"ready": self.ready, "reason": self.reason, "restarts": self.restarts}


class Watchdog:
    """A thread that checks `server` every `interval_s` and has it restarted when it cannot serve.

    server: a started TritonServer; it provides `health_problem()` (None, or why it cannot serve),
    `restart(reason)` and `give_up(reason)`. Restarts are bounded: after `max_restarts` within
    `window_s` the watchdog gives up (the server is stopped and `vilex serve` exits non-zero), so a
    stub that crashes on every start does not restart forever.
    """

    def __init__(self, server, interval_s: float = CHECK_INTERVAL_S, max_restarts: int = 5, window_s: float = 3600.0):
        self.server = server
        self.interval_s = interval_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._stop = threading.Event()
        self._restart_times: list[float] = []
        self._thread = threading.Thread(target=self._run, name="vilex-serve-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            problem = self.server.health_problem()
            if problem is None or self._stop.is_set():
                continue
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < self.window_s]
            if len(self._restart_times) >= self.max_restarts:
                self.server.give_up(f"{problem}; gave up after {len(self._restart_times)} restarts in "
                                    f"{self.window_s:.0f} s")
                return
            self._restart_times.append(now)
            if not self.server.restart(problem):
                return  # the restart failed (the server gave up) or the server is stopping


class HealthEndpoint:
    """`GET /ready` and `GET /live` on `address:port`, in a thread (port 0: a free port, see `.port`).

    /ready is computed when asked: the last state the server set (starting, restarting, stopped) and a fresh
    check of the stubs, so it turns 503 as soon as a stub is dead, not at the watchdog's next tick.
    """

    def __init__(self, server, address: str, port: int):
        readiness_of = server.readiness_report

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path == "/ready":
                    report = readiness_of()
                    self._send(200 if report["ready"] else 503, report)
                elif self.path == "/live":
                    self._send(200, {"live": True})
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}: use /ready or /live"})

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # probes every few seconds would flood stderr
                pass

        self._http = ThreadingHTTPServer((address, port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="vilex-serve-health", daemon=True)

    def start(self) -> "HealthEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()
