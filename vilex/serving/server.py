"""`vilex serve`: a real tritonserver on a model repository, started, waited for and stopped cleanly.

Two ways to get a server:

* The `tritonserver` binary inside the `nvidia-pytriton` wheel (server 2.51, Python backend only), for
  python-ort repositories on any Linux host. It needs a little set-up (`TritonServer.start`):
  1. `backends/` is copied to a private workspace and the Python backend stub for this interpreter's
     version is put into `backends/python/` (the wheel keeps the stubs apart; site-packages stays read-only);
  2. the stub links libpython and CUDA's runtime from the wheel: LD_LIBRARY_PATH gets a folder with
     this interpreter's own libpython (so the stub runs the same Python build as this environment) and
     `nvidia_pytriton.libs`;
  3. the stub's interpreter is isolated (it ignores PYTHONPATH and sees the base installation's
     site-packages): VILEX_SITE_PACKAGES names this environment's site-packages, which every model.py
     puts first on sys.path before importing numpy (see triton_repo/pipeline_model.py and onnxruntime_model.py);
  4. tritonserver, and so every stub, runs in an empty folder of the workspace: the stub's interpreter puts
     its working directory on sys.path, where a user's `triton/` folder (the README's own layout) would
     shadow the `triton` package torch imports ("module 'triton' has no attribute 'language'").
* NVIDIA's container (onnxruntime and tensorrt repositories on GPU hosts): `docker_command` prints the
  `docker run ... tritonserver ...` line with the same flags; the image needs vilex installed for the
  pipeline models.

Secure defaults: listen on 127.0.0.1 only; model control mode "none" (no loading or unloading over the
network); the model-repository, model-config, shared-memory, trace and logging APIs restricted to callers
that send a random key (or VILEX_TRITON_ADMIN_KEY when set) in the header `vilex-admin-key` over HTTP, and
in the metadata `triton-grpc-protocol-vilex-admin-key` over gRPC (Triton adds that prefix). A random key
is written to `admin_key_path(http port)` ($VILEX_CACHE/serve/, mode 0600) once the server is ready, for as
long as it runs, and removed only by the server that wrote it (and only while it still holds that server's key).
tritonserver takes the key on its command line: any local user can read it with `ps`.

Ports: a port another process listens on is a usage error naming it (`check_ports_free`, before anything
starts). "Ready" means our own tritonserver listens on its HTTP, gRPC and metrics ports and answers ready:
another server on the same port (started between the check and the bind) answers the health URL too.

Health (health.py): tritonserver keeps answering "ready" after a Python-backend stub died, while every
request to that model fails. With `watchdog=True` (the default) a thread checks the stubs every second
and restarts the whole tritonserver on the same ports when one died or the server exited (model control
mode "none" cannot reload one model, and opening the repository API to do so would widen what the admin
key can do); `readiness_report()`, served as `GET /ready` on `health_port`, is what a load balancer
should ask.

Stopping sends SIGTERM (tritonserver unloads its models and the stubs exit), waits, and only then kills
the server's process group; the workspace and the Python backend's shared-memory regions are removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError

# Everything but health, metadata, inference and statistics (tritonserver 2.51's categories). trace and
# logging change server-wide settings (trace files written where the caller says, log verbosity).
RESTRICTED_APIS = "model-repository,model-config,shared-memory,trace,logging"
ADMIN_HEADER = "vilex-admin-key"
ADMIN_KEY_ENV = "VILEX_TRITON_ADMIN_KEY"
# NVIDIA's container with the same server as the wheel's binary (2.51.0 is release 24.10).
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
EXIT_TIMEOUT_S = 30  # tritonserver's own wait for in-flight requests on shutdown
# A restart stops a server that cannot serve: in-flight requests of healthy models get this long.
RESTART_GRACE_S = 10


class ServerError(RuntimeError):
    """tritonserver did not start, or stopped on its own."""


class ModelLoadError(ServerError, ViLexUsageError):
    """A model of the repository did not load (a corrupt or truncated graph, a missing file): the message
    names each model and the loader's error, which names the file. A usage error: DIR is the caller's."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        """Three ports the OS reports free now (for tests and `--http-port 0`)."""
        return cls(*free_ports(3))


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pytriton_dir() -> Path:
    """`pytriton/tritonserver` in site-packages (the wheel `nvidia-pytriton`)."""
    try:
        import pytriton
    except ImportError:
        raise ViLexUsageError("no tritonserver: install nvidia-pytriton (pip install 'vilex[serve]'), or run "
                              "NVIDIA's container (vilex serve DIR --docker prints the command)") from None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def server_flags(repository: Path, ports: Ports, admin_key: str, address: str) -> list[str]:
    """tritonserver flags shared by the local server and the container command."""
    restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"
    return [
        f"--model-repository={repository}",
        "--model-control-mode=none",
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--http-address={address}", f"--http-port={ports.http}",
        f"--grpc-address={address}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={address}", f"--metrics-port={ports.metrics}",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]


def docker_command(repository: str | os.PathLike, ports: Ports = Ports(), image: str = CONTAINER_IMAGE) -> list[str]:
    """The `docker run` line for NVIDIA's Triton container on a GPU host (ports published on localhost)."""
    repository = Path(repository).resolve()
    return ["docker", "run", "--rm", "--gpus=all", "--shm-size=1g",
            f"-p=127.0.0.1:{ports.http}:8000", f"-p=127.0.0.1:{ports.grpc}:8001", f"-p=127.0.0.1:{ports.metrics}:8002",
            f"-e={ADMIN_KEY_ENV}", f"-v={repository}:/models:ro", image,
            "sh", "-c", "exec tritonserver " + " ".join(
                server_flags(Path("/models"), Ports(), f"${{{ADMIN_KEY_ENV}:?set {ADMIN_KEY_ENV}}}", "0.0.0.0"))]


class TritonServer:
    """A tritonserver process on `repository` (from the nvidia-pytriton wheel). Use as a context manager,
    or call start() and stop().

    address: where HTTP, gRPC, metrics and the health endpoint listen (127.0.0.1: this host only).
    log: a file for the server's log (default: in the private workspace, removed by stop()).
    watchdog: restart tritonserver when a stub dies or the server exits (see health.py); `wait()` then
        returns only when the server is stopped or the watchdog gave up.
    health_port: serve `GET /ready` and `GET /live` on this port (0: a free one; None: no endpoint).
    """

    def __init__(self, repository: str | os.PathLike, ports: Ports | None = None, address: str = "127.0.0.1",
                 log: str | os.PathLike | None = None, admin_key: str | None = None, verbose: bool = False,
                 watchdog: bool = True, health_port: int | None = None):
        from .health import Readiness
        from .repository import read_repository

        self.repository = Path(repository).resolve()
        self.info = read_repository(self.repository)
        if self.info["platform"] != "python-ort":
            raise ViLexUsageError(
                f"DIR '{repository}' was made with --platform {self.info['platform']}, which the tritonserver in "
                f"nvidia-pytriton cannot run (it has only the Python backend). Run NVIDIA's container on a GPU host: "
                f"`vilex serve {repository} --docker` prints the command")
        self.ports = ports or Ports()
        self.address = address
        given_key = admin_key or os.environ.get(ADMIN_KEY_ENV)
        self.admin_key = given_key or secrets.token_urlsafe(24)
        # A key made here is written where its user can read it; a given one the caller already has.
        self.admin_key_file: Path | None = None if given_key else admin_key_path(self.ports.http)
        self.verbose = verbose
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen | None = None  # the running tritonserver (a new one after a restart)
        self.workspace: Path | None = None
        self.shm_prefix = f"vilex-{secrets.token_hex(4)}-"
        self.stubs: dict = {}  # model instance -> psutil.Process, as seen when the server became ready
        self.readiness = Readiness()
        self.use_watchdog = watchdog
        self.health_port = health_port
        self.returncode: int | None = None  # once stopped for good
        self._lifecycle = threading.RLock()  # start, restart and stop never interleave
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._watchdog = None
        self._health = None
        self._wrote_key_file = False
        self._log_start = 0

    # ---- start -----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [str(pytriton_dir() / "bin" / "tritonserver"),
                *server_flags(self.repository, self.ports, self.admin_key, self.address),
                f"--backend-directory={self.workspace / 'backends'}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--log-verbose={1 if self.verbose else 0}"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libraries = [str(self.workspace / "lib"), str(pytriton_dir().parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        env["VILEX_SITE_PACKAGES"] = os.pathsep.join(site_packages())
        return env

    def _prepare_workspace(self) -> None:
        dist = pytriton_dir()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ViLexUsageError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
        self.workspace = Path(tempfile.mkdtemp(prefix="vilex-triton-"))
        shutil.copytree(dist / "backends", self.workspace / "backends")
        shutil.copy2(stub, self.workspace / "backends" / "python" / "triton_python_backend_stub")
        # The stub links libpython3.X.so.1.0. A folder holding only this interpreter's own (when it is a
        # shared build) makes the stub run the same Python build as this environment, without putting
        # the rest of that library folder (a conda env's libstdc++, ...) in front of tritonserver.
        (self.workspace / "lib").mkdir()
        (self.workspace / "cwd").mkdir()  # stays empty: nothing in it can shadow a package
        libpython = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "-")
        if libpython.name.startswith("libpython") and ".so" in libpython.name and libpython.is_file():
            os.symlink(libpython, self.workspace / "lib" / libpython.name)
        if self.log_path is None:
            self.log_path = self.workspace / "tritonserver.log"

    def start(self, timeout_s: float = 300.0) -> "TritonServer":
        """Start tritonserver and return once every model is ready (ServerError with the log's end otherwise;
        ModelLoadError naming the model and file when a model did not load; ViLexUsageError naming a port
        another process listens on)."""
        from .health import HealthEndpoint, Watchdog

        self.start_timeout_s = timeout_s
        check_ports_free(self.address, self.port_flags())
        try:
            if self.health_port is not None:
                self._health = HealthEndpoint(self, self.address, self.health_port).start()
                self.health_port = self._health.port
            with self._lifecycle:
                self._launch(timeout_s)
            # Only now: this server owns the HTTP port, and the file named after it is this server's.
            if self.admin_key_file is not None:
                write_private_file(self.admin_key_file, self.admin_key + "\n")
                self._wrote_key_file = True
        except BaseException:
            self.stop()
            raise
        if self.use_watchdog:
            self._watchdog = Watchdog(self).start()
        return self

    def port_flags(self) -> dict[str, int]:
        """{what the port is, as `vilex serve` names its flag: port} for the ports this server listens on."""
        ports = {"--http-port": self.ports.http, "--grpc-port": self.ports.grpc, "--metrics-port": self.ports.metrics}
        if self.health_port:  # 0: a free one, None: no endpoint
            ports["--health-port"] = self.health_port
        return ports

    def _launch(self, timeout_s: float) -> None:
        """One tritonserver process: started, waited for, its stubs recorded. The caller holds _lifecycle."""
        if self.workspace is None:  # kept across restarts (and the default log in it)
            self._prepare_workspace()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The log is appended to (a restart, a reused --log): load failures are read from this start on only.
        self._log_start = self.log_path.stat().st_size if self.log_path.is_file() else 0
        with open(self.log_path, "ab") as log:
            # Its own session: stop() can signal the server and its backend stubs as one process group.
            # cwd: see step 4 of the module docstring (never the caller's working directory).
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, cwd=self.workspace / "cwd")
        self.wait_ready(timeout_s)
        from .health import stub_processes

        self.stubs = stub_processes(self.process.pid)
        self.readiness.set_ready()

    def wait_ready(self, timeout_s: float) -> None:
        url = f"http://{_connect_host(self.address)}:{self.ports.http}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                raise ServerError("tritonserver was stopped while it was starting")
            if self.process.poll() is not None:
                log = self.log_text(start=self._log_start)
                busy = ports_in_use(log, self.port_flags())
                if busy:  # taken since check_ports_free
                    raise ViLexUsageError(f"{busy[0]} {self.port_flags()[busy[0]]} is in use on {self.address}: another "
                                          f"process took it while tritonserver was starting; stop it or choose another port")
                failed = load_failures(log)
                if failed:
                    raise ModelLoadError(f"tritonserver could not load {len(failed)} model(s) of {self.repository}:\n"
                                         + "\n".join(f"  {line}" for line in failed))
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            # Another process on one of our ports answers the health URL as well: ready only once our own
            # tritonserver holds every port (it binds them after loading the models).
            if not {self.ports.http, self.ports.grpc, self.ports.metrics} - listening_ports(self.process.pid):
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_text(self, start: int = 0) -> str:
        """The server's log from byte `start` on."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_bytes()[start:].decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text().splitlines()
        return "\n".join(text[-lines:]) if text else "(no log)"

    # ---- health ----------------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """None while this server can serve; else why not (tritonserver exited, a stub died)."""
        from .health import dead_stubs

        process = self.process
        if process is None:
            return "not started"
        if process.poll() is not None:
            return f"tritonserver (pid {process.pid}) exited with code {process.returncode}"
        dead = dead_stubs(self.stubs)
        if dead:
            return f"Python backend stub process {', '.join(dead)} died"
        return None

    def readiness_report(self) -> dict:
        """{"ready", "reason", "restarts"}: ready only when started, not restarting, and every stub alive."""
        report = self.readiness.snapshot()
        if report["ready"]:
            problem = self.health_problem()
            if problem is not None:
                report.update(ready=False, reason=problem)
        return report

    def restart(self, reason: str) -> bool:
        """Stop this tritonserver and start a new one on the same ports (called by the watchdog). Returns
        False when the server is stopping or the new one did not become ready (then the server gave up)."""
        with self._lifecycle:
            if self._stopping.is_set():
                return False
            self.readiness.set_not_ready(f"restarting: {reason}")
            print(f"vilex serve: {reason}; restarting tritonserver", file=sys.stderr, flush=True)
            self._terminate(RESTART_GRACE_S)
            self.readiness.count_restart()
            try:
                self._launch(self.start_timeout_s)
            except ServerError as error:
                if not self._stopping.is_set():
                    self.give_up(f"the restart after '{reason}' failed: {error}")
                return False
        print(f"vilex serve: tritonserver restarted (pid {self.process.pid})", file=sys.stderr, flush=True)
        return True

    def give_up(self, reason: str) -> None:
        """Stop for good: readiness says why, and wait() returns non-zero."""
        print(f"vilex serve: {reason}; stopping", file=sys.stderr, flush=True)
        self.stop()
        self.readiness.set_not_ready(f"stopped: {reason}")
        if not self.returncode:
            self.returncode = 1

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the server has ended for good (stopped, the watchdog gave up, or without a watchdog
        tritonserver exited); its exit code, or None if still serving after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            if self._ended.wait(0.5):
                return self.returncode
            if self._watchdog is None and self.process is not None and self.process.poll() is not None:
                return self.process.returncode
        return None

    # ---- stop ------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 15) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL whatever is left of the process group. Idempotent."""
        self._stopping.set()  # a restart under way stops waiting for its server
        if self._watchdog is not None:
            self._watchdog.stop()
        with self._lifecycle:
            if self.process is not None and not self._ended.is_set():
                self.returncode = self._terminate(timeout_s)
            self.readiness.set_not_ready("stopped")
            if self._health is not None:
                self._health.stop()
            self._remove_workspace()
            if self._wrote_key_file:  # never another server's file for the same port
                remove_key_file(self.admin_key_file, self.admin_key)
                self._wrote_key_file = False
            self._ended.set()
        return self.returncode

    def _terminate(self, timeout_s: float) -> int:
        """The current tritonserver and its process group gone, its shared-memory regions removed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait()
        # Stubs are in the server's group; they exit with it, but give them a moment and make sure.
        _wait_group_gone(self.process.pid, timeout_s=10.0)
        self._remove_shared_memory()
        return self.process.returncode

    def _remove_shared_memory(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)

    def _remove_workspace(self) -> None:
        if self.workspace is not None and self.workspace.exists():
            shutil.rmtree(self.workspace, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- addresses -------------------------------------------------------------------------------------
    def url(self, protocol: str = "http") -> str:
        port = self.ports.http if protocol == "http" else self.ports.grpc
        return f"{_connect_host(self.address)}:{port}"

    def health_url(self) -> str | None:
        return None if self.health_port is None else f"http://{_connect_host(self.address)}:{self.health_port}"


def admin_key_path(http_port: int) -> Path:
    """Where `vilex serve` on `http_port` writes its random admin key: $VILEX_CACHE/serve/admin-key-PORT."""
    cache = Path(os.environ.get("VILEX_CACHE", Path.home() / ".cache" / "vilex"))
    return cache / "serve" / f"admin-key-{http_port}"


def remove_key_file(path: Path, admin_key: str) -> None:
    """Remove the admin-key file `path` if it still holds `admin_key`: a server started on the same port since
    (after this one lost it) wrote its own key there, which stays."""
    try:
        if path.read_text().strip() == admin_key:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def check_ports_free(address: str, ports: dict[str, int]) -> None:
    """ViLexUsageError naming the first of `ports` ({flag: port}; 0 means a free one) that cannot be listened
    on at `address`. The probe sets SO_REUSEADDR, as tritonserver does, so a port a stopped server left in
    TIME_WAIT counts as free and only a live listener as taken."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for flag, port in ports.items():
        if not port:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ViLexUsageError(f"{flag} {port} is in use on {address}: another process (another "
                                          f"`vilex serve`?) listens there; stop it or choose another port") from None
                raise ViLexUsageError(f"{flag} {port}: cannot listen on --address {address}: {error.strerror}") from None


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` itself listens on (empty when it is gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        # net_connections since psutil 6; connections before (the serve extra allows psutil 5.9)
        connections = (process.net_connections if hasattr(process, "net_connections") else process.connections)("tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return set()
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (folder 0700, file 0600), replacing it atomically.
    The file is created 0600 (never chmod-ed after the fact), so no other user can open it in between."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(staging, path)


# "failed to load 'unet' version 1: Internal: InvalidProtobuf: ... Load model from .../model.onnx failed: ..."
# (model_lifecycle.cc); the message is JSON-escaped in the log and ends in the stub's Python traceback.
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version (\d+): (.*?)(?:\\n\\nAt:|\"$)", re.MULTILINE)


def load_failures(log_text: str) -> list[str]:
    """One line per model that failed to load, from a tritonserver log: the model, its version and the
    loader's message (which names the file for a corrupt or truncated graph)."""
    failed = {}
    for model, version, message in _LOAD_FAILED.findall(log_text):
        failed.setdefault(model, f"{model} (version {version}): {message.replace(chr(92) + 'n', ' ').strip()}")
    return list(failed.values())


def ports_in_use(log_text: str, ports: dict[str, int]) -> list[str]:
    """The flags of `ports` ({flag: port}) that a tritonserver log says were taken when it tried to listen
    ("failed to start HTTP service: Unavailable - Socket '127.0.0.1:8000' already in use")."""
    lines = [line for line in log_text.splitlines() if "in use" in line]
    return [flag for flag, port in ports.items() if any(f":{port}'" in line for line in lines)]


def site_packages() -> list[str]:
    """This environment's site-packages folders (a venv's own first), for the backend stubs."""
    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        folders.append(site.getusersitepackages())
    return folders


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(pgid):
        _kill_group(pgid)
        time.sleep(0.2)


def _connect_host(address: str) -> str:
    return "127.0.0.1" if address in ("0.0.0.0", "") else address
