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
     puts first on sys.path before importing numpy (see triton_repo/*/1/model.py).
* NVIDIA's container (onnxruntime and tensorrt repositories on GPU hosts): `docker_command` prints the
  `docker run ... tritonserver ...` line with the same flags; the image needs vilex installed for the
  pipeline models.

Secure defaults: listen on 127.0.0.1 only; model control mode "none" (no loading or unloading over the
network); the model-repository, model-config and shared-memory APIs restricted to callers that send a
random key (or VILEX_TRITON_ADMIN_KEY when set) in the header `vilex-admin-key` over HTTP, and in the
metadata `triton-grpc-protocol-vilex-admin-key` over gRPC (Triton adds that prefix).

Stopping sends SIGTERM (tritonserver unloads its models and the stubs exit), waits, and only then kills
the server's process group; the workspace and the Python backend's shared-memory regions are removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError

RESTRICTED_APIS = "model-repository,model-config,shared-memory"
ADMIN_HEADER = "vilex-admin-key"
ADMIN_KEY_ENV = "VILEX_TRITON_ADMIN_KEY"
# NVIDIA's container with the same server as the wheel's binary (2.51.0 is release 24.10).
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
EXIT_TIMEOUT_S = 30  # tritonserver's own wait for in-flight requests on shutdown


class ServerError(RuntimeError):
    """tritonserver did not start, or stopped on its own."""


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

    address: where HTTP, gRPC and metrics listen (127.0.0.1: this host only).
    log: a file for the server's log (default: in the private workspace, removed by stop()).
    """

    def __init__(self, repository: str | os.PathLike, ports: Ports | None = None, address: str = "127.0.0.1",
                 log: str | os.PathLike | None = None, admin_key: str | None = None, verbose: bool = False):
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
        self.admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
        self.verbose = verbose
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.shm_prefix = f"vilex-{secrets.token_hex(4)}-"

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
        libpython = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "-")
        if libpython.name.startswith("libpython") and ".so" in libpython.name and libpython.is_file():
            os.symlink(libpython, self.workspace / "lib" / libpython.name)
        if self.log_path is None:
            self.log_path = self.workspace / "tritonserver.log"

    def start(self, timeout_s: float = 300.0) -> "TritonServer":
        """Start tritonserver and return once every model is ready (ServerError with the log's end otherwise)."""
        self._prepare_workspace()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            # Its own session: stop() can signal the server and its backend stubs as one process group.
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        except BaseException:
            log.close()
            self._remove_workspace()
            raise
        log.close()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        url = f"http://{_connect_host(self.address)}:{self.ports.http}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # ---- stop ------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 15) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL whatever is left of the process group. Idempotent."""
        if self.process is None:
            self._remove_workspace()
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait()
        # Stubs are in the server's group; they exit with it, but give them a moment and make sure.
        _wait_group_gone(self.process.pid, timeout_s=10.0)
        returncode = self.process.returncode
        self._remove_shared_memory()
        self._remove_workspace()
        return returncode

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
