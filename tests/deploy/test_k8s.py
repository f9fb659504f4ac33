"""deploy/k8s (kustomize), deploy/prometheus-adapter and deploy/grafana, checked statically: every
object against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail; its
schemas ship in the wheel, so this runs offline); the checkpoint claim written once by the download Job
and mounted read-only by the pods, which wait for the Job's marker; the rollout's surge fits the
startup time; selectors match the pod labels; probes and Service target ports name real container ports;
probes hit Triton's health endpoints; the containers' arguments pass the launcher's and the gateway's
own parsers and agree with the image; one GPU per pod; scraping of the metrics port; the HPA targets the
Deployment on metrics the prometheus-adapter rules compute from metrics the server exports (the metric
names are internvl_serve.serving.metrics' ones; tests/metrics checks them on a real server)."""
from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from deploy_helpers import (
    ADAPTER_VALUES,
    DASHBOARD,
    GATEWAY_MODULE,
    K8S,
    LAUNCHER_MODULE,
    gateway_args,
    k8s_objects,
    launcher_args,
    split_module_command,
    stage,
)
from internvl_serve.serving import metrics

NAME = "internvl-triton"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the schemas must accept (a supported one, 2026)
CRD_KINDS = {"ServiceMonitor"}  # the Prometheus Operator's: no schema in Kubernetes itself
CHECKPOINT_MARKER = ".download-complete"


@pytest.fixture(scope="module")
def objects():
    return k8s_objects()


@pytest.fixture(scope="module")
def deployment(objects):
    return objects[("Deployment", NAME)]


def containers(deployment) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def port_names(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def resolve_port(container, port) -> int:
    names = port_names(container)
    if isinstance(port, str):
        assert port in names, f"{container['name']}: no container port named {port!r}"
        return names[port]
    assert port in names.values(), f"{container['name']}: port {port} is not a container port"
    return port


def triton_args(deployment):
    triton = containers(deployment)["triton"]
    assert "command" not in triton  # the image's ENTRYPOINT (the launcher) runs
    return launcher_args(split_module_command(stage("server").last("ENTRYPOINT").json_args() + triton["args"],
                                              LAUNCHER_MODULE))


def test_every_object_has_the_required_fields(objects):
    assert {kind for kind, _ in objects} == {"PersistentVolumeClaim", "Job", "Deployment", "Service",
                                              "ServiceMonitor", "HorizontalPodAutoscaler"}
    for (kind, name), obj in objects.items():
        assert obj["apiVersion"] and obj["metadata"]["name"] == name and obj.get("spec"), (kind, name)
    for path in K8S.glob("*.yaml"):  # every file is listed (nothing silently left out of `apply -k`)
        listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        assert path.name == "kustomization.yaml" or path.name in listed, f"{path.name} is not in the kustomization"


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_objects_match_the_kubernetes_schemas(objects, version):
    for (kind, name), obj in objects.items():
        if kind in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}/{name} against Kubernetes {version}: {e.message} at {'.'.join(map(str, e.path))}")


def test_schema_validation_catches_a_wrong_field(deployment):
    """The validator is not a no-op: a misspelled field and a wrong type both fail."""
    misspelled = json.loads(json.dumps(deployment))
    misspelled["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "one"
    for bad in (misspelled, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_checkpoint_written_once_then_mounted_read_only(objects, deployment):
    claim = objects[("PersistentVolumeClaim", "internvl-checkpoint")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one writer (the Job), readers on any node
    checkpoint = str(triton_args(deployment).checkpoint)
    job = objects[("Job", "internvl-checkpoint-download")]["spec"]["template"]["spec"]
    download = job["containers"][0]
    env = {e["name"]: e.get("value") for e in download["env"]}
    assert env["CHECKPOINT_DIR"] == checkpoint and env["CHECKPOINT_REPO"] == "OpenGVLab/InternVL-Chat-V1-1"
    assert f'(target / "{CHECKPOINT_MARKER}")' in download["args"][0]  # written last, after the download
    assert download["args"][0].index("snapshot_download(") < download["args"][0].index(CHECKPOINT_MARKER)
    job_mount = next(m for m in download["volumeMounts"] if m["mountPath"] == checkpoint)
    assert not job_mount.get("readOnly")
    job_volumes = {v["name"]: v for v in job["volumes"]}
    assert job_volumes[job_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert job["securityContext"]["runAsUser"] == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (wait,) = pod["initContainers"]
    assert f"[ -f {checkpoint}/{CHECKPOINT_MARKER} ]" in " ".join(wait["command"])
    for container in (wait, containers(deployment)["triton"]):
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == checkpoint)
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"],
                                                                   "readOnly": True}


def test_rollout_surge_outlasts_the_load(deployment):
    """maxSurge 1 / maxUnavailable 0: the new pod (on a spare GPU) must get as long as the startup probe
    allows before the rollout counts as failed; the docs say a spare GPU is needed."""
    spec = deployment["spec"]
    rolling = spec["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)
    startup = containers(deployment)["triton"]["startupProbe"]
    assert spec["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    docs = (K8S.parents[1] / "docs" / "deployment.md").read_text()
    assert "spare GPU" in docs and "maxUnavailable: 1" in docs


def test_selectors_match_pod_labels(objects, deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = objects[("Service", NAME)]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = objects[("ServiceMonitor", NAME)]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports


def test_service_ports_are_container_ports(objects, deployment):
    all_ports = {name: port for c in containers(deployment).values() for name, port in port_names(c).items()}
    service = objects[("Service", NAME)]
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in all_ports, f"Service port {port['name']}: no container port {port['targetPort']}"
        assert all_ports[port["targetPort"]] == port["port"]
    args = triton_args(deployment)
    assert {all_ports["http"], all_ports["grpc"], all_ports["metrics"]} == {args.http_port, args.grpc_port,
                                                                             args.metrics_port}
    assert all_ports["http"] == args.http_port and all_ports["grpc"] == args.grpc_port
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "grpc"


def test_triton_probes_use_the_health_endpoints(deployment):
    triton = containers(deployment)["triton"]
    args = triton_args(deployment)
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = triton[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(triton, get["port"]) == args.http_port, probe
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= args.ready_timeout  # the model may load that long


def test_gateway_sidecar(deployment):
    gateway = containers(deployment)["gateway"]
    args = gateway_args(split_module_command(gateway["command"] + gateway["args"], GATEWAY_MODULE))
    assert args.triton == f"127.0.0.1:{triton_args(deployment).grpc_port}"  # the same pod
    assert args.host == "0.0.0.0" and port_names(gateway)["openai"] == args.port
    for probe in ("readinessProbe", "livenessProbe"):
        assert resolve_port(gateway, gateway[probe]["httpGet"]["port"]) == args.port
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})


def test_one_gpu_per_pod_checkpoint_mounted_non_root(objects, deployment):
    pod = deployment["spec"]["template"]["spec"]
    triton = containers(deployment)["triton"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    image_names = {i["name"] for i in kustomization["images"]}
    assert all(c["image"].split(":")[0] in image_names for c in pod["containers"] + pod["initContainers"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    args = triton_args(deployment)
    checkpoint = mounts[str(args.checkpoint)]
    assert checkpoint["readOnly"] is True
    claim = volumes[checkpoint["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert all(m["name"] in volumes for c in pod["containers"] for m in c.get("volumeMounts", []))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == stage("server").last("USER").args.split(":")[0]
    assert pod["terminationGracePeriodSeconds"] > args.exit_timeout_secs


def test_prometheus_scrapes_the_metrics_port(deployment):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == triton_args(deployment).metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_hpa_targets_the_deployment_on_latency_and_capacity(objects):
    hpa = objects[("HorizontalPodAutoscaler", NAME)]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", NAME)
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    exposed = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    # latency (TTFT), load (running requests) and capacity (KV cache); never the queue, which stays empty
    # until latency has long degraded
    assert names == {"internvl_time_to_first_token_seconds_mean", "internvl_requests_running",
                     "internvl_kv_cache_usage_ratio"}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in exposed, f"the prometheus-adapter rules do not expose {name}"
        rule = exposed[name]
        series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
        assert series in metrics.METRIC_NAMES and re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        query = rule["metricsQuery"]
        used = set(re.findall(r"\b(internvl_[a-z_]+)\{", query))
        assert used and used <= set(metrics.METRIC_NAMES), f"{name}: {used - set(metrics.METRIC_NAMES)} not exported"
        # every selector is the adapter's (this pod) and every aggregation keeps the pod
        assert query.count("{<<.LabelMatchers>>}") == len(re.findall(r"internvl_[a-z_]+\{", query))
        assert query.count("sum(") == query.count("by (<<.GroupBy>>)")
        value = kubernetes_quantity(metric["pods"]["target"]["averageValue"])
        assert value > 0
    ratio = next(m for m in hpa["spec"]["metrics"] if m["pods"]["metric"]["name"] == "internvl_kv_cache_usage_ratio")
    assert kubernetes_quantity(ratio["pods"]["target"]["averageValue"]) < 1  # before the cache is full
    waiting_kind = {s.name: s.kind for s in metrics.LLM_METRICS}
    assert waiting_kind["internvl_requests_running"] == waiting_kind["internvl_kv_cache_blocks_used"] == metrics.GAUGE
    assert waiting_kind["internvl_time_to_first_token_seconds_sum"] == metrics.COUNTER  # hence rate() in the rule


def kubernetes_quantity(text: str) -> float:
    """A Kubernetes quantity without binary suffixes: "48", "400m", "1.5"."""
    return float(text[:-1]) / 1000 if str(text).endswith("m") else float(text)


def test_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(internvl_[a-z0-9_]+_(?:sum|count|bucket|total|waiting|running|used))\b", e)}
    assert used | {metrics.KV_BLOCKS_TOTAL} >= set(metrics.METRIC_NAMES)  # every model metric is on it
    assert used <= set(metrics.METRIC_NAMES)
    triton = {n for e in exprs for n in re.findall(r"\b(nv_[a-z_]+)\b", e)}
    assert {"nv_inference_request_success", "nv_inference_queue_duration_us", "nv_gpu_utilization"} <= triton
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
    assert dashboard["templating"]["list"][0]["name"] == "datasource"
