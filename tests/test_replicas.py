"""Serving replicas behind a real nginx, one of them killed mid-run (issue 21, part 3).

Two `vilex serve` replicas of the tiny export: the session's server (`served` in conftest.py, which is never killed)
and one started here; nginx in front of both (benchmarks/failover.py: `proxy_pass` for HTTP, `grpc_pass` for gRPC,
its retry policy explained in `nginx_config`), run as an unprivileged process with its own prefix on free ports.
Seeded `vilex_reconstruct` requests go through nginx over both protocols; once the replica started here has answered
over both, it is killed (SIGKILL to `vilex serve` and to its tritonserver's process group). The run reports the
requests that failed, the ones nginx retried on the other replica and when it stopped sending to the dead one (its
access log, each send tagged by a header), and compares every answer with the in-process pipeline (`in_process`).

Skipped where nginx is not on PATH (CI installs pip packages only; Debian: `apt-get install nginx`).
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from vilex.benchmarks.failover import Balancer, Replica, run_failover, start_replica, summary

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None,
                                reason="nginx is not on PATH (Debian: apt-get install nginx; CI installs pip packages only)")

STEPS = 3  # as the served tests: enough to run the loop, cheap on 2 cores
KILL_AFTER_S = 2.0  # at least this long, and once the replica to kill has answered over both protocols
AFTER_KILL_S = 5.0  # seconds of traffic after the kill


@pytest.fixture(scope="module")
def replicas(served, tmp_path_factory):
    """[the session's server, a replica of the same repository started here (the one the failover test kills)]."""
    second = start_replica(served.repository, tmp_path_factory.mktemp("replica"), "b", served.admin_key)
    yield [Replica("a", served.http, served.grpc), second]
    second.stop()


@pytest.fixture(scope="module")
def balancer(replicas, tmp_path_factory):
    with Balancer(replicas, keep=tmp_path_factory.mktemp("nginx")) as running:
        yield running


def test_nginx_accepts_the_balancer_config(tmp_path):
    """`nginx -t` on the config, as the unprivileged user nginx runs as (no server needed)."""
    fake = [Replica("a", "127.0.0.1:1", "127.0.0.1:2"), Replica("b", "127.0.0.1:3", "127.0.0.1:4")]
    output = Balancer(fake, keep=tmp_path / "nginx").check_config()
    assert "test is successful" in output
    config = (tmp_path / "nginx" / "nginx.conf").read_text()
    for directive in ("proxy_next_upstream error timeout http_502 http_504 non_idempotent;",
                      "grpc_next_upstream error timeout http_502 http_504 non_idempotent;",
                      "grpc_pass grpc://vilex_grpc;", "proxy_pass http://vilex_http;"):
        assert directive in config, directive
    assert "http_503" not in config  # overload refusals go back to the caller (see nginx_config)


@pytest.mark.triton
def test_the_admin_key_passes_through_the_balancer(balancer, served):
    """The restricted APIs through nginx: refused without the key, answered with it (HTTP header and gRPC
    metadata both reach tritonserver)."""
    import tritonclient.grpc as grpcclient

    request = urllib.request.Request(f"http://{balancer.http}/v2/repository/index", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403
    request.add_header("vilex-admin-key", served.admin_key)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    client = grpcclient.InferenceServerClient(balancer.grpc)
    try:
        with pytest.raises(Exception, match="restricted, expecting header .triton-grpc-protocol-vilex-admin-key"):
            client.get_model_repository_index()
        index = client.get_model_repository_index(headers={"triton-grpc-protocol-vilex-admin-key": served.admin_key})
        assert {model.name for model in index.models} >= {"vilex_reconstruct"}
    finally:
        client.close()


@pytest.mark.triton
def test_a_killed_replica_loses_no_request(balancer, replicas, in_process, sample_files):
    """Both replicas serve until one is killed. Over HTTP nginx sends what was in flight on it to the other replica;
    over gRPC it cannot (it does not keep a gRPC request's body), so those requests fail with UNAVAILABLE and the
    client's one retry gets them answered. nginx stops sending to the dead replica, and every answer is the
    in-process image."""
    report = run_failover(balancer, replicas[1], in_process, sample_files[:2], steps=STEPS, kill_after_s=KILL_AFTER_S,
                          after_kill_s=AFTER_KILL_S, concurrency=2, client_retries=1)
    print(summary(report))
    for protocol, figures in report["protocols"].items():
        assert figures["lost"] == [], (protocol, figures["lost"])
        assert figures["answers_equal_in_process"] == figures["requests"]
        assert figures["not_in_access_log"] == []
        # The replica was in rotation before it died (round robin), so the kill took away capacity.
        assert figures["served_by_dead_replica_before_kill"] >= 1, protocol
        # nginx sent the dead replica nothing more once it had seen it fail (before fail_timeout ran out).
        assert figures["stopped_routing_after_s"] < report["fail_timeout_s"]
    http, grpc = report["protocols"]["http"], report["protocols"]["grpc"]
    assert http["failed_first_try"] == []
    # Only requests that were in flight on the dead replica fail over gRPC, each with UNAVAILABLE.
    assert len(grpc["failed_first_try"]) <= grpc["in_flight_on_dead_replica_at_kill"]
    for failure in grpc["failed_first_try"]:
        assert "UNAVAILABLE" in failure["error"] and failure["start_after_kill_s"] < 0, failure
