"""deploy/: the Kubernetes manifests, checked against the Kubernetes API's own models and against what `vilex serve`
does.

1. Every Kubernetes object in deploy/ deserializes into the `kubernetes` client's class for its apiVersion and kind
   (strict types, required fields), and serializes back to exactly what the file says: a field the API does not
   have would be dropped on the way in, and fails here (as it would be dropped, or refused, by the API server).
2. tritonserver's flags in the Deployment are `vilex serve`'s (`server_flags`), with the admin key from a Secret;
   ports are `vilex serve`'s defaults (its parser and `Ports`); the probes' paths answer on a real tritonserver
   without the admin key (the session's server, `served` in conftest.py), and the liveness script passes there and
   fails on a real zombie named like a Python-backend stub.
3. The HPA is on autoscaling/v2 and scales on the metric the prometheus-adapter rule names; the rule's series exist
   in a real tritonserver's metrics with a `model` label, its model filter selects exactly the pipeline models, the
   quotient it takes is the mean queue time per request, and Prometheus's own engine (promtool, where installed)
   computes it per pod from counters.
4. KServe's InferenceService: no schema of it installs with the CI's packages (the `kserve` SDK's models import
   its whole model server, fastapi, uvicorn and pandas, and pin psutil<6 under the serve extra's psutil 7), so it is
   checked structurally: the container and pod fields through the Kubernetes models, the rest by name; where the
   SDK is installed, strictly against its models too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the `kubernetes` client is in the scale extra (pip install -e '.[scale]')")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
DOC = ROOT / "docs" / "deploy.md"
NOT_KUBERNETES_OBJECTS = {"kustomization.yaml"}  # kustomize's own file
# KServe's ComponentExtensionSpec fields used here (serving.kserve.io/v1beta1): the predictor's other fields are a
# PodSpec's.
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas"}
# The triton predictor (PredictorExtensionSpec): a Container plus these.
KSERVE_PREDICTOR_EXTENSION_FIELDS = {"storageUri", "runtimeVersion", "protocolVersion"}


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_documents() -> list[tuple[str, int, dict]]:
    """(file, index, document) for every Kubernetes object in deploy/ (KServe's custom resource aside)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name in NOT_KUBERNETES_OBJECTS or path == ADAPTER_VALUES:
            continue
        for index, doc in enumerate(load_documents(path)):
            if not doc["apiVersion"].startswith("serving.kserve.io/"):
                found.append((path.relative_to(DEPLOY).as_posix(), index, doc))
    return found


def by_kind(kind: str, folder: Path = KUBERNETES) -> dict:
    docs = [doc for path in sorted(folder.glob("*.yaml")) for doc in load_documents(path) if doc.get("kind") == kind]
    assert len(docs) == 1, (kind, folder, len(docs))
    return docs[0]


def manifest(name: str) -> dict:
    (document,) = load_documents(KUBERNETES / name)
    return document


def client_class(api_version: str, kind: str) -> str:
    """The client's model class for an apiVersion and kind: apps/v1 Deployment -> V1Deployment,
    autoscaling/v2 HorizontalPodAutoscaler -> V2HorizontalPodAutoscaler."""
    version = api_version.rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + kind


def deserialize(document: dict, class_name: str):
    """`document` as the client's model `class_name`, the way the client reads an API server's answer."""
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(document, class_name)


def round_trip(document: dict, class_name: str) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(deserialize(document, class_name))


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def secret_refs(node):
    """Every secretKeyRef in a document."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_refs(value)


def serve_defaults():
    """`vilex serve DIR`'s parsed defaults (its ports)."""
    from vilex.cli import build_parser

    return build_parser().parse_args(["serve", "DIR"])


# ---- 1. Kubernetes objects ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,index,document", kubernetes_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_is_a_kubernetes_object(name, index, document):
    import kubernetes.client

    class_name = client_class(document["apiVersion"], document["kind"])
    assert hasattr(kubernetes.client, class_name), f"{name}: no {document['apiVersion']} {document['kind']} in the API"
    assert round_trip(document, class_name) == document, f"{name}: fields the API does not have (or of another type)"


def test_the_strict_check_catches_what_the_api_would_drop_or_refuse():
    """The check above is not vacuous: a misspelled field, a wrong type and a removed API version all fail it."""
    import kubernetes.client

    service = manifest("service.yaml")
    misspelled = {**service, "spec": {**service["spec"], "selectr": service["spec"]["selector"]}}
    assert round_trip(misspelled, "V1Service") != misspelled
    wrong_type = {**service, "spec": {**service["spec"], "ports": [{**service["spec"]["ports"][0], "port": "8000"}]}}
    with pytest.raises(Exception):
        round_trip(wrong_type, "V1Service")
    # Triton's k8s-onprem chart still writes autoscaling/v2beta2, removed in Kubernetes 1.26.
    assert not hasattr(kubernetes.client, client_class("autoscaling/v2beta2", "HorizontalPodAutoscaler"))


def test_kustomization_applies_every_manifest_and_sets_the_image():
    kustomization = load_documents(KUBERNETES / "kustomization.yaml")[0]
    one_off = {"load-repository.yaml"}  # a Pod to fill the volume, applied by hand (docs/deploy.md)
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - NOT_KUBERNETES_OBJECTS - one_off
    assert set(kustomization["resources"]) == files
    (image,) = kustomization["images"]
    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert image["name"] == container["image"]


# ---- 2. tritonserver as `vilex serve` runs it ----------------------------------------------------------------------
def test_the_deployment_gives_tritonserver_the_flags_of_vilex_serve():
    from vilex.serving.server import ADMIN_KEY_ENV, Ports, server_flags

    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tritonserver"]
    # The pod listens on every interface (0.0.0.0); everything else is what `vilex serve` passes.
    expected = server_flags(Path("$(MODEL_REPOSITORY)"), Ports(), f"$({ADMIN_KEY_ENV})", "0.0.0.0")
    assert container["args"] == expected
    # Kubernetes expands $(VAR) only for variables the container defines; an unknown one stays literal.
    env = env_of(container)
    for variable in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert variable in env, variable
    assert env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "vilex-triton-admin", "key": "admin-key"}
    assert not env[ADMIN_KEY_ENV].get("value")


def test_the_admin_key_secret_is_created_as_the_docs_say():
    """Every Secret the manifests read (the optional object-storage credentials aside) is created by a command in
    docs/deploy.md with that name and key."""
    doc = DOC.read_text()
    refs = {(ref["name"], ref["key"]) for path in [*KUBERNETES.glob("*.yaml"), *KSERVE.glob("*.yaml")]
            for document in load_documents(path) for ref in secret_refs(document) if not ref.get("optional")}
    assert refs == {("vilex-triton-admin", "admin-key")}
    for name, key in refs:
        assert re.search(rf"kubectl create secret generic {name} --from-literal={key}=", doc), (name, key)


def test_ports_are_the_defaults_of_vilex_serve():
    from vilex.serving.server import Ports

    defaults = serve_defaults()
    ports = {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}
    assert ports == {"http": Ports().http, "grpc": Ports().grpc, "metrics": Ports().metrics}
    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    service = manifest("service.yaml")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == \
        {name: (port, name) for name, port in ports.items()}
    assert service["spec"]["selector"] == by_kind("Deployment")["spec"]["selector"]["matchLabels"]
    headless = load_documents(KUBERNETES / "service-headless.yaml")[0]
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"grpc": ports["grpc"]}
    annotations = by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def liveness_script(container: dict) -> str:
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"], command  # the image's Python (deploy/Dockerfile installs vilex into it)
    return command[2]


def run_liveness(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_probes_use_tritons_health_endpoints_on_the_http_port():
    from vilex.serving.server import EXIT_TIMEOUT_S, Ports

    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe")} == \
        {"startupProbe": {"path": "/v2/health/ready", "port": "http"},
         "readinessProbe": {"path": "/v2/health/ready", "port": "http"}}
    # Liveness asks /v2/health/live on the HTTP port, and first looks for dead stubs (tests below).
    script = liveness_script(container)
    assert "/v2/health/live" in script and f'"TRITON_HTTP_PORT", "{Ports().http}"' in script
    # The pod stops within its grace period: preStop, then tritonserver's own wait for requests in flight.
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + EXIT_TIMEOUT_S


# A parent that leaves a dead child named like a Python-backend stub unreaped, as tritonserver 2.51 leaves a
# killed stub (docs/health.md): the child stays a zombie of that parent until the parent exits.
ZOMBIE_PARENT = """
import ctypes, os, time
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(15, b"triton_python_backend_stub", 0, 0, 0)  # PR_SET_NAME (the kernel keeps 15 bytes)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_the_liveness_probe_fails_when_a_stub_is_a_zombie():
    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    script = liveness_script(container)
    parent = subprocess.Popen([sys.executable, "-c", ZOMBIE_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = parent.stdout.readline().strip()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.05)
        # Nothing listens on the HTTP port given: the probe must fail on the stub before it asks.
        probe = run_liveness(script, TRITON_PID=str(parent.pid), TRITON_HTTP_PORT="1")
        assert probe.returncode != 0
        assert f"a Python backend stub of tritonserver died (pid {child})" in probe.stderr, probe.stderr
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.triton
def test_the_probes_pass_on_a_real_tritonserver_without_the_admin_key(served):
    """The kubelet sends no admin key: the probes' paths must be open and 200 on a ready server, and the liveness
    script passes on a server whose stubs are alive (and fails when nothing answers on the port)."""
    from vilex.serving.server import free_ports

    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    for kind in ("startupProbe", "readinessProbe"):
        with urllib.request.urlopen(f"http://{served.http}{container[kind]['httpGet']['path']}", timeout=10) as response:
            assert response.status == 200, kind
    script = liveness_script(container)
    passed = run_liveness(script, TRITON_PID=str(served.server_pid), TRITON_HTTP_PORT=served.http.rsplit(":", 1)[1])
    assert passed.returncode == 0, passed.stderr
    (closed,) = free_ports(1)
    assert run_liveness(script, TRITON_PID=str(served.server_pid), TRITON_HTTP_PORT=str(closed)).returncode != 0


def test_the_image_is_nvidias_triton_container_with_vilex():
    """deploy/Dockerfile builds on the container `vilex serve --docker` names, with the serve extra's numpy pin, and
    the kustomization's tag says which vilex and which release."""
    from vilex.serving.server import CONTAINER_IMAGE

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^ARG TRITON_IMAGE={re.escape(CONTAINER_IMAGE)}$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", dockerfile, re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "numpy<2" in project["optional-dependencies"]["serve"] and '"numpy<2"' in dockerfile
    release = CONTAINER_IMAGE.rsplit(":", 1)[1].removesuffix("-py3")  # 24.10
    (image,) = load_documents(KUBERNETES / "kustomization.yaml")[0]["images"]
    assert image["newTag"] == f"{project['version']}-{release}"
    isvc = load_documents(KSERVE / "inferenceservice.yaml")[0]
    assert isvc["spec"]["predictor"]["triton"]["image"].rsplit(":", 1)[1] == image["newTag"]
    # The shared-memory volume is the size `vilex serve --docker` gives docker.
    from vilex.serving.server import docker_command

    shm = next(a for a in docker_command("/tmp") if a.startswith("--shm-size="))
    volumes = {v["name"]: v for v in by_kind("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert shm == "--shm-size=1g" and volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}


# ---- 3. autoscaling on queue time --------------------------------------------------------------------------------------
def adapter_rule() -> dict:
    (rule,) = load_documents(ADAPTER_VALUES)[0]["rules"]["custom"]
    return rule


def model_filter(query: str) -> str:
    filters = set(re.findall(r'model=~"([^"]+)"', query))
    assert len(filters) == 1, filters
    return filters.pop()


@pytest.mark.parametrize("hpa_file,target", [(KUBERNETES / "hpa.yaml", "vilex-triton"), (KSERVE / "hpa.yaml", "vilex-predictor")])
def test_the_hpa_scales_its_deployment_on_the_adapters_metric(hpa_file, target):
    hpa = load_documents(hpa_file)[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    # Above the batching delay that every pipeline request may spend queued.
    from vilex.serving.config import PIPELINE_QUEUE_DELAY_US

    assert float(metric["pods"]["target"]["averageValue"]) > PIPELINE_QUEUE_DELAY_US / 1000
    if target == "vilex-triton":
        assert target == by_kind("Deployment")["metadata"]["name"]
    else:  # KServe names the predictor's Deployment <InferenceService>-predictor
        assert target == load_documents(KSERVE / "inferenceservice.yaml")[0]["metadata"]["name"] + "-predictor"


def test_the_adapter_rule_selects_the_pipeline_models_per_pod():
    from vilex.engines.contract import GRAPH_NAMES
    from vilex.serving.interface import PIPELINE_MODELS

    rule = adapter_rule()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series) and series == "nv_inference_queue_duration_us"
    query = rule["metricsQuery"]
    assert re.findall(r"rate\((\w+)\{<<\.LabelMatchers>>", query) == ["nv_inference_queue_duration_us",
                                                                      "nv_inference_request_success"]
    assert query.count("sum by (<<.GroupBy>>)") == 2  # per pod: the adapter groups by the pod (and namespace)
    models = model_filter(query)
    assert [m for m in PIPELINE_MODELS if re.fullmatch(models, m)] == list(PIPELINE_MODELS)
    assert not [g for g in GRAPH_NAMES if re.fullmatch(models, g)]


def pod_query(template: str, namespace: str, pods: list[str]) -> str:
    """The rule's metricsQuery as prometheus-adapter sends it for pods of a namespace (its Go template filled in)."""
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return template.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not on PATH (Debian: apt-get install prometheus; CI installs pip packages only)")
def test_the_adapter_query_gives_the_mean_queue_time_per_pod_in_prometheus(tmp_path):
    """Prometheus's own engine (`promtool test rules`) evaluates the filled-in query over counters that grow as a
    tritonserver's would: pod a queues 90 ms a minute over 3 vilex_reconstruct requests and 30 ms over 1
    vilex_generate request (30 ms per request), and its unet graph model queues far more, which must not count; pod
    b has no requests (0, not NaN); a pod of another namespace is not asked for."""
    pods = ["vilex-triton-a", "vilex-triton-b"]

    def series(metric: str, pod: str, model: str, per_minute: float, namespace: str = "vilex") -> dict:
        # One sample every 15 s for 10 minutes, growing at `per_minute`.
        return {"series": f'{metric}{{namespace="{namespace}",pod="{pod}",model="{model}",version="1"}}',
                "values": f"0+{per_minute / 4:g}x40"}

    queue, count = "nv_inference_queue_duration_us", "nv_inference_request_success"
    tests = {"rule_files": [], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            series(queue, pods[0], "vilex_reconstruct", 90_000), series(count, pods[0], "vilex_reconstruct", 3),
            series(queue, pods[0], "vilex_generate", 30_000), series(count, pods[0], "vilex_generate", 1),
            series(queue, pods[0], "unet", 9_000_000), series(count, pods[0], "unet", 100),
            series(queue, pods[1], "vilex_reconstruct", 0), series(count, pods[1], "vilex_reconstruct", 0),
            series(queue, "other", "vilex_reconstruct", 999_999, "elsewhere"),
            series(count, "other", "vilex_reconstruct", 1, "elsewhere"),
        ],
        "promql_expr_test": [{
            "expr": pod_query(adapter_rule()["metricsQuery"], "vilex", pods),
            "eval_time": "10m",
            "exp_samples": [{"labels": f'{{pod="{pods[0]}"}}', "value": 30}, {"labels": f'{{pod="{pods[1]}"}}', "value": 0}],
        }],
    }]}
    path = tmp_path / "adapter_query_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def scrape(metrics_port: int) -> dict[tuple[str, str], float]:
    """{(metric, model): value} of Triton's per-model counters, from its Prometheus text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name, labels, value in re.findall(r"^(nv_inference_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        model = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("model")
        if model is not None:
            values[(name, model)] = float(value)
    return values


@pytest.mark.triton
def test_the_adapters_quotient_is_the_mean_queue_time_on_a_real_tritonserver(served, sample_files):
    """The rule's two series exist per model in a real tritonserver's metrics, and their increments over requests
    divide into a queue time per request between 0 and the requests' own latency."""
    from vilex.serving.client import TritonClient

    query = adapter_rule()["metricsQuery"]
    queue_metric, count_metric = re.findall(r"rate\((\w+)\{", query)
    before = scrape(served.metrics_port)
    assert (queue_metric, "vilex_reconstruct") in before and (count_metric, "vilex_reconstruct") in before
    latencies = []
    with TritonClient(served.http) as client:
        for seed in range(2):
            client.reconstruct([sample_files[0].read_bytes()], num_tokens=4, steps=1, seed=seed)
            latencies.append(client.last_latency_s)
    # Triton refreshes its metrics every --metrics-interval-ms (2 s by default): read until both requests show.
    # Other tests may share the server: at least these two requests were counted.
    deadline = time.monotonic() + 15
    while True:
        after = scrape(served.metrics_port)
        requests = after[(count_metric, "vilex_reconstruct")] - before[(count_metric, "vilex_reconstruct")]
        if requests >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    queued_us = after[(queue_metric, "vilex_reconstruct")] - before[(queue_metric, "vilex_reconstruct")]
    assert requests >= 2
    mean_queue_ms = queued_us / 1000 / requests
    assert 0 <= mean_queue_ms <= max(latencies) * 1000


# ---- 4. KServe ----------------------------------------------------------------------------------------------------
def test_the_inference_service_is_a_triton_predictor_of_kubernetes_parts():
    """Structural (see the module's docstring for why): the triton predictor's container fields are a Container,
    the predictor's pod fields a PodSpec, both strict through the Kubernetes models; the rest is KServe's, by name."""
    from vilex.serving.server import ADMIN_KEY_ENV, Ports, server_flags

    isvc = load_documents(KSERVE / "inferenceservice.yaml")[0]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    predictor = dict(isvc["spec"]["predictor"])
    triton = predictor.pop("triton")
    assert set(predictor) - KSERVE_COMPONENT_FIELDS, "no pod fields"
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    pod["containers"] = []  # required by the model; KServe makes the container from `triton`
    assert round_trip(pod, "V1PodSpec") == pod
    container = {k: v for k, v in triton.items() if k not in KSERVE_PREDICTOR_EXTENSION_FIELDS}
    container["name"] = "kserve-container"  # the runtime's container, which KServe merges these fields into
    assert round_trip(container, "V1Container") == container
    assert re.match(r"(s3|gs|pvc)://", triton["storageUri"])
    # KServe's runtime sets the repository (/mnt/models), the ports and addresses; the args add the rest of
    # `vilex serve`'s flags.
    kserve_sets = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=", "--http-address=",
                   "--grpc-address=", "--metrics-address=")
    expected = [f for f in server_flags(Path("/mnt/models"), Ports(), f"$({ADMIN_KEY_ENV})", "0.0.0.0")
                if not f.startswith(kserve_sets)]
    assert triton["args"] == expected
    assert env_of(triton)[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "vilex-triton-admin", "key": "admin-key"}
    # KServe's triton runtime serves HTTP on 8080: the probes ask there; liveness is the Deployment's script.
    for kind in ("startupProbe", "readinessProbe"):
        assert triton[kind]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert liveness_script(triton) == liveness_script(container).replace('"TRITON_HTTP_PORT", "8000"',
                                                                         '"TRITON_HTTP_PORT", "8080"')


def check_against_kserve(data, type_name: str, path: str = "") -> None:
    """Strict: every field of `data` is one the kserve SDK's generated model `type_name` declares, of its type; the
    Kubernetes types inside (V1Container, V1Volume ...) go through the kubernetes client's models."""
    import kserve.models
    import kubernetes.client

    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        assert isinstance(data, list), f"{path}: expected a list"
        for i, item in enumerate(data):
            check_against_kserve(item, match.group(1), f"{path}[{i}]")
    elif match := re.fullmatch(r"dict\((\w+), (.+)\)", type_name):
        assert isinstance(data, dict), f"{path}: expected a mapping"
        for key, value in data.items():
            check_against_kserve(value, match.group(2), f"{path}.{key}")
    elif type_name in ("str", "int", "bool", "float"):
        assert type(data) is {"str": str, "int": int, "bool": bool, "float": float}[type_name], f"{path}: not {type_name}"
    elif type_name == "object":
        pass
    elif hasattr(kserve.models, type_name):
        model = getattr(kserve.models, type_name)
        fields = {json_name: name for name, json_name in model.attribute_map.items()}
        unknown = set(data) - set(fields)
        assert not unknown, f"{path}: {type_name} has no field {sorted(unknown)}"
        for key, value in data.items():
            check_against_kserve(value, model.openapi_types[fields[key]], f"{path}.{key}")
    else:
        api = kubernetes.client.ApiClient()
        assert hasattr(kubernetes.client, type_name), f"{path}: no model {type_name}"
        assert api.sanitize_for_serialization(api._ApiClient__deserialize(data, type_name)) == data, path


def test_the_inference_service_against_kserves_own_models():
    """Strict, with the `kserve` SDK's generated models where that package is installed (not in CI: see the module's
    docstring). Seen passing with kserve 0.21.0 and kubernetes 37.0.1 in a separate environment."""
    pytest.importorskip("kserve.models", reason="the kserve SDK is not installed (it is in no extra: it would downgrade "
                                                "psutil and bring a model server)")
    isvc = load_documents(KSERVE / "inferenceservice.yaml")[0]
    check_against_kserve(isvc, "V1beta1InferenceService")
    misspelled = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "tritn": {}}}}
    with pytest.raises(AssertionError, match="no field"):
        check_against_kserve(misspelled, "V1beta1InferenceService")
