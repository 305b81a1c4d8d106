"""`vilex stress URL`: hostile input, soak and overload against a running `vilex serve`, on loopback.

After Triton's QA suites (L0_input_validation / L0_http_fuzz, L0_long_running_stress / L0_memory_growth,
L0_model_queue). Three parts, each bounded in requests and in time:

1. hostile   malformed requests to every pipeline model over each protocol (benchmarks/hostile.py),
             each followed by a valid request;
2. soak      N requests at concurrency C, a mix of the three models, one tritonclient client per thread
             and protocol; every answer checked (shape, and equal to the first answer for the same input
             and seed); server and stub RSS, /dev/shm, open fds sampled (benchmarks/server_watch.py);
             latency percentiles per time window; growth measured between two idle points, after a
             warm-up and after the run;
3. overload  more requests at once than vilex_reconstruct's queue holds (max_queue_size, read from the
             model config): the excess must be refused at once with 503 / UNAVAILABLE, the rest served,
             and the next requests served at the latency of before.

Writes results.json and results.md to --out; exits non-zero if any request was lost (no answer in time),
answered wrongly, or accepted where it should have been refused.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vilex.errors import ViLexUsageError

from . import hostile
from .hostile import Served, connect, i32, rows, send_tensors
from .server_watch import ServerWatch, as_dict, find_server, server_flag

MODELS = ("vilex_reconstruct", "vilex_tokenize", "vilex_generate")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
REQUEST_TIMEOUT_S = 120.0
# Targets from the issue (README "Reliability").
RSS_GROWTH_LIMIT_MB = 50.0
REJECTION_LIMIT_S = 0.100
RECOVERY_FACTOR = 2.0  # recovered p50 within this factor of the p50 before the overload
IMAGE_TOLERANCE = 1  # uint8 levels between two answers to the same request (tests/test_serving.py's bound)


# ---- the server and what it serves ------------------------------------------------------------------------
def parse_url(url: str) -> tuple[str, int]:
    if "://" in url:
        raise ViLexUsageError(f"URL must be HOST:PORT without a scheme, got {url!r}")
    host, _, port = url.rpartition(":")
    if host not in LOOPBACK:
        raise ViLexUsageError(f"URL {url!r}: vilex stress only targets loopback (127.0.0.1, localhost, ::1)")
    try:
        return ("127.0.0.1" if host == "localhost" else host), int(port)
    except ValueError:
        raise ViLexUsageError(f"URL must be HOST:PORT, got {url!r}") from None


def read_config(process, model: str, repository: str | None, host: str, http_port: int, admin_key: str | None):
    """The model's config as a ModelConfig protobuf: over the API with the admin key, else from config.pbtxt
    in the repository (--repository, or the server's own --model-repository)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    if admin_key:
        request = urllib.request.Request(f"http://{host}:{http_port}/v2/models/{model}/config",
                                         headers={"vilex-admin-key": admin_key})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json_format.Parse(response.read(), model_config_pb2.ModelConfig(), ignore_unknown_fields=True), "api"
    repository = repository or server_flag(process, "model-repository")
    if not repository:
        raise ViLexUsageError("cannot read the model config: pass --repository DIR or --admin-key")
    path = Path(repository) / model / "config.pbtxt"
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()), str(path)


def read_served(host: str, ports: dict[str, int], process, repository: str | None, admin_key: str | None) -> dict:
    """N and D from a valid tokenize call; batch, queue, steps and instances from the configs."""
    from tritonclient.grpc import model_config_pb2 as pb

    module, client = connect("http", host, ports["http"], REQUEST_TIMEOUT_S)
    try:
        status, message, outputs = send_tensors(client, module, "vilex_tokenize", {"IMAGE": rows(hostile.images.line_png(40, 30))},
                                                "http", REQUEST_TIMEOUT_S)
    finally:
        client.close()
    if not outputs:
        raise ViLexUsageError(f"the server at {host}:{ports['http']} did not serve a valid tokenize request: {status} {message}")
    _, num_queries, hidden_size = outputs["VILEX_TOKENS"].shape  # (1, N, D)
    inputs = {}
    for model in MODELS:  # the metadata API is public
        with urllib.request.urlopen(f"http://{host}:{ports['http']}/v2/models/{model}", timeout=30) as response:
            inputs[model] = {i["name"]: i["datatype"] for i in json.loads(response.read())["inputs"]}
    config, source = read_config(process, "vilex_reconstruct", repository, host, ports["http"], admin_key)
    queue = config.dynamic_batching.default_queue_policy
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return {"served": Served(hidden_size=int(hidden_size), num_queries=int(num_queries),
                             max_batch=config.max_batch_size, max_steps=int(parameters.get("max_steps", 200)),
                             inputs=inputs),
            "max_queue_size": queue.max_queue_size,
            "queue_timeout_action": pb.ModelQueuePolicy.TimeoutAction.Name(queue.timeout_action),
            "queue_timeout_s": queue.default_timeout_microseconds / 1e6,
            "instances": sum(group.count for group in config.instance_group) or 1,
            "config_source": source}


# ---- requests shared by soak and overload ---------------------------------------------------------------------
def sample_pngs() -> list[bytes]:
    from vilex.samples import sample_paths

    return [path.read_bytes() for path in sample_paths()[:2]]


class RequestMix:
    """Request i: model MODELS[i % 3], protocol by i // 3, one of 2 images and 4 seeds; the answer to the same
    (model, image, seed) must not change, whatever it was batched with."""

    def __init__(self, protocols: list[str], tokens: np.ndarray, steps: int, num_tokens: int):
        self.protocols, self.tokens, self.steps, self.num_tokens = protocols, tokens, steps, num_tokens  # tokens (2, k, D)
        self.images = sample_pngs()
        self.first: dict[tuple, np.ndarray] = {}
        self.lock = threading.Lock()

    def request(self, i: int) -> tuple[str, str, dict, tuple]:
        model = MODELS[i % len(MODELS)]
        protocol = self.protocols[(i // len(MODELS)) % len(self.protocols)]
        image, seed = (i // 6) % 2, (i // 12) % 4
        if model == "vilex_tokenize":
            inputs = {"IMAGE": rows(self.images[image]), "NUM_TOKENS": i32(self.num_tokens)}
        elif model == "vilex_generate":
            inputs = {"VILEX_TOKENS": self.tokens[image:image + 1], "STEPS": i32(self.steps),
                      "SEED": np.array([[seed]], np.int64)}
        else:
            inputs = {"IMAGE": rows(self.images[image]), "NUM_TOKENS": i32(self.num_tokens), "STEPS": i32(self.steps),
                      "SEED": np.array([[seed]], np.int64)}
        return model, protocol, inputs, (model, image, seed if model != "vilex_tokenize" else 0)

    def check(self, key: tuple, output: np.ndarray) -> str:
        """'' if the answer equals the first one for this key (within tolerance), else what differs."""
        with self.lock:
            first = self.first.setdefault(key, output)
        if first.shape != output.shape or first.dtype != output.dtype:
            return f"shape/dtype {output.shape} {output.dtype}, first answer {first.shape} {first.dtype}"
        difference = float(np.abs(first.astype(np.float64) - output.astype(np.float64)).max()) if first.size else 0.0
        bound = IMAGE_TOLERANCE if output.dtype == np.uint8 else 1e-5
        return "" if difference <= bound else f"differs from the first answer by {difference:g}"


class ClientPool:
    """One tritonclient client per thread and protocol (tritonclient's HTTP client must not be shared)."""

    def __init__(self, host: str, ports: dict[str, int]):
        self.host, self.ports = host, ports
        self.local = threading.local()
        self.all: list = []
        self.lock = threading.Lock()

    def get(self, protocol: str):
        clients = self.local.__dict__.setdefault("clients", {})
        if protocol not in clients:
            clients[protocol] = connect(protocol, self.host, self.ports[protocol], REQUEST_TIMEOUT_S)
            with self.lock:
                self.all.append(clients[protocol][1])
        return clients[protocol]

    def close(self) -> None:
        for client in self.all:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.all.clear()


def ok_status(protocol: str) -> str:
    return "200" if protocol == "http" else "StatusCode.OK"


def run_requests(mix: RequestMix, pool: ClientPool, indices: range, concurrency: int, deadline: float) -> list[dict]:
    """Send mix.request(i) for i in indices on `concurrency` threads until done or `deadline`."""
    counter = itertools.count(indices.start)
    lock = threading.Lock()
    records: list[dict] = []

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
            if i >= indices.stop:
                return
            model, protocol, inputs, key = mix.request(i)
            module, client = pool.get(protocol)
            start = time.monotonic()
            status, message, outputs = send_tensors(client, module, model, inputs, protocol, REQUEST_TIMEOUT_S)
            end = time.monotonic()
            problem = ""
            if status != ok_status(protocol):
                problem = f"{status}: {message[:200]}"
            else:
                problem = mix.check(key, next(iter(outputs.values())))
            with lock:
                records.append({"i": i, "model": model, "protocol": protocol, "start": start, "end": end,
                                "latency_s": end - start, "status": status, "problem": problem})

    threads = [threading.Thread(target=worker, name=f"soak-{n}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S + 10)
    if any(thread.is_alive() for thread in threads):
        records.append({"i": -1, "model": "", "protocol": "", "start": 0, "end": 0, "latency_s": 0,
                        "status": "hung", "problem": "a client thread did not return"})
    return sorted(records, key=lambda r: r["i"])


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0}
    values = np.asarray(latencies) * 1e3
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p90_ms": round(float(np.percentile(values, 90)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1),
            "max_ms": round(float(values.max()), 1), "mean_ms": round(float(values.mean()), 1)}


# ---- 2. soak ----------------------------------------------------------------------------------------------------
def run_soak(host, ports, protocols, watch: ServerWatch, served: Served, requests: int, concurrency: int,
             duration_s: float, steps: int, warmup: int, windows: int, log=print) -> dict:
    num_tokens = min(8, served.num_queries)
    module, client = connect("http", host, ports["http"], REQUEST_TIMEOUT_S)
    try:
        images = sample_pngs()
        _, _, outputs = send_tensors(client, module, "vilex_tokenize",
                                     {"IMAGE": rows(*images), "NUM_TOKENS": i32(num_tokens).repeat(2, axis=0)},
                                     "http", REQUEST_TIMEOUT_S)
    finally:
        client.close()
    mix = RequestMix(protocols, outputs["VILEX_TOKENS"], steps, num_tokens)
    deadline = time.monotonic() + duration_s
    before = watch.sample()

    # 1. Warm-up (same mix and concurrency), then an idle sample: the baseline for growth.
    log(f"soak: warm-up, {warmup} requests at concurrency {concurrency}")
    pool = ClientPool(host, ports)
    warm_records = run_requests(mix, pool, range(0, warmup), concurrency, deadline)
    pool.close()
    time.sleep(2.0)
    after_warmup = watch.sample()

    # 2. The measured run, sampled every second.
    log(f"soak: {requests} requests at concurrency {concurrency} over {', '.join(protocols)} (--duration {duration_s:.0f} s)")
    pool = ClientPool(host, ports)
    first_sample = len(watch.samples)
    watch.start()
    started = time.monotonic()
    records = run_requests(mix, pool, range(warmup, warmup + requests), concurrency, deadline)
    wall = time.monotonic() - started
    watch.stop()
    pool.close()
    time.sleep(2.0)
    after = watch.sample()
    during = watch.samples[first_sample:-1] or [after]

    # 3. Figures.
    done = [r for r in records if r["i"] >= 0]
    problems = [r for r in records if r["problem"]]
    hung = [r for r in records if r["status"] in ("timeout", "no answer", "hung")]
    mismatches = [r for r in problems if r["status"] == ok_status(r["protocol"])]
    window_s = max(wall / max(1, windows), 1e-3)
    series = []
    for w in range(max(1, windows)):
        inside = [r for r in done if started + w * window_s <= r["end"] < started + (w + 1) * window_s + (1e9 if w == windows - 1 else 0)]
        series.append({"window": w, "from_s": round(w * window_s, 1), "to_s": round((w + 1) * window_s, 1),
                       **percentiles([r["latency_s"] for r in inside]), "errors": sum(bool(r["problem"]) for r in inside)})
    growth = {"rss_mb": round(after.total_rss_mb - after_warmup.total_rss_mb, 1),
              "server_rss_mb": round(after.server_rss_mb - after_warmup.server_rss_mb, 1),
              "stubs_rss_mb": round(after.stubs_rss_mb - after_warmup.stubs_rss_mb, 1),
              "shm_mb": round(after.shm_mb - after_warmup.shm_mb, 3),
              "shm_resident_mb": round(after.shm_resident_mb - after_warmup.shm_resident_mb, 3),
              "shm_files": after.shm_files - after_warmup.shm_files,
              "fds": after.fds - after_warmup.fds}
    checks = {
        "every request sent was answered": not hung,
        "0 errors": not problems,
        f"server+stub RSS growth < {RSS_GROWTH_LIMIT_MB:.0f} MB": growth["rss_mb"] < RSS_GROWTH_LIMIT_MB,
        "/dev/shm flat": growth["shm_mb"] <= 0 and growth["shm_files"] <= 0,
        "open fds flat": growth["fds"] <= 0,
        "server alive": after.server_alive,
    }
    result = {"requests": requests, "done": len(done), "concurrency": concurrency, "steps": steps, "num_tokens": num_tokens,
              "protocols": protocols, "warmup": {"requests": warmup, "errors": sum(bool(r["problem"]) for r in warm_records)},
              "wall_s": round(wall, 1), "throughput_rps": round(len(done) / wall, 2) if wall else 0.0,
              "errors": len(problems), "hung": len(hung), "mismatches": len(mismatches),
              "error_examples": [f"{r['protocol']} {r['model']}: {r['problem']}" for r in problems[:10]],
              "latency": percentiles([r["latency_s"] for r in done]),
              "latency_by_model": {m: percentiles([r["latency_s"] for r in done if r["model"] == m]) for m in MODELS},
              "windows": series,
              "resources": {"before": as_dict(before), "after_warmup": as_dict(after_warmup), "after": as_dict(after),
                            "peak_rss_mb": round(max(s.total_rss_mb for s in during), 1),
                            "peak_fds": max(s.fds for s in during), "peak_shm_mb": round(max(s.shm_mb for s in during), 3),
                            "growth": growth, "samples": [as_dict(s) for s in during]},
              "checks": checks, "passed": all(checks.values())}
    if len(done) < requests and not hung:
        # Not a failure: the run was bounded by time before it reached N; the report says how far it got.
        result["note"] = f"--duration reached after {len(done)} of {requests} requests"
    log(f"soak: {len(done)}/{requests} done in {wall:.0f} s ({result['throughput_rps']} req/s), {len(problems)} errors, "
        f"p50 {result['latency'].get('p50_ms')} ms p99 {result['latency'].get('p99_ms')} ms; growth after warm-up: "
        f"RSS {growth['rss_mb']:+.1f} MB, /dev/shm {growth['shm_mb']:+.3f} MB, fds {growth['fds']:+d}")
    return result


# ---- 3. overload --------------------------------------------------------------------------------------------------
def run_overload(host, ports, protocol: str, info: dict, steps: int, log=print) -> dict:
    """More simultaneous vilex_reconstruct requests than queue + executing batches hold; then recovery."""
    served: Served = info["served"]
    queue, batch, instances = info["max_queue_size"], served.max_batch, info["instances"]
    capacity = queue + 2 * batch * instances  # queued + one batch executing + one being formed, per instance
    total = capacity + max(8, queue // 2)
    image = sample_pngs()[0]
    inputs = {"IMAGE": rows(image), "NUM_TOKENS": i32(min(8, served.num_queries)), "STEPS": i32(steps)}
    model = "vilex_reconstruct"

    def sequential(count: int) -> list[dict]:
        module, client = connect(protocol, host, ports[protocol], REQUEST_TIMEOUT_S)
        out = []
        try:
            for _ in range(count):
                start = time.monotonic()
                status, message, _ = send_tensors(client, module, model, inputs, protocol, REQUEST_TIMEOUT_S)
                out.append({"status": status, "message": message[:200], "latency_s": time.monotonic() - start})
        finally:
            client.close()
        return out

    baseline = sequential(4)[1:]  # the first may pay for a new connection
    barrier = threading.Barrier(total, timeout=120)
    records: list[dict] = [{} for _ in range(total)]

    def one(n: int):
        module, client = connect(protocol, host, ports[protocol], REQUEST_TIMEOUT_S)
        try:
            barrier.wait()
            start = time.monotonic()
            status, message, _ = send_tensors(client, module, model, inputs, protocol, REQUEST_TIMEOUT_S)
            records[n] = {"status": status, "message": message[:200], "start": start, "latency_s": time.monotonic() - start}
        except threading.BrokenBarrierError:
            records[n] = {"status": "not sent", "message": "barrier broken", "start": 0, "latency_s": 0}
        finally:
            client.close()

    log(f"overload ({protocol}): {total} {model} requests at once, {steps} steps each; queue {queue}, "
        f"batch {batch}, {instances} instance(s)")
    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(total)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=info["queue_timeout_s"] + REQUEST_TIMEOUT_S + 30)
    hung = sum(thread.is_alive() for thread in threads)
    unavailable = "503" if protocol == "http" else "StatusCode.UNAVAILABLE"
    served_ok = [r for r in records if r.get("status") == ok_status(protocol)]
    rejected = [r for r in records if r.get("status") == unavailable]
    other = [r for r in records if r.get("status") not in (ok_status(protocol), unavailable)]
    recovery = sequential(4)
    base_p50 = percentiles([r["latency_s"] for r in baseline]).get("p50_ms", 0.0)
    rec_p50 = percentiles([r["latency_s"] for r in recovery]).get("p50_ms", 0.0)
    rejection = percentiles([r["latency_s"] for r in rejected])
    checks = {
        "no request hung or lost": hung == 0 and not [r for r in other if r.get("status") in ("timeout", "no answer", "not sent")],
        "every request served or refused with " + unavailable: not other,
        "the excess was refused": len(rejected) >= 1,
        f"accepted <= queue + executing batches ({capacity})": len(served_ok) <= capacity,
        f"every refusal within {REJECTION_LIMIT_S * 1e3:.0f} ms": bool(rejected) and rejection["max_ms"] <= REJECTION_LIMIT_S * 1e3,
        "recovered: next requests served": all(r["status"] == ok_status(protocol) for r in recovery),
        f"recovered: p50 within {RECOVERY_FACTOR:g}x of before": bool(base_p50) and rec_p50 <= RECOVERY_FACTOR * base_p50,
    }
    result = {"protocol": protocol, "model": model, "steps": steps, "sent": total, "max_queue_size": queue,
              "max_batch": batch, "instances": instances, "capacity": capacity, "served": len(served_ok),
              "rejected": len(rejected), "other": len(other), "hung": hung,
              "other_examples": sorted({f"{r.get('status')}: {r.get('message', '')[:120]}" for r in other})[:5],
              "rejection_message": rejected[0]["message"] if rejected else "",
              "rejection_latency": rejection, "served_latency": percentiles([r["latency_s"] for r in served_ok]),
              "baseline_p50_ms": base_p50, "recovery_p50_ms": rec_p50,
              "recovery_ratio": round(rec_p50 / base_p50, 2) if base_p50 else None,
              "checks": checks, "passed": all(checks.values())}
    log(f"overload ({protocol}): {len(served_ok)} served, {len(rejected)} refused ({unavailable}, max "
        f"{rejection.get('max_ms')} ms, p50 {rejection.get('p50_ms')} ms), {len(other)} other, {hung} hung; "
        f"p50 before {base_p50} ms, after {rec_p50} ms")
    return result


# ---- all parts, and the report ---------------------------------------------------------------------------------
def run_stress(url: str, protocols: list[str], parts: list[str], out: Path, duration_s: float, concurrency: int,
               requests: int, steps: int, warmup: int | None = None, overload_steps: int | None = None,
               server_pid: int | None = None, repository: str | None = None, admin_key: str | None = None,
               quick: bool = False, command: str = "", log=print) -> dict:
    import psutil

    host, port = parse_url(url)
    process = psutil.Process(server_pid) if server_pid else find_server(port)
    ports = {"http": int(server_flag(process, "http-port") or port), "grpc": int(server_flag(process, "grpc-port") or port)}
    info = read_served(host, ports, process, repository, admin_key)
    served: Served = info["served"]
    watch = ServerWatch(process)
    started = time.monotonic()
    deadline = started + duration_s
    report = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "url": url, "ports": ports, "server_pid": process.pid, "protocols": protocols, "parts": parts,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average": os.getloadavg(), "nice": os.nice(0), "server_nice": process.nice()},
              "served": {**asdict(served), **{k: v for k, v in info.items() if k != "served"}},
              "start": as_dict(watch.sample())}
    log(f"stress: server pid {process.pid}, http {ports['http']}, grpc {ports['grpc']}; N={served.num_queries} "
        f"D={served.hidden_size}, max batch {served.max_batch}, queue {info['max_queue_size']} ({info['config_source']})")

    if "hostile" in parts:
        log("hostile: one malformed request per case, then a valid one")
        outcomes = hostile.run_hostile(host, ports, protocols, served, log=log, deadline=deadline, quick=quick)
        log("hostile: bad requests sent at the same moment as valid ones (batched together)")
        # As many valid requests beside each bad one as the queue holds: overflow is refused, not a wrong answer.
        # --quick: over the first protocol only (the batch runs in the same execute() whichever frontend took it).
        batched = hostile.run_batched(host, ports, protocols[:1] if quick else protocols, served, log=log,
                                      max_queue_size=info["max_queue_size"])
        by_protocol = {p: [o for o in outcomes if o.protocol == p] for p in protocols}
        report["hostile"] = {
            "per_protocol": {p: {"tried": len(o), "malformed": sum(x.expect != hostile.SERVE for x in o),
                                 "passed": sum(x.passed for x in o),
                                 "rejected_4xx": sum(x.status in hostile.INVALID.values() for x in o),
                                 "served": sum(x.status == ok_status(p) for x in o),
                                 "followups_failed": sum(not x.followup_ok for x in o)} for p, o in by_protocol.items()},
            "server_alive": watch.sample().server_alive,
            "cases": [asdict(o) for o in outcomes],
            "batched": batched,
            "passed": all(o.passed for o in outcomes) and all(b["passed"] for b in batched) and watch.sample().server_alive}
    if "soak" in parts:
        remaining = max(1.0, deadline - time.monotonic())
        report["soak"] = run_soak(host, ports, protocols, watch, served, requests, concurrency, remaining, steps,
                                  warmup if warmup is not None else max(2 * concurrency, requests // 10), windows=10, log=log)
    if "overload" in parts:
        report["overload"] = []
        for protocol in protocols:
            if time.monotonic() > deadline:
                # Bounded like the other parts; a part not run is said so, and is not a pass.
                report["overload"].append({"protocol": protocol, "not_run": "--duration reached", "checks": {},
                                           "passed": False})
                log(f"overload ({protocol}): not run, --duration reached")
                continue
            report["overload"].append(run_overload(host, ports, protocol, info, overload_steps or min(served.max_steps, 20),
                                                   log=log))
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["end"] = as_dict(watch.sample())
    report["host"]["load_average_at_end"] = os.getloadavg()
    report["findings"] = findings(report)
    report["passed"] = all(report[name]["passed"] for name in ("hostile", "soak") if name in report) and \
        all(o["passed"] for o in report.get("overload", []))
    write_report(report, out)
    log(f"stress: {'PASSED' if report['passed'] else 'FAILED'} in {report['wall_s']} s; {out / 'results.md'}")
    return report


def findings(report: dict) -> list[str]:
    """What a reader should act on, from the figures (nothing here is hand-written)."""
    found = []
    for case in report.get("hostile", {}).get("cases", []):
        if not case["passed"]:
            found.append(f"hostile: {case['protocol']} {case['model']} '{case['case']}': {case['reason']} "
                         f"(answer: {case['status']} {case['message'][:160]!r})")
        elif case["expect"] == hostile.SERVE and case["latency_s"] > 1.0:
            found.append(f"hostile: {case['protocol']} {case['model']} '{case['case']}' was served (as documented) but "
                         f"took {case['latency_s']:.1f} s of server time for one image")
        elif case["expect"] == hostile.FRONTEND and case["status"] in ("500", "StatusCode.INTERNAL"):
            found.append(f"hostile: {case['protocol']} '{case['case']}': Triton's frontend answers {case['status']} "
                         f"({case['message'][:100]!r}) where 400 would be right; the server kept serving")
    for batched in report.get("hostile", {}).get("batched", []):
        if not batched["passed"]:
            found.append(f"hostile, batched: {batched['protocol']} {batched['model']} '{batched['case']}': {batched['reason']}")
    soak = report.get("soak")
    if soak:
        for check, ok in soak["checks"].items():
            if not ok:
                found.append(f"soak: '{check}' failed (growth {soak['resources']['growth']}, errors {soak['errors']}, "
                             f"hung {soak['hung']})")
    for overload in report.get("overload", []):
        if "not_run" in overload:
            found.append(f"overload ({overload['protocol']}): not run ({overload['not_run']})")
        for check, ok in overload["checks"].items():
            if not ok:
                found.append(f"overload ({overload['protocol']}): '{check}' failed (served {overload['served']}, refused "
                             f"{overload['rejected']}, other {overload['other']} {overload['other_examples']}, refusal "
                             f"latency {overload['rejection_latency']}, recovery ratio {overload['recovery_ratio']})")
    return found


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "results.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# vilex stress: {'passed' if report['passed'] else 'FAILED'}", "",
             f"`{report['command']}` on {report['date']}, server pid {report['server_pid']} ({report['url']}); "
             f"{report['host']['cpus']} CPUs, load average at start {', '.join(f'{v:.1f}' for v in report['host']['load_average'])}, "
             f"at the end {', '.join(f'{v:.1f}' for v in report['host']['load_average_at_end'])}; client nice "
             f"{report['host']['nice']}, server nice {report['host']['server_nice']}; {report['wall_s']} s.", ""]
    if "hostile" in report:
        part = report["hostile"]
        lines += ["## Hostile input", "", "| protocol | cases | malformed | passed | refused 400 / INVALID_ARGUMENT | served | next request failed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {p} | {s['tried']} | {s['malformed']} | {s['passed']} | {s['rejected_4xx']} | {s['served']} | {s['followups_failed']} |"
                  for p, s in part["per_protocol"].items()]
        lines += ["", "| protocol | model | case | expected | answer | ms | ok | message |", "| --- | --- | --- | --- | --- | ---: | --- | --- |"]
        for c in part["cases"]:
            message = c["message"].replace("|", "\\|").replace("\n", " ")[:140]
            lines.append(f"| {c['protocol']} | {c['model']} | {c['case']} | {c['expect']} | {c['status']} | "
                         f"{c['latency_s'] * 1e3:.0f} | {'yes' if c['passed'] else '**no**: ' + c['reason']} | {message} |")
        neighbours = part["batched"][0]["neighbours"] if part["batched"] else hostile.NEIGHBOURS
        lines += ["", f"Sent at the same moment as {neighbours} valid requests to the same model (one batch; as many as "
                  f"the queue of {report['served']['max_queue_size']} holds beside it, at most {hostile.NEIGHBOURS}):", "",
                  "| protocol | model | case | answer | valid requests served | ok |", "| --- | --- | --- | --- | ---: | --- |"]
        for b in part["batched"]:
            lines.append(f"| {b['protocol']} | {b['model']} | {b['case']} | {b['status']} | {b['neighbours_served']} of "
                         f"{b['neighbours']} | {'yes' if b['passed'] else '**no**: ' + b['reason']} |")
        lines.append("")
    if "soak" in report:
        s = report["soak"]
        g, r = s["resources"]["growth"], s["resources"]
        lines += ["## Soak", "", f"{s['done']} of {s['requests']} requests at concurrency {s['concurrency']} over "
                  f"{', '.join(s['protocols'])} ({s['steps']} steps, {s['num_tokens']} tokens; models in turn) in {s['wall_s']} s: "
                  f"{s['throughput_rps']} requests/s, {s['errors']} errors, {s['hung']} unanswered, {s['mismatches']} "
                  f"answers that changed. Warm-up: {s['warmup']['requests']} requests ({s['warmup']['errors']} errors)."
                  + (f" Note: {s['note']}." if s.get("note") else ""), "",
                  "| | server RSS MB | stubs RSS MB | stubs | fds | /dev/shm MB (resident) | shm files |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label in ("before", "after_warmup", "after"):
            x = r[label]
            lines.append(f"| {label.replace('_', ' ')} | {x['server_rss_mb']:.1f} | {x['stubs_rss_mb']:.1f} | {x['stubs']} | "
                         f"{x['fds']} | {x['shm_mb']:.1f} ({x['shm_resident_mb']:.1f}) | {x['shm_files']} |")
        lines += [f"| growth after warm-up | {g['server_rss_mb']:+.1f} | {g['stubs_rss_mb']:+.1f} | | {g['fds']:+d} | "
                  f"{g['shm_mb']:+.3f} ({g['shm_resident_mb']:+.3f}) | {g['shm_files']:+d} |", "",
                  f"Peak during the run: RSS {r['peak_rss_mb']} MB (server + stubs), {r['peak_fds']} fds, /dev/shm {r['peak_shm_mb']} MB.", "",
                  "| window | s | requests | p50 ms | p90 ms | p99 ms | max ms | errors |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for w in s["windows"]:
            lines.append(f"| {w['window']} | {w['from_s']}-{w['to_s']} | {w['n']} | {w.get('p50_ms', '')} | {w.get('p90_ms', '')} | "
                         f"{w.get('p99_ms', '')} | {w.get('max_ms', '')} | {w['errors']} |")
        lines += ["", "| model | requests | p50 ms | p90 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for model, p in s["latency_by_model"].items():
            lines.append(f"| {model} | {p['n']} | {p.get('p50_ms', '')} | {p.get('p90_ms', '')} | {p.get('p99_ms', '')} | {p.get('max_ms', '')} |")
        lines += ["", *[f"- {'ok' if ok else '**FAILED**'}: {check}" for check, ok in s["checks"].items()], ""]
    for o in report.get("overload", []):
        if "not_run" in o:
            lines += [f"## Overload ({o['protocol']})", "", f"Not run: {o['not_run']}.", ""]
            continue
        lines += [f"## Overload ({o['protocol']})", "",
                  f"{o['sent']} {o['model']} requests at once ({o['steps']} steps): queue {o['max_queue_size']}, batch "
                  f"{o['max_batch']}, {o['instances']} instance(s), so at most {o['capacity']} can be held. Served {o['served']}, "
                  f"refused {o['rejected']} (`{o['rejection_message'][:100]}`), other {o['other']}, hung {o['hung']}.", "",
                  f"Refusal latency from sending: {o['rejection_latency']}. Served latency: {o['served_latency']}. "
                  f"p50 before {o['baseline_p50_ms']} ms, after {o['recovery_p50_ms']} ms (x{o['recovery_ratio']}).", "",
                  *[f"- {'ok' if ok else '**FAILED**'}: {check}" for check, ok in o["checks"].items()], ""]
    lines += ["## Findings", "", *([f"- {f}" for f in report["findings"]] or ["- none"]), ""]
    return "\n".join(lines)
