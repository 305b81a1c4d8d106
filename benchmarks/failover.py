"""Two `vilex serve` replicas behind a real nginx; one is killed mid-run (issue 21, part 3).

    python -m vilex.benchmarks.failover ENGINES [--out failover-results] [--kill-after 3] [--after-kill 8]
                                        [--concurrency 2] [--steps 3] [--client-retries 1] [--fail-timeout 10]

1. ENGINES (an export folder of `vilex export`) becomes a python-ort model repository in OUT, served by two
   `vilex serve` processes (a and b) on free ports.
2. nginx, as an unprivileged process with its own prefix (OUT/nginx), balances both: `proxy_pass` for HTTP and
   `grpc_pass` for gRPC, round robin, with the retry policy of `nginx_config` (its comment says what is retried
   and why).
3. `--concurrency` HTTP clients and as many gRPC clients send seeded `vilex_reconstruct` requests through nginx;
   every answer is compared with the in-process onnxruntime pipeline over the same export (the served tests'
   reference: at most 1 of 255 levels apart).
4. Once b has answered a request over each protocol (nginx's access log says so) and `--kill-after` seconds have
   passed, b dies as a crashed host would: SIGKILL to its `vilex serve` and to its tritonserver's process group,
   so no watchdog restarts it and no connection is closed politely. Traffic goes on for `--after-kill` seconds.
5. A client sends a failed request again (`--client-retries`), as a caller may: seeded requests give the same
   answer wherever and however often they run.
6. It prints and writes OUT/results.json: per protocol, the requests that failed at the first send and those lost
   after the client's retry, which ones nginx retried on the other replica, when nginx last sent a request to the
   dead replica (from its access log, each send tagged with the header `x-vilex-request`), and whether every
   answer equals the in-process one.

nginx open source has no active health checks (`health_check` is nginx Plus): it notices a dead replica when a
request to it fails (`max_fails=1`), then leaves it out for `fail_timeout` seconds and tries it again with one
request, which, if refused, is retried at once on the other replica.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# One uint8 level of slack, as the served tests allow (tests/test_serving.py PIXEL_TOLERANCE): served and in-process
# runs execute the same graphs; a rounding flip at .5 under another batch size is the only expected difference.
PIXEL_TOLERANCE = 1
REQUEST_HEADER = "x-vilex-request"  # tags each request; nginx logs it as $http_x_vilex_request
NUM_TOKENS = 8
SEEDS_PER_IMAGE = 2


# ---- replicas ------------------------------------------------------------------------------------------------
@dataclass
class Replica:
    """One `vilex serve` (or, with process None, a server this program did not start and must not kill)."""

    name: str
    http: str  # HOST:PORT
    grpc: str
    process: subprocess.Popen | None = None  # `vilex serve`
    server_pid: int | None = None  # its tritonserver (leader of its own process group)
    output: list[str] = field(default_factory=list)

    def kill(self) -> float:
        """Crash this replica: SIGKILL to `vilex serve` (so its watchdog restarts nothing) and to the tritonserver's
        process group (the server and its Python-backend stubs). Returns the time (time.time()) of the kill.
        What a SIGKILL leaves behind (the server's shared-memory regions and workspace) is removed afterwards."""
        if self.process is None:
            raise RuntimeError(f"replica {self.name} was not started here; it is not killed")
        shm_prefix, workspace = _server_leftovers(self.server_pid)
        killed_at = time.time()
        self.process.kill()
        try:
            os.killpg(self.server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        _wait_group_gone(self.server_pid, timeout_s=30)
        if shm_prefix:
            for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
                region.unlink(missing_ok=True)
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)
        return killed_at

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C: `vilex serve` stops its server and cleans up (no-op if not started here or gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_replica(repository: Path, folder: Path, name: str, admin_key: str, timeout_s: float = 600.0,
                  attempts: int = 3) -> Replica:
    """`vilex serve REPOSITORY` on free ports (its log in FOLDER/NAME.log), returned once it says it is ready.

    A port found free can be taken before tritonserver binds it (free ports come from the kernel's ephemeral
    range, which every outgoing connection draws from too; seen once in the suite): `vilex serve` then refuses
    with a usage error naming the port, and the replica is started again on other ports, `attempts` times."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_replica(repository, folder, name, admin_key, timeout_s)
        except RuntimeError as error:
            if "is in use" not in str(error) or attempt == attempts:
                raise


def _start_replica(repository: Path, folder: Path, name: str, admin_key: str, timeout_s: float) -> Replica:
    from vilex.serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "vilex.cli", "serve", str(repository), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--health-port", "0",
               "--log", str(folder / f"{name}.log")]
    # The key is given, so `vilex serve` writes no admin-key file; tritonserver runs in its own folder (cwd: FOLDER).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
                               env={**os.environ, "VILEX_TRITON_ADMIN_KEY": admin_key})
    replica = Replica(name, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", process)
    threading.Thread(target=lambda: replica.output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        ready = re.search(r"tritonserver ready \(pid (\d+)\)", "".join(replica.output))
        if ready:
            replica.server_pid = int(ready.group(1))
            return replica
        if process.poll() is not None or time.monotonic() > deadline:
            replica.stop()
            raise RuntimeError(f"replica {name} did not become ready:\n" + "".join(replica.output)[-3000:])
        time.sleep(0.2)


def _server_leftovers(server_pid: int) -> tuple[str | None, Path | None]:
    """What a SIGKILL-ed tritonserver of `vilex serve` leaves behind, read from its own command line: the prefix of
    its shared-memory regions (`shm-region-prefix-name=`) and its private workspace (`--backend-directory=`)."""
    try:
        arguments = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None, None
    prefix = next((a.split("shm-region-prefix-name=", 1)[1] for a in arguments if "shm-region-prefix-name=" in a), None)
    backends = next((Path(a.split("=", 1)[1]) for a in arguments if a.startswith("--backend-directory=")), None)
    workspace = backends.parent if backends is not None and backends.parent.name.startswith("vilex-triton-") else None
    return prefix, workspace


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ---- the balancer --------------------------------------------------------------------------------------------
def nginx_config(prefix: Path, http_port: int, grpc_port: int, replicas: list[Replica], fail_timeout_s: int) -> str:
    """nginx.conf for `nginx -p PREFIX`: every file it writes (pid, logs, temp bodies) under PREFIX.

    What is retried on the other replica, and why:
    * `error` (connection refused or reset, the replica gone mid-request) and `timeout` (connect within 2 s, a host
      that vanished without a reset; the read timeout is 600 s, TritonClient's own, so a long generation is never cut
      off and retried): the replica could not answer, so the request never completed there.
    * `non_idempotent`: inference is a POST, which nginx otherwise never sends twice. It is safe here because a
      request's answer depends only on its inputs and its SEED (the library's seed rule), and running it twice
      changes nothing but the server's statistics: the retried request gets the same image.
    * `http_502`, `http_504`: what a proxy between nginx and tritonserver answers when the replica is gone
      (tritonserver itself sends neither).
    * Not `http_503`: tritonserver answers 503 when a model's queue is full (overload, within ~50 ms). With
      max_fails=1 a retried 503 would also take that replica out of rotation and pile its load onto the other, which
      then overflows in turn; the caller gets the 503 and backs off instead. Not `http_500` (a model's internal
      error, which another replica would repeat) and never 4xx (the caller's mistake, named in the message).
    * At most 2 tries (`*_next_upstream_tries`): each request runs at most once per replica.
    * gRPC: nginx passes a gRPC request's body on as it comes, without keeping it (ngx_http_grpc_module sets
      request_body_no_buffering), so it can retry only a request it has not sent yet: one whose connection was
      refused. A request in flight on a replica that dies fails with UNAVAILABLE (nginx's 502); the caller may
      send it again (seeded: same answer). tritonserver's own errors travel in the gRPC status with HTTP 200, so
      the http_* conditions never match them. A stream (`vilex_*_stream`) that already sent progress is never
      retried either: nginx does not retry once a response has started.
    * `max_fails=1 fail_timeout=N`: one failed connection takes the replica out for N seconds; then one request
      tries it again (and, if it is still down, is retried at once). `keepalive` keeps connections to the replicas
      open between requests. Over HTTP the request body is buffered (proxy_request_buffering, nginx's default),
      which is what lets a request that already went out be sent again.
    """
    def upstream(name: str, addresses: list[str]) -> str:
        servers = "\n".join(f"        server {a} max_fails=1 fail_timeout={fail_timeout_s}s;" for a in addresses)
        return f"    upstream {name} {{\n{servers}\n        keepalive 16;\n    }}"

    temp = "\n".join(f"    {kind}_temp_path {prefix / 'temp' / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# Written by vilex.benchmarks.failover for `nginx -p {prefix} -c nginx.conf -g 'daemon off;'`.
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} info;
events {{ worker_connections 512; }}

http {{
{temp}
    log_format failover '$msec $request_time $server_port "$http_{REQUEST_HEADER.replace('-', '_')}" $status '
                        '"$upstream_addr" "$upstream_status" "$upstream_response_time"';
    access_log {prefix / 'access.log'} failover;
    client_max_body_size 64m;  # IMAGE_RGB at 2048 x 2048 is 12 MB; nginx's default is 1 MB

{upstream("vilex_http", [r.http for r in replicas])}
{upstream("vilex_grpc", [r.grpc for r in replicas])}

    server {{
        listen 127.0.0.1:{http_port};
        location / {{
            proxy_pass http://vilex_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 2s;
            proxy_send_timeout 600s;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout http_502 http_504 non_idempotent;
            proxy_next_upstream_tries 2;
        }}
    }}

    server {{
        listen 127.0.0.1:{grpc_port} http2;
        location / {{
            grpc_pass grpc://vilex_grpc;
            grpc_connect_timeout 2s;
            grpc_send_timeout 600s;
            grpc_read_timeout 600s;
            grpc_next_upstream error timeout http_502 http_504 non_idempotent;
            grpc_next_upstream_tries 2;
        }}
    }}
}}
"""


class Balancer:
    """nginx on two free loopback ports (HTTP and gRPC) in front of `replicas`, run in the foreground as an
    unprivileged process (this user, or `nobody` when this is root) with its own temporary prefix: its config, pid,
    logs and temp bodies live there. stop() copies the config and the logs to `keep` (when given) and removes it."""

    def __init__(self, replicas: list[Replica], keep: Path | None = None, nginx: str = "nginx", fail_timeout_s: int = 10):
        from vilex.serving.server import free_ports

        self.binary = shutil.which(nginx)
        if self.binary is None:
            raise FileNotFoundError(f"no {nginx!r} on PATH: install nginx (Debian: apt-get install nginx)")
        # In the system's temporary folder: `nobody` can reach it there (a folder under a 0700 one it could not).
        self.prefix = Path(tempfile.mkdtemp(prefix="vilex-nginx-"))
        self.keep = Path(keep) if keep is not None else None
        self.replicas = replicas
        self.fail_timeout_s = fail_timeout_s
        self.http_port, self.grpc_port = free_ports(2)
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc

    def command(self, *extra: str) -> list[str]:
        # -e: the error log from the first line on (before the config is read nginx opens its built-in path,
        # /var/log/nginx, which an unprivileged process cannot).
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.prefix / "nginx.conf"),
                "-e", str(self.prefix / "error.log"), *extra]

    def write_config(self) -> Path:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
        path = self.prefix / "nginx.conf"
        path.write_text(nginx_config(self.prefix, self.http_port, self.grpc_port, self.replicas, self.fail_timeout_s))
        self._give_prefix_to_worker_user()
        return path

    def check_config(self) -> str:
        """`nginx -t` on the written config: its output (raises CalledProcessError when nginx refuses it)."""
        self.write_config()
        try:
            run = subprocess.run(self.command("-t"), capture_output=True, text=True, preexec_fn=self._drop_privileges)
        finally:
            self._remove_prefix()
        if run.returncode != 0:
            raise RuntimeError(f"nginx refused its config:\n{run.stderr}")
        return run.stderr

    def start(self, timeout_s: float = 20.0) -> "Balancer":
        self.write_config()
        self.process = subprocess.Popen(self.command("-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        preexec_fn=self._drop_privileges, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not all(_listening(port) for port in (self.http_port, self.grpc_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.prefix / "error.log").read_text(errors="replace")[-3000:] if (self.prefix / "error.log").exists() else ""
                self.stop()
                raise RuntimeError(f"nginx did not start:\n{log}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._remove_prefix()

    def _remove_prefix(self) -> None:
        if not self.prefix.exists():
            return
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            for name in ("nginx.conf", "access.log", "error.log"):
                if (self.prefix / name).exists():
                    shutil.copyfile(self.prefix / name, self.keep / name)
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> "Balancer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_entries(self) -> list[dict]:
        """The access log, one dict per request nginx finished."""
        path = self.prefix / "access.log"
        return [parse_log_line(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    # nginx started by root switches its workers to an unprivileged user; here the whole of nginx runs as `nobody`.
    def _worker_user(self) -> pwd.struct_passwd | None:
        return pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def _give_prefix_to_worker_user(self) -> None:
        user = self._worker_user()
        if user is not None:
            for path in [self.prefix, *self.prefix.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def _drop_privileges(self) -> None:
        user = self._worker_user()
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)


_LOG_LINE = re.compile(r'^(?P<msec>[\d.]+) (?P<request_time>[\d.]+) (?P<port>\d+) "(?P<request>[^"]*)" (?P<status>\d+) '
                       r'"(?P<upstreams>[^"]*)" "(?P<upstream_status>[^"]*)" "(?P<upstream_times>[^"]*)"$')


def parse_log_line(line: str) -> dict:
    """One line of the `failover` log format: times in seconds (epoch), the upstreams tried in order."""
    match = _LOG_LINE.match(line)
    if match is None:
        raise ValueError(f"not a line of the failover log format: {line!r}")
    end, duration = float(match["msec"]), float(match["request_time"])
    split = lambda text: [part.strip() for part in text.split(",") if part.strip() and part.strip() != "-"]  # noqa: E731
    return {"request": match["request"], "port": int(match["port"]), "status": int(match["status"]),
            "start": end - duration, "end": end, "upstreams": split(match["upstreams"]),
            "upstream_statuses": split(match["upstream_status"]),
            "upstream_times": [float(s) for s in split(match["upstream_times"])]}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ---- traffic -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FailoverRequest:
    """One seeded `vilex_reconstruct` request: an image file and a seed (NUM_TOKENS tokens, `steps` steps)."""

    image: str
    seed: int


@dataclass
class Attempt:
    """One send of a request through the balancer (nginx logs it under `request_id`)."""

    request_id: str
    start: float  # time.time()
    end: float = 0.0
    error: str | None = None


@dataclass
class Outcome:
    """One seeded request, its attempts (a first send, then the client's retries) and its answer."""

    protocol: str
    image: str
    seed: int
    attempts: list[Attempt] = field(default_factory=list)
    max_difference: int | None = None  # the answer against the in-process image, in uint8 levels

    @property
    def lost(self) -> bool:
        """No answer after every attempt, or a wrong one."""
        return self.max_difference is None or self.max_difference > PIXEL_TOLERANCE

    @property
    def failed_first_try(self) -> bool:
        return self.attempts[0].error is not None


def failover_requests(images: list[Path], seeds_per_image: int = SEEDS_PER_IMAGE) -> list[FailoverRequest]:
    return [FailoverRequest(str(image), seed) for image in images for seed in range(seeds_per_image)]


def reference_images(pipeline, requests: list[FailoverRequest], steps: int) -> dict[FailoverRequest, "np.ndarray"]:
    """Each request's image from the in-process pipeline (what the served answer must equal)."""
    import numpy as np

    from vilex.images import load_image

    return {r: np.asarray(pipeline([load_image(r.image)], num_tokens=NUM_TOKENS, num_inference_steps=steps,
                                   seed=r.seed).images[0]) for r in requests}


def drive(balancer: Balancer, requests: list[FailoverRequest], expected: dict, victim: Replica, steps: int,
          kill_after_s: float, after_kill_s: float, concurrency: int = 2, protocols: tuple[str, ...] = ("http", "grpc"),
          client_retries: int = 1, max_wait_s: float = 600.0) -> tuple[list[Outcome], float]:
    """`concurrency` clients per protocol send `requests` round and round through the balancer. The victim is killed
    once it has answered a request over every protocol (read from nginx's access log) and at least `kill_after_s`
    in (or after `max_wait_s` whatever it answered); the clients go on for `after_kill_s` and until each has sent a
    request after the kill. A request whose send fails (not a 400: the caller's mistake) is sent again up to
    `client_retries` times. Returns every request's outcome and the time of the kill (time.time())."""
    import numpy as np

    from vilex.serving.client import ServedRequestError, TritonClient

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = itertools.count()
    killed = threading.Event()
    state = {"stop_at": float("inf"), "killed_at": 0.0}
    run = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"  # this run's requests, among whatever else nginx logged

    def send(client: TritonClient, request: FailoverRequest, request_id: str, outcome: Outcome) -> bool:
        attempt = Attempt(request_id, time.time())
        outcome.attempts.append(attempt)
        client.headers = {REQUEST_HEADER: request_id}  # one client per thread: safe to change
        try:
            image = client.reconstruct([Path(request.image).read_bytes()], num_tokens=NUM_TOKENS, steps=steps,
                                       seed=request.seed)[0]
        except ServedRequestError as error:  # never retried: the same request would be refused again
            attempt.error = f"{type(error).__name__}: {error}"
            return True
        except Exception as error:  # noqa: BLE001 - every failure is a figure of the run
            attempt.error = f"{type(error).__name__}: {error}"
            return False
        finally:
            attempt.end = time.time()
        reference = expected[request]
        outcome.max_difference = (int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())
                                  if image.shape == reference.shape else 255)
        return True

    def client_loop(protocol: str) -> None:
        with TritonClient(balancer.url(protocol), protocol) as client:
            sent_after_kill = False
            while time.time() < state["stop_at"] or not sent_after_kill:
                sent_after_kill = killed.is_set()
                n = next(counter)
                request = requests[n % len(requests)]
                outcome = Outcome(protocol, Path(request.image).name, request.seed)
                for retry in range(client_retries + 1):
                    if send(client, request, f"{run}-{protocol}-{n}" + (f"-retry{retry}" if retry else ""), outcome):
                        break
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop, args=(protocol,), name=f"{protocol}-{i}")
               for protocol in protocols for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    addresses = {"http": victim.http, "grpc": victim.grpc}
    while time.monotonic() < started + max_wait_s:
        # The replica that answered a request is the last upstream nginx tried for it.
        served = {protocol for entry in balancer.log_entries()
                  if entry["request"].startswith(f"{run}-") and entry["status"] == 200
                  for protocol in protocols if entry["upstreams"][-1] == addresses[protocol]}
        if served >= set(protocols) and time.monotonic() >= started + kill_after_s:
            break
        time.sleep(0.2)
    state["killed_at"] = victim.kill()
    state["stop_at"] = state["killed_at"] + after_kill_s
    killed.set()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: o.attempts[0].start), state["killed_at"]


# ---- figures -------------------------------------------------------------------------------------------------
def analyse(outcomes: list[Outcome], entries: list[dict], killed_at: float, dead: Replica, balancer: Balancer) -> dict:
    """The figures of one run, per protocol: requests, failures, retries, and when nginx stopped sending to the
    dead replica (from its access log, matched to the client's attempts by REQUEST_HEADER)."""
    by_id = {entry["request"]: entry for entry in entries}
    report = {"killed_replica": dead.name, "fail_timeout_s": balancer.fail_timeout_s, "protocols": {}}
    for protocol in sorted({o.protocol for o in outcomes}):
        mine = [o for o in outcomes if o.protocol == protocol]
        attempts = [a for o in mine for a in o.attempts]
        dead_address = dead.http if protocol == "http" else dead.grpc
        logged = [by_id[a.request_id] for a in attempts if a.request_id in by_id]
        touched_dead = [e for e in logged if dead_address in e["upstreams"]]
        # Answered by the dead replica before it died: it was in rotation, so the kill took away capacity.
        before = [e for e in touched_dead if e["end"] < killed_at]
        # Sent to the dead replica before the kill and ended after it: in flight when it died.
        in_flight = [e for e in touched_dead if e["end"] >= killed_at and e["start"] < killed_at]
        sent_after = sorted((e for e in touched_dead if e["start"] >= killed_at), key=lambda e: e["start"])
        # When nginx saw the dead replica fail after the kill: a request's tries run one after another, so the try on
        # the dead replica ended at the request's start plus the times of the tries up to it. With max_fails=1 that
        # first failure takes it out of rotation for fail_timeout; then one request tries it again.
        failures = sorted(e["start"] + sum(e["upstream_times"][:e["upstreams"].index(dead_address) + 1])
                          for e in touched_dead if e["end"] >= killed_at)
        marked_down = failures[0] if failures else None
        first_window = [e for e in sent_after if e["start"] < killed_at + balancer.fail_timeout_s]
        last_sent = max((e["start"] for e in first_window), default=killed_at)
        report["protocols"][protocol] = {
            "requests": len(mine),
            "attempts": len(attempts),
            # A first send that failed: what the balancer could not save.
            "failed_first_try": [{"request": o.attempts[0].request_id, "error": o.attempts[0].error,
                                  "start_after_kill_s": round(o.attempts[0].start - killed_at, 3)}
                                 for o in mine if o.failed_first_try],
            # No right answer even after the client's own retries.
            "lost": [asdict(o) for o in mine if o.lost],
            "answers_equal_in_process": sum(not o.lost for o in mine),
            "max_difference_levels": max((o.max_difference for o in mine if o.max_difference is not None), default=None),
            "not_in_access_log": [a.request_id for a in attempts if a.request_id not in by_id],
            "served_by_dead_replica_before_kill": len(before),
            "in_flight_on_dead_replica_at_kill": len(in_flight),
            "sent_to_dead_replica_after_kill": len(sent_after),
            "retried_by_nginx": [{"request": e["request"], "upstreams": e["upstreams"], "statuses": e["upstream_statuses"],
                                  "status": e["status"], "start_after_kill_s": round(e["start"] - killed_at, 3)}
                                 for e in logged if len(e["upstreams"]) > 1],
            "first_failure_seen_after_s": round(marked_down - killed_at, 3) if marked_down is not None else None,
            # From the kill until nginx sent the dead replica nothing more: its first failure there, or the last request
            # it still sent there before fail_timeout, whichever is later.
            # (0 when it never tried the dead replica after the kill.)
            "stopped_routing_after_s": round(max(marked_down or killed_at, last_sent) - killed_at, 3),
            "tries_after_fail_timeout": len(sent_after) - len(first_window),
        }
    return report


def run_failover(balancer: Balancer, victim: Replica, pipeline, images: list[Path], steps: int = 3,
                 kill_after_s: float = 3.0, after_kill_s: float = 8.0, concurrency: int = 2,
                 protocols: tuple[str, ...] = ("http", "grpc"), client_retries: int = 1) -> dict:
    """Traffic through a started `balancer`, `victim` killed once it has served (see `drive`); `analyse`'s report."""
    requests = failover_requests(images)
    expected = reference_images(pipeline, requests, steps)
    started = time.time()
    outcomes, killed_at = drive(balancer, requests, expected, victim, steps, kill_after_s, after_kill_s, concurrency,
                                protocols, client_retries)
    time.sleep(0.5)  # nginx writes a request's log line when it ends; the last ones ended just now
    report = analyse(outcomes, balancer.log_entries(), killed_at, victim, balancer)
    report.update(traffic_s=round(time.time() - started, 1), killed_after_s=round(killed_at - started, 1),
                  after_kill_s=after_kill_s, concurrency_per_protocol=concurrency, steps=steps,
                  client_retries=client_retries, distinct_requests=len(requests), pixel_tolerance=PIXEL_TOLERANCE)
    return report


def summary(report: dict) -> str:
    lines = [f"replica {report['killed_replica']} killed {report['killed_after_s']:g} s into {report['traffic_s']:g} s of "
             f"traffic ({report['concurrency_per_protocol']} clients per protocol, {report['steps']} steps, nginx "
             f"max_fails=1 fail_timeout={report['fail_timeout_s']}s, {report['client_retries']} client retry)"]
    for protocol, figures in report["protocols"].items():
        lines.append(
            f"  {protocol}: {figures['requests']} requests ({figures['attempts']} sends): "
            f"{len(figures['failed_first_try'])} failed at the first send, {len(figures['lost'])} lost after the "
            f"client's retry; {figures['answers_equal_in_process']} answers equal to in-process (max difference "
            f"{figures['max_difference_levels']} levels)")
        lines.append(
            f"    dead replica: {figures['served_by_dead_replica_before_kill']} answered before the kill, "
            f"{figures['in_flight_on_dead_replica_at_kill']} in flight at the kill, "
            f"{figures['sent_to_dead_replica_after_kill']} sent to it after; {len(figures['retried_by_nginx'])} retried "
            f"by nginx on the other replica; nginx saw it fail {_ms(figures['first_failure_seen_after_s'])} after the kill "
            f"and stopped sending to it {_ms(figures['stopped_routing_after_s'])} after it "
            f"({figures['tries_after_fail_timeout']} tries after fail_timeout)")
        for failure in figures["failed_first_try"]:
            lines.append(f"    failed at the first send: {failure['request']} ({failure['start_after_kill_s']:+.3f} s "
                         f"from the kill): {failure['error']}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "(not seen)" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilex.benchmarks.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", metavar="ENGINES", help="an export folder from `vilex export`")
    parser.add_argument("--out", default="failover-results", help="folder for the repository, logs and results.json")
    parser.add_argument("--kill-after", type=float, default=3.0,
                        help="kill replica b at least this many seconds into the traffic, once it has answered a "
                             "request over each protocol (default 3)")
    parser.add_argument("--after-kill", type=float, default=8.0, help="seconds of traffic after the kill (default 8)")
    parser.add_argument("--concurrency", type=int, default=2, help="clients per protocol (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per request (default 3)")
    parser.add_argument("--client-retries", type=int, default=1,
                        help="times a client sends a failed request again through nginx (default 1; 0: report what "
                             "nginx alone saves)")
    parser.add_argument("--fail-timeout", type=int, default=10, help="nginx fail_timeout, seconds (default 10)")
    parser.add_argument("--nginx", default="nginx", help="the nginx binary (default: nginx on PATH)")
    args = parser.parse_args(argv)
    for flag, value in (("--kill-after", args.kill_after), ("--after-kill", args.after_kill)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value:g}")
    if args.concurrency < 1 or args.steps < 1 or args.client_retries < 0 or args.fail_timeout < 1:
        parser.error("--concurrency, --steps and --fail-timeout must be >= 1, --client-retries >= 0")

    import secrets

    from vilex.engines.host import pipeline_from_engines
    from vilex.samples import sample_paths
    from vilex.serving.repository import build_repository

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repository = build_repository(args.engines, out / "repository", platform="python-ort", replace=True)
    pipeline = pipeline_from_engines(args.engines)
    pipeline.set_progress_bar_config(disable=True)
    admin_key = secrets.token_urlsafe(24)
    replicas: list[Replica] = []
    balancer = None
    try:
        for name in ("a", "b"):
            replicas.append(start_replica(repository, out / "replicas", name, admin_key))
            print(f"replica {name}: http {replicas[-1].http}, grpc {replicas[-1].grpc}", flush=True)
        balancer = Balancer(replicas, out / "nginx", args.nginx, args.fail_timeout).start()
        print(f"nginx: http {balancer.http}, grpc {balancer.grpc}", flush=True)
        report = run_failover(balancer, replicas[1], pipeline, sample_paths(), args.steps, args.kill_after,
                              args.after_kill, args.concurrency, client_retries=args.client_retries)
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"wrote {out / 'results.json'}; nginx's config and access log in {out / 'nginx'}")
    return 0 if not any(f["lost"] for f in report["protocols"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
