"""The deployment files, checked the way operators' tools check them: hadolint, promtool, the
Kubernetes and compose schemas, and the dashboard's queries against the metrics the server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.client_paths import SESSION_HEADER
from service.metrics import Metrics
from service.settings import Settings
from tests.server_process import free_port

pytestmark = pytest.mark.slow  # deploy checks (hadolint, promtool, schemas)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s" / "base"  # deploy/k8s/ applies it; deploy/k8s/gpu/ patches it
K8S_FILES = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:  # never a silent skip: the README's test command installs it
        pytest.fail(f"{name} is missing: bash scripts/test.sh installs it (or the test extra)")
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def exported_metric_names() -> set[str]:
    return Metrics().series_names()


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\brnnserve_[a-z_]+", expr))


def recording_rules() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_hadolint_accepts_the_dockerfile() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_is_a_build_arg_and_runtime_is_lean() -> None:
    text = "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    )
    assert re.search(r"^ARG BASE_IMAGE=", text, re.MULTILINE)
    assert "FROM ${BASE_IMAGE} AS runtime-base" in text
    assert "torch" not in text and "[training]" not in text and "[test]" not in text
    assert 'ENTRYPOINT ["rnnserve", "serve"]' in text and 'CMD ["rnnserve", "health"]' in text
    assert re.search(r"^USER 10001$", text, re.MULTILINE)
    # The GPU image: the CUDA and cuDNN wheels' libraries reach the loader (onnxruntime's CUDA
    # provider has no search path for them), and onnxruntime-gpu's telemetry stays off.
    assert "/etc/ld.so.conf.d/" in text and "ldconfig" in text
    assert "ORT_DISABLE_TELEMETRY=1" in text


def test_promtool_accepts_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (
        ("check", "config", "deploy/prometheus/prometheus.yml"),
        ("check", "rules", "deploy/prometheus/rules.yml"),
        ("test", "rules", "deploy/prometheus/rules_test.yml"),  # the alerts fire when they should
    ):
        result = run(promtool, *args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_query_only_real_metrics() -> None:
    exported = exported_metric_names()
    rules_text = (DEPLOY / "prometheus" / "rules.yml").read_text()
    assert metric_names_in(rules_text) <= exported, metric_names_in(rules_text) - exported
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "rnnserve.json").read_text())
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= metric_names_in(target["expr"])
    assert queried and queried <= exported, queried - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate",
        "p99",
        "queue wait",
        "batch size",
        "active sessions",
        "ends by reason",
        "failures",
    ):
        assert topic in titles, topic


# What an expression measures, and the Grafana units that may show it.
PANEL_UNITS = {
    "seconds": {"s", "ms"},
    "share of time": {"percentunit"},  # seconds per second
    "bytes": {"bytes", "decbytes"},
    "per second": {"reqps", "ops", "cps"},
    "count": {"short", "none"},
}


def quantity_of(expr: str) -> str:
    """What a dashboard query measures, from its metric names and functions."""
    names = metric_names_in(expr)
    if "histogram_quantile" in expr:
        return "seconds" if all(n.endswith("_seconds_bucket") for n in names) else "count"
    if any(n.endswith("_bytes") for n in names):
        return "bytes"
    if "/" in expr:  # a mean (a histogram's sum over its count) is in the histogram's unit
        return "seconds" if all("_seconds_" in n for n in names) else "count"
    if "rate(" in expr:
        return "share of time" if any(n.endswith("_seconds_sum") for n in names) else "per second"
    return "count"


def test_dashboard_panels_have_one_unit_and_use_the_datasource_variable() -> None:
    text = (DEPLOY / "grafana" / "dashboards" / "rnnserve.json").read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Every reference goes through the variable: importing into a Grafana whose Prometheus data
    # source has another uid works (a hard-coded uid breaks every panel there).
    uids = re.findall(r'"uid":\s*"([^"]*)"', text)
    assert set(uids) == {"${datasource}", dashboard["uid"]}, set(uids)
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert not any(
            p.get("id") == "unit"
            for o in panel["fieldConfig"]["overrides"]
            for p in o.get("properties", [])
        ), panel["title"]  # one axis, one unit
        if panel["type"] == "heatmap":
            continue  # its axis is the buckets' bounds
        quantities = {quantity_of(t["expr"]) for t in panel["targets"]}
        assert len(quantities) == 1, (panel["title"], quantities)
        assert unit in PANEL_UNITS[quantities.pop()], (panel["title"], unit)


def test_each_failure_code_is_in_one_alert_class() -> None:
    """Server faults page, refusals for load and clients' mistakes only warn: every status code
    the server counts is in exactly one class."""
    from service.api.status import GRPC_CODES

    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    records = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    classes = {}
    for record in (
        "rnnserve:server_failures:rate5m",
        "rnnserve:refused:ratio_rate5m",
        "rnnserve:client_failures:ratio_rate5m",
    ):
        (codes,) = set(re.findall(r'code=~"([A-Z_|]+)"', records[record]))
        classes[record] = set(codes.split("|"))
    assert classes["rnnserve:server_failures:rate5m"] == {"INTERNAL", "UNAVAILABLE"}
    every = [code for codes in classes.values() for code in codes]
    assert len(every) == len(set(every))  # no code in two classes
    assert set(every) == {code.name for code in GRPC_CODES.values()} | {"INTERNAL"}
    severities = {
        r["alert"]: r["labels"]["severity"]
        for g in rules["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert severities["RnnserveServerErrors"] == "critical"
    assert (
        severities["RnnserveRequestsRefused"] == severities["RnnserveClientErrorRatio"] == "warning"
    )
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "rules_test.yml").read_text())
    )
    assert tested == set(severities)  # promtool tests every alert


def test_compose_file_follows_the_compose_spec_and_wires_the_stack() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"rnnserve", "prometheus", "grafana"}
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "rnnserve:8002"


def test_kubernetes_manifests_validate_and_are_consistent() -> None:
    files = [str(K8S / name) for name in K8S_FILES]
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == K8S_FILES
    # `kubectl apply -k deploy/k8s/` (docs/DEPLOY.md) applies the base as it is.
    top = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert set(top) == {"apiVersion", "kind", "resources"} and top["resources"] == ["base"]
    settings = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    for key in settings:
        assert key.removeprefix("RNNSERVE_").lower() in Settings.model_fields, key
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(settings["RNNSERVE_DRAIN_TIMEOUT_S"]) + 5
    container = pod["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == int(settings["RNNSERVE_GRPC_PORT"])


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge patch as far as deploy/k8s/gpu uses it: maps merge, lists of maps
    that all have a name (containers, env) merge by name, any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged_list = list(base)
        for item in patch:
            at = [i for i, old in enumerate(merged_list) if old["name"] == item["name"]]
            if at:
                merged_list[at[0]] = strategic_merge(merged_list[at[0]], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize directory` renders, for the features deploy/k8s uses (resources,
    images with a new tag, strategic-merge patches from files); anything else fails here, so a
    new feature is modelled before it is trusted. Checked equal to kubectl 1.32's (kustomize 5.5)
    output when written."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources", "images", "patches"}, set(spec)
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += kustomize(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for image in spec.get("images", []):
        assert set(image) == {"name", "newTag"}, image
        for doc in docs:
            for container in (
                doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            ):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image['name']}:{image['newTag']}"
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, entry
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        key = (patch["kind"], patch["metadata"]["name"])
        (at,) = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == key]
        docs[at] = strategic_merge(docs[at], patch)
    return docs


def test_gpu_overlay_renders_valid_manifests_with_one_gpu_per_pod(tmp_path: Path) -> None:
    """deploy/k8s/gpu: the base with the GPU image, the CUDA provider and nvidia.com/gpu, and
    nothing else changed; what it renders passes the same schema validation as the base."""
    base = kustomize(DEPLOY / "k8s")
    gpu = kustomize(DEPLOY / "k8s" / "gpu")
    files = []
    for i, doc in enumerate(gpu):
        files.append(tmp_path / f"{i}-{doc['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    changed = {(doc["kind"], doc["metadata"]["name"]) for doc in gpu if doc not in base}
    assert changed == {("Deployment", "rnnserve"), ("ConfigMap", "rnnserve-settings")}
    assert len(gpu) == len(base)
    (settings,) = [
        doc["data"]
        for doc in gpu
        if doc["kind"] == "ConfigMap" and "envoy" not in doc["metadata"]["name"]
    ]
    assert settings["RNNSERVE_EXECUTION_PROVIDER"] == "cuda"
    for key in settings:
        assert key.removeprefix("RNNSERVE_").lower() in Settings.model_fields, key
    deployment = one(gpu, "Deployment", "rnnserve")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The tag the documented GPU build makes.
    assert container["image"] == "rnnserve:gpu"
    assert any(c.endswith(f"-t {container['image']} .") for c in documented_build_commands())
    assert container["envFrom"] == [{"configMapRef": {"name": "rnnserve-settings"}}]


# What each manifest holds; alternatives/ holds examples that no kustomization applies.
K8S_KINDS = {
    "configmap.yaml": ["ConfigMap"],
    "deployment.yaml": ["Deployment"],
    "service.yaml": ["Service", "Service"],
    "hpa.yaml": ["HorizontalPodAutoscaler"],
    "pdb.yaml": ["PodDisruptionBudget"],
    "redis.yaml": ["StatefulSet", "Service"],
    "envoy-session-affinity.yaml": ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"],
}
ALTERNATIVES = DEPLOY / "k8s" / "alternatives"


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def envoy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", "rnnserve-envoy")["data"]["envoy.yaml"])


def test_every_kubernetes_manifest_holds_the_expected_kinds() -> None:
    assert set(K8S_FILES) == set(K8S_KINDS)
    for name, kinds in K8S_KINDS.items():
        docs = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
        assert [doc["kind"] for doc in docs] == kinds, name
    # The alternatives parse, and nothing applies them: no kustomization names them.
    (istio,) = yaml.safe_load_all((ALTERNATIVES / "istio.yaml").read_text())
    assert istio["kind"] == "DestinationRule"
    for kustomization in (DEPLOY / "k8s").rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        for resource in resources:
            assert (kustomization.parent / resource).exists(), (kustomization, resource)
            assert "alternatives" not in resource, (kustomization, resource)


def test_the_pods_form_one_cluster_on_the_redis_service() -> None:
    """Every rnnserve pod is a member of the cluster whose store is the Redis of redis.yaml, reached
    by its Service's name and port; it keeps no local state (no volume, no snapshots); each Service
    selects the pods of exactly one workload."""
    docs = kustomize(DEPLOY / "k8s")
    settings = one(docs, "ConfigMap", "rnnserve-settings")["data"]
    values = Settings(**{key.removeprefix("RNNSERVE_").lower(): v for key, v in settings.items()})
    assert values.clustered and values.snapshot_backend == "none"
    url = urlsplit(values.cluster_redis_url)
    redis = one(docs, "StatefulSet", "rnnserve-redis")
    redis_service = one(docs, "Service", url.hostname or "")
    assert (
        url.scheme == "redis"
        and redis_service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    )
    (redis_port,) = redis_service["spec"]["ports"]
    assert url.port == redis_port["port"]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert redis_port["targetPort"] in [p["name"] for p in redis_container["ports"]]
    # One Redis, persistent across its own restarts, never evicting a session or a lease.
    assert redis["spec"]["replicas"] == 1
    args = " ".join(redis_container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert redis_container["image"].startswith("redis:7")

    deployment = one(docs, "Deployment", "rnnserve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "rnnserve-settings"}}]
    assert "volumes" not in pod and "volumeMounts" not in container  # nothing kept in the pod
    assert "RNNSERVE_CLUSTER_REPLICA_ID" not in settings  # a new replica per process
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}

    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in [d for d in docs if d["kind"] == "Service"]:
        selected = [w for w in workloads if selects(service["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, service["metadata"]["name"]
    for budget in [d for d in docs if d["kind"] == "PodDisruptionBudget"]:
        selector = budget["spec"]["selector"]["matchLabels"]
        assert len([w for w in workloads if selects(selector, pod_labels(w))]) == 1


def test_a_stopping_pod_has_time_to_drain_and_hand_its_sessions_over() -> None:
    """The grace period covers the preStop sleep, the drain of the chunks in flight, the gRPC
    grace (1 s) and at least 20 s for writing every session to the cluster store."""
    docs = kustomize(DEPLOY / "k8s")
    settings = one(docs, "ConfigMap", "rnnserve-settings")["data"]
    pod = one(docs, "Deployment", "rnnserve")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings["RNNSERVE_DRAIN_TIMEOUT_S"])
    assert 0 < sleep <= 15
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 1 + 20
    assert container["readinessProbe"]["grpc"]["port"] == int(settings["RNNSERVE_GRPC_PORT"])


def test_envoy_hashes_the_session_header_onto_the_ready_pods_over_http2() -> None:
    docs = kustomize(DEPLOY / "k8s")
    envoy = envoy_config(docs)
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    hcm = manager["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    (route,) = host["routes"]
    (cluster,) = envoy["static_resources"]["clusters"]
    assert route["route"]["cluster"] == cluster["name"]
    # Ring hash on the header the client sends.
    assert cluster["lb_policy"] == "RING_HASH"
    assert route["route"]["hash_policy"] == [{"header": {"header_name": SESSION_HEADER}}]
    # HTTP/2 to the pods (gRPC), from the headless Service: one address per ready pod.
    options = cluster["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    assert cluster["type"] == "STRICT_DNS"
    ((endpoint,),) = [e["lb_endpoints"] for e in cluster["load_assignment"]["endpoints"]]
    address = endpoint["endpoint"]["address"]["socket_address"]
    pods = one(docs, "Service", address["address"])
    assert pods["spec"]["clusterIP"] == "None"
    assert selects(pods["spec"]["selector"], pod_labels(one(docs, "Deployment", "rnnserve")))
    assert address["port_value"] == pods["spec"]["ports"][0]["port"]
    # Streams last as long as their sessions.
    settings = one(docs, "ConfigMap", "rnnserve-settings")["data"]
    assert route["route"]["timeout"] == "0s"
    idle = float(hcm["stream_idle_timeout"].removesuffix("s"))
    assert idle > float(settings["RNNSERVE_SESSION_TTL_S"])
    # Retries only where the request never reached a pod.
    retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
    assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request"}, retry_on
    # A pod leaves the ring when its gRPC health says so, or when it cannot be reached; its own gRPC
    # errors never eject it; no panic routing to pods known to be down.
    (check,) = cluster["health_checks"]
    assert "grpc_health_check" in check
    outliers = cluster["outlier_detection"]
    assert outliers["split_external_local_origin_errors"] is True
    assert outliers["enforcing_consecutive_5xx"] == 0
    assert outliers["enforcing_consecutive_gateway_failure"] == 0
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert cluster["ignore_health_on_host_removal"] is True
    # Every live session's stream is one request: the breaker admits max_sessions of them.
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] >= int(settings["RNNSERVE_MAX_SESSIONS"])

    # The Envoy Deployment runs this file, and its Service reaches the listener.
    proxy = one(docs, "Deployment", "rnnserve-envoy")["spec"]["template"]["spec"]
    (container,) = proxy["containers"]
    config_path = container["args"][container["args"].index("-c") + 1]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in proxy["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "rnnserve-envoy"
    assert config_path == f"{mount['mountPath']}/envoy.yaml"
    (port,) = container["ports"]
    assert port["containerPort"] == listener["address"]["socket_address"]["port_value"]
    service = one(docs, "Service", "rnnserve-envoy")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert container["image"].startswith("envoyproxy/envoy:v1.")
    minor = int(container["image"].split(":v1.")[1].split(".")[0].split("-")[0])
    assert minor >= 31  # reset-before-request


def test_the_istio_alternative_hashes_the_same_header() -> None:
    (rule,) = yaml.safe_load_all((ALTERNATIVES / "istio.yaml").read_text())
    policy = rule["spec"]["trafficPolicy"]
    assert policy["loadBalancer"]["consistentHash"] == {"httpHeaderName": SESSION_HEADER}
    # The ClusterIP Service (Istio does not balance a headless one).
    service = one(kustomize(DEPLOY / "k8s"), "Service", rule["spec"]["host"])
    assert "clusterIP" not in service["spec"]
    assert policy["outlierDetection"]["consecutive5xxErrors"] == 0


def test_nginx_accepts_the_shipped_config_which_fails_over_on_connection_errors_only(
    tmp_path: Path,
) -> None:
    """`nginx -t` on deploy/nginx/rnnserve.conf (its replicas on loopback); it hashes the session
    header, and passes a call to the next replica only on a connection error or timeout: never a
    call already sent (no non_idempotent), never on a replica's answer (no http_5xx)."""
    from tests.nginx_server import SHIPPED_CONFIG, Nginx

    Nginx(tmp_path, [free_port(), free_port()]).check()
    text = "\n".join(line.split("#")[0] for line in SHIPPED_CONFIG.read_text().splitlines())
    assert re.search(r"^\s*hash \$http_x_session_id consistent;", text, re.M)
    assert SESSION_HEADER.replace("-", "_") in "http_x_session_id"
    (passes,) = re.findall(r"^\s*grpc_next_upstream ([^;]*);", text, re.M)
    assert passes.split() == ["error", "timeout"]
    servers = re.findall(r"^\s*server \S+ ([^;]*);", text, re.M)
    assert servers and all("max_fails=1" in s for s in servers), servers


def shell_commands(text: str) -> list[str]:
    """The commands in shell text: continuation lines joined, comments and blank runs dropped,
    whitespace collapsed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(" ".join(line.split()))
    return commands


def documented_build_commands() -> list[str]:
    """The commands in DEPLOY.md's shell blocks that make the base image or build the image."""
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)
    builds = ("docker build", "sudo debootstrap", "sudo rm", "sudo cp", "sudo tar")
    return [c for b in blocks for c in shell_commands(b) if c.startswith(builds)]


def test_smoke_script_runs_the_documented_build_commands_verbatim() -> None:
    documented = documented_build_commands()
    assert "docker build -t rnnserve ." in documented  # Docker Hub and PyPI reachable
    assert any("BASE_IMAGE=local/debian-python:bookworm" in c for c in documented)  # no Docker Hub
    assert "docker build --build-arg EXECUTION_PROVIDER=cuda -t rnnserve:gpu ." in documented  # GPU
    smoke = shell_commands((DEPLOY / "smoke.sh").read_text())
    for command in documented:
        assert command in smoke, command


def test_the_build_needs_no_buildkit() -> None:
    """Debian's docker.io 20.10 uses the legacy builder unless DOCKER_BUILDKIT=1, and a newer client
    without buildx has only the legacy builder (and refuses DOCKER_BUILDKIT=1): the Dockerfile and
    the documented commands must work with it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("--mount" in line for line in instructions)
    assert not re.search(r"^# *syntax=", dockerfile, re.MULTILINE)  # a BuildKit frontend
    assert not re.search(r"<<-?\s*[A-Z]+", "\n".join(instructions))  # heredocs are BuildKit-only
    # The legacy builder builds every stage before the target, so no stage may go unused (a GPU
    # stage before the CPU image would download CUDA for every CPU build).
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE)
    used = set(re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE))
    used |= set(re.findall(r"--from=(\S+)", dockerfile))
    assert all(stage in used for stage in stages[:-1]), stages
    commands = documented_build_commands() + shell_commands((DEPLOY / "smoke.sh").read_text())
    for command in commands:
        assert "DOCKER_BUILDKIT" not in command and "--secret" not in command, command


def test_dockerignore_admits_only_what_the_dockerfile_copies() -> None:
    """The build context is the Dockerfile's COPY sources and nothing else (no .venv, .git, caches,
    state or results): .dockerignore excludes everything and lets back in exactly those."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied |= set(line.split()[1:-1])
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == copied
    assert "**/__pycache__" in lines and "**/*.egg-info" in lines
