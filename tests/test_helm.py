"""The Helm chart (helm/rtgate), rendered offline through Helm's own Go SDK.

``helm-python-sdk`` bundles Helm's SDK, so lint, schema validation and
rendering are Helm's, not an imitation. Every rendered manifest is validated
against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: an
unknown field fails); ServiceMonitor and PrometheusRule have no schema there,
so their fields are checked here. The dashboard and the alert rules may only
name metrics the services really export: the names are read from the
services' own registries, not from a list kept by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtgate.natsserver import NatsServer

try:
    # Helm's Go SDK as a shared library: a missing wheel or a library that will not
    # load on this platform both mean these tests cannot run here.
    import helm_python
    import kubernetes_validate
    import yaml  # a dependency of kubernetes-validate
except (ImportError, OSError) as exc:
    pytest.skip(
        f"the Helm chart tests need helm-python-sdk and kubernetes-validate "
        f"(pip install -e '.[test]'): {exc!r}",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "rtgate"
NATS_VALUES = ROOT / "helm" / "nats-values.yaml"
NATS_CONF = ROOT / "config" / "nats-server.conf"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
CHART_DASHBOARD = CHART / "dashboards" / "rtgate.json"
SYNC_SCRIPT = ROOT / "helm" / "sync_nats_users.py"

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion is >=1.25;
# 1.30 is the oldest release still supported upstream when this was written).
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "chat", "rt"
FULLNAME = f"{RELEASE}-rtgate"
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

Manifest = dict[str, Any]

# Value sets of the issue. Each renders; the tests below assert per set.
DEFAULTS: dict[str, Any] = {}
POSTGRES_3: dict[str, Any] = {
    "store": {"backend": "postgres"},
    "broker": {"replicas": 3},
    "secrets": {"postgresDsn": "postgresql://rtgate:pw@postgres.db:5432/rtgate"},
}
EVERYTHING_ON: dict[str, Any] = {
    "gateway": {
        "drainSeconds": 45,
        "ingress": {
            "enabled": True,
            "tls": [{"hosts": ["rtgate.example.com"], "secretName": "rtgate-tls"}],
        },
        "autoscaling": {"enabled": True, "connections": {"enabled": True}},
        "config": {"edge": {"trusted_proxies": ["10.0.0.0/8", "192.168.0.0/16"]}},
    },
    "nats": {"auth": {"enabled": True}},
    "secrets": {
        "apiKey": "k" * 32,
        "natsGatewayPassword": "gw-pass",
        "natsBrokerPassword": "broker-pass",
    },
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "networkPolicy": {
        "enabled": True,
        "gatewayFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
        ],
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
}
EXISTING_SECRET: dict[str, Any] = {
    "store": {"backend": "postgres"},
    "broker": {"replicas": 2},
    "nats": {"auth": {"enabled": True}},
    "secrets": {"existingSecret": "my-rtgate-secrets"},
}
VALUE_SETS = {
    "defaults": DEFAULTS,
    "postgres-3-brokers": POSTGRES_3,
    "ingress-monitoring-on": EVERYTHING_ON,
    "existing-secret": EXISTING_SECRET,
}


def render(values: dict[str, Any]) -> list[Manifest]:
    with helm_python.Chart.load(CHART) as chart:
        out: dict[str, str] = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    docs = [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]
    assert docs, "nothing rendered"
    return docs


def effective(values: dict[str, Any]) -> dict[str, Any]:
    """values.yaml merged with ``values``, as Helm merges them (maps deep, rest replaced)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    merged: dict[str, Any] = merge(defaults, values)
    return merged


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def kinds(docs: list[Manifest]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Manifest = containers[0]
    return c


@pytest.fixture(scope="module", params=list(VALUE_SETS), ids=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[Manifest]]:
    values = VALUE_SETS[request.param]
    return effective(values), render(values)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints(name: str) -> None:
    result = helm_python.lint(
        CHART, VALUE_SETS[name], namespace=NAMESPACE, kube_version=KUBE_VERSION
    )
    assert result["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_every_manifest_validates_against_the_kubernetes_schemas(
    rendered: tuple[dict[str, Any], list[Manifest]],
) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue  # no schema in kubernetes-validate: checked by the tests below
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_gateway_pods_drain_within_their_grace_period(
    rendered: tuple[dict[str, Any], list[Manifest]],
) -> None:
    values, docs = rendered
    g = values["gateway"]
    deployment = one(docs, "Deployment", f"{FULLNAME}-gateway")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["command"] == ["rtgate"] and c["args"] == ["gateway"]

    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == g["port"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"

    # The drain window reaches the gateway through its ConfigMap...
    config = one(docs, "ConfigMap", f"{FULLNAME}-gateway")["data"]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [f"{FULLNAME}-gateway"]
    drain = float(config["RTGATE_EDGE__DRAIN_SECONDS"])
    close_timeout = float(config["RTGATE_SERVER__CLOSE_TIMEOUT_SECONDS"])
    assert drain == g["drainSeconds"]
    assert config["RTGATE_SERVER__HOST"] == "0.0.0.0"
    assert config["RTGATE_SERVER__PORT"] == str(port)
    # ...and Kubernetes waits for preStop + the drain + the close timeout, with margin.
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(g["preStopSleepSeconds"])]
    pre_stop = float(g["preStopSleepSeconds"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain + close_timeout
    assert grace >= pre_stop + math.ceil(drain) + math.ceil(close_timeout) + 5
    if values is not None and values["gateway"]["drainSeconds"] == 45:
        assert grace == 5 + 45 + 3 + 10  # EVERYTHING_ON: the grace follows the value

    spread = pod["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for s in spread:
        assert (
            s["labelSelector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    if values["gateway"]["autoscaling"]["enabled"]:
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert deployment["spec"]["replicas"] == g["replicas"]


def assert_locked_down(workload: Manifest) -> None:
    pod = workload["spec"]["template"]["spec"]
    c = container(workload)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    # A read-only root needs a writable /tmp.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_pods_run_as_non_root_on_a_read_only_root(
    rendered: tuple[dict[str, Any], list[Manifest]],
) -> None:
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 2
    for workload in workloads:
        assert_locked_down(workload)


def test_broker_is_one_statefulset_replica_with_a_volume_on_sqlite() -> None:
    docs = render(DEFAULTS)
    assert ("Deployment", f"{FULLNAME}-broker") not in kinds(docs)
    sts = one(docs, "StatefulSet", f"{FULLNAME}-broker")
    assert sts["spec"]["replicas"] == 1
    c = container(sts)
    assert c["args"] == ["broker"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/rtgate"
    # The claim is the volume: no pod volume of that name may shadow it.
    pod_volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert claim["metadata"]["name"] not in pod_volumes
    config = one(docs, "ConfigMap", f"{FULLNAME}-broker")["data"]
    assert config["RTGATE_STORE__BACKEND"] == "sqlite"
    assert config["RTGATE_BROKER__STATE_DIR"] == "/var/lib/rtgate"  # SQLite file on the claim
    service = one(docs, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    # No DSN, and no broker PDB a single pod could never satisfy.
    assert all(e["name"] != "RTGATE_STORE__POSTGRES_DSN" for e in c.get("env", []))
    assert ("PodDisruptionBudget", f"{FULLNAME}-broker") not in kinds(docs)


def test_broker_is_a_deployment_of_three_on_postgres() -> None:
    docs = render(POSTGRES_3)
    assert ("StatefulSet", f"{FULLNAME}-broker") not in kinds(docs)
    deployment = one(docs, "Deployment", f"{FULLNAME}-broker")
    assert deployment["spec"]["replicas"] == 3
    assert "volumeClaimTemplates" not in deployment["spec"]
    env = {e["name"]: e for e in container(deployment)["env"]}
    ref = env["RTGATE_STORE__POSTGRES_DSN"]["valueFrom"]["secretKeyRef"]
    secret = one(docs, "Secret", ref["name"])
    assert ref["key"] in secret["data"]
    assert (
        one(docs, "ConfigMap", f"{FULLNAME}-broker")["data"]["RTGATE_STORE__BACKEND"] == "postgres"
    )
    pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-broker")
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_sqlite_with_two_brokers_is_refused() -> None:
    with pytest.raises(
        helm_python.HelmRenderError,
        match=r"broker.replicas=2 with store.backend=sqlite: SQLite allows "
        r"exactly one broker",
    ):
        render({"broker": {"replicas": 2}})


def test_postgres_without_a_dsn_is_refused() -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"needs secrets.postgresDsn"):
        render({"store": {"backend": "postgres"}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"store": {"backend": "mysql"}}, "at '/store/backend': value must be one of"),
        ({"gateway": {"replicas": 0}}, "at '/gateway/replicas': minimum"),
        (
            {"gateway": {"drainSeconds": "ten"}},
            "at '/gateway/drainSeconds': got string, want number",
        ),
        ({"gateway": {"drianSeconds": 10}}, "additional properties 'drianSeconds' not allowed"),
        ({"nats": {"urls": ["localhost:4222"]}}, "at '/nats/urls/0'"),
        ({"nats": {"urls": []}}, "at '/nats/urls': minItems"),
        (
            {"securityContext": {"readOnlyRootFilesystem": False}},
            "at '/securityContext/readOnlyRootFilesystem'",
        ),
        ({"podSecurityContext": {"runAsUser": 0}}, "at '/podSecurityContext/runAsUser': minimum"),
        ({"broker": {"persistence": {"size": "ten gigs"}}}, "at '/broker/persistence/size'"),
        ({"config": {"streams": {"replicas": {"nested": 1}}}}, "at '/config/streams/replicas'"),
        (
            {"monitoring": {"serviceMonitor": {"interval": "often"}}},
            "at '/monitoring/serviceMonitor/interval'",
        ),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError) as caught:
            chart.validate_schema(values)
        assert message in str(caught.value)
        # An install (render) refuses the same values before any template runs.
        with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_secrets_come_from_the_chart_secret_or_an_existing_one(
    rendered: tuple[dict[str, Any], list[Manifest]],
) -> None:
    values, docs = rendered
    existing = values["secrets"]["existingSecret"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if existing:
        assert secrets == []
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for env in container(workload).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            if existing:
                assert ref["name"] == existing
            elif not ref.get("optional"):
                assert ref["key"] in one(docs, "Secret", ref["name"])["data"]
    gateway_env = {
        e["name"]: e for e in container(one(docs, "Deployment", f"{FULLNAME}-gateway"))["env"]
    }
    assert "secretKeyRef" in gateway_env["RTGATE_AUTH__SECRET"]["valueFrom"]
    if values["nats"]["auth"]["enabled"]:
        assert gateway_env["RTGATE_NATS__USER"]["value"] == "rtgate-gateway"
        assert "secretKeyRef" in gateway_env["RTGATE_NATS__PASSWORD"]["valueFrom"]
    # Secrets never land in a ConfigMap.
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key in cm.get("data", {}):
            assert not key.endswith(("__SECRET", "__PASSWORD", "__API_KEY", "__POSTGRES_DSN"))


def container_env(docs: list[Manifest], workload: Manifest) -> dict[str, str]:
    """The environment Kubernetes would give the container, secrets as sample values."""
    c = container(workload)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    samples = {"RTGATE_STORE__POSTGRES_DSN": "postgresql://rtgate:pw@postgres.db:5432/rtgate"}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = samples.get(item["name"], "sample-secret-0123456789abcdef")
        else:
            env[item["name"]] = "pod-0"  # a fieldRef: the pod's name
    return env


def test_rendered_configuration_loads_in_the_services(
    rendered: tuple[dict[str, Any], list[Manifest]],
) -> None:
    """The services' own config loaders accept the pods' environment: no unknown
    section or key, every value parses, and the chart's values arrive."""
    from broker.config import load as load_broker
    from gateway.config import load as load_gateway

    values, docs = rendered
    gateway = load_gateway(
        None, container_env(docs, one(docs, "Deployment", f"{FULLNAME}-gateway"))
    )
    assert gateway.edge.drain_seconds == values["gateway"]["drainSeconds"]
    assert gateway.server.host == "0.0.0.0"
    assert gateway.server.port == values["gateway"]["port"]
    assert list(gateway.nats.urls) == values["nats"]["urls"]
    assert gateway.streams.replicas == values["config"]["streams"]["replicas"]
    assert gateway.log.format == "json"
    assert gateway.auth.secret == "sample-secret-0123456789abcdef"

    broker_workload = next(
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["metadata"]["name"] == f"{FULLNAME}-broker"
    )
    broker = load_broker(None, container_env(docs, broker_workload))
    assert broker.store.backend == values["store"]["backend"]
    assert broker.broker.host == "0.0.0.0"
    assert broker.broker.port == values["broker"]["port"]
    assert broker.broker.state_dir == "/var/lib/rtgate"
    assert list(broker.nats.urls) == values["nats"]["urls"]
    # [streams] must be identical in every service (docs/nats.md, Provisioning).
    assert broker.streams == gateway.streams
    if values["nats"]["auth"]["enabled"]:
        assert (gateway.nats.user, broker.nats.user) == ("rtgate-gateway", "rtgate-broker")


def test_rendered_pods_start_real_services(nats_server: NatsServer, tmp_path: Path) -> None:
    """The gateway and broker containers' environment, as rendered, runs the real
    services: both become ready, and SIGTERM stops each within its grace period."""
    from rtgate.natsserver import env_without_rtgate, free_port
    from tests.test_processes import RTGATE, _wait_http

    gateway_port, broker_port = free_port(), free_port()
    docs = render(
        {
            "nats": {"urls": [nats_server.url]},
            # One nats-server here, not the 3-node cluster of the defaults.
            "config": {"streams": {"replicas": 1}},
            "gateway": {"port": gateway_port},
            "broker": {"port": broker_port},
        }
    )
    gateway_pod = one(docs, "Deployment", f"{FULLNAME}-gateway")
    broker_pod = one(docs, "StatefulSet", f"{FULLNAME}-broker")
    envs = {
        "gateway": container_env(docs, gateway_pod),
        # The pod mounts its claim on /var/lib/rtgate; here the state goes to tmp_path.
        "broker": {
            **container_env(docs, broker_pod),
            "RTGATE_BROKER__STATE_DIR": str(tmp_path / "broker"),
            "HOME": str(tmp_path),
        },
    }
    envs["gateway"]["HOME"] = str(tmp_path)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, port in (("gateway", gateway_port), ("broker", broker_port)):
            with (tmp_path / f"{name}.log").open("ab") as log:
                procs[name] = subprocess.Popen(
                    [*RTGATE, name],
                    env=env_without_rtgate(envs[name]),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            _wait_http(f"http://127.0.0.1:{port}/readyz")
        for name, pod in (("gateway", gateway_pod), ("broker", broker_pod)):
            grace = pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            procs[name].send_signal(signal.SIGTERM)
            assert procs[name].wait(timeout=grace) == 0
        lines = (tmp_path / "gateway.log").read_text().splitlines()
        draining = next(json.loads(line) for line in lines if '"draining"' in line)
        assert draining["window"] == 10.0  # gateway.drainSeconds reached the process
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_services_select_their_pods(rendered: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, docs = rendered
    for component in ("gateway", "broker"):
        service = one(docs, "Service", f"{FULLNAME}-{component}")
        workload = next(
            d
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
            and d["metadata"]["name"] == f"{FULLNAME}-{component}"
        )
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-gateway")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_ingress_hpa_and_network_policy() -> None:
    docs = render(EVERYTHING_ON)
    ingress = one(docs, "Ingress", f"{FULLNAME}-gateway")
    notes = ingress["metadata"]["annotations"]
    # WebSockets idle for long: nginx's default 60 s timeouts would cut them.
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-gateway", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "rtgate-tls"

    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-gateway",
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "rtgate_connections"

    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    gw = policies[f"{FULLNAME}-gateway"]["spec"]
    assert [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in gw["ingress"][0]["from"]
    ] == ["ingress-nginx", "monitoring"]
    broker = policies[f"{FULLNAME}-broker"]["spec"]
    assert [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in broker["ingress"][0]["from"]
    ] == ["monitoring"]

    config = one(docs, "ConfigMap", f"{FULLNAME}-gateway")["data"]
    assert config["RTGATE_EDGE__TRUSTED_PROXIES"] == "10.0.0.0/8,192.168.0.0/16"
    # Whole numbers stay whole: 1073741824, never 1.073741824e+09.
    big = render({"config": {"streams": {"rooms_max_bytes": 1073741824}}})
    assert (
        one(big, "ConfigMap", f"{FULLNAME}-broker")["data"]["RTGATE_STREAMS__ROOMS_MAX_BYTES"]
        == "1073741824"
    )


# --- Prometheus Operator resources: no schema in kubernetes-validate ---

DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)$")


def test_service_monitor_scrapes_every_pod() -> None:
    docs = render(EVERYTHING_ON)
    [sm] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["metadata"]["labels"]["release"] == "prom"
    selector = spec["selector"]
    [expr] = selector["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/component" and expr["operator"] == "In"
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        s
        for s in services
        if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["labels"][expr["key"]] in expr["values"]
    ]
    assert {s["metadata"]["name"] for s in selected} == {
        f"{FULLNAME}-gateway",
        f"{FULLNAME}-broker",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        assert DURATION.match(endpoint["interval"])
        assert DURATION.match(endpoint["scrapeTimeout"])
        for service in selected:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]


EXPECTED_ALERTS = {
    "RtgateGatewayNotReady",
    "RtgateNatsDisconnected",
    "RtgatePersistLagGrowing",
    "RtgateSlowConsumerDisconnects",
    "RtgatePresenceNotActive",
    "RtgatePresenceBacklog",
    "RtgateStreamNearlyFull",
}


def alert_rules(docs: list[Manifest]) -> list[Manifest]:
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    rules: list[Manifest] = []
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "rules", "interval"}
        assert isinstance(group["name"], str) and group["name"]
        rules.extend(group["rules"])
    return rules


def test_prometheus_rule_fields() -> None:
    rules = alert_rules(render(EVERYTHING_ON))
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"])
        assert isinstance(r["expr"], str)
        assert_balanced(r["expr"])
        assert DURATION.match(r["for"])
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        # Scoped to this release's jobs in its namespace, not every rtgate in the cluster.
        assert f'namespace="{NAMESPACE}"' in r["expr"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "rtgate_nats_connected" in by_name["RtgateNatsDisconnected"]
    assert "rtgate_broker_nats_connected" in by_name["RtgateNatsDisconnected"]
    assert "sum(rtgate_presence_active" in by_name["RtgatePresenceNotActive"]
    assert "!= 1" in by_name["RtgatePresenceNotActive"]
    # Without presence there is no presence alert to fire forever.
    off = alert_rules(render({**EVERYTHING_ON, "config": {"presence": {"enabled": False}}}))
    assert {"RtgatePresenceNotActive", "RtgatePresenceBacklog"}.isdisjoint(
        {r["alert"] for r in off}
    )


def assert_balanced(expr: str) -> None:
    """A cheap PromQL syntax check: brackets pair up outside string literals."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr}"
    assert not stack, f"unclosed {stack} in {expr}"


# --- metric names: only what the services export ---


def exported_metric_names() -> set[str]:
    """Every sample name the gateway and broker registries can expose."""
    from prometheus_client import CollectorRegistry

    from broker.config import BrokerConfig
    from broker.persist import PersistMetrics
    from broker.presence import PresenceMetrics
    from broker.service import Broker
    from gateway.metrics import GatewayMetrics

    gateway = CollectorRegistry()
    GatewayMetrics(gateway).watch_sent(lambda: (0, 0))
    broker = CollectorRegistry()
    Broker(BrokerConfig(), registry=broker)  # builds its gauges; starts nothing
    PersistMetrics(broker)
    PresenceMetrics(broker)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names = {
        family.name + suffix
        for registry in (gateway, broker)
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }
    assert "rtgate_slow_consumer_disconnects_total" in names  # the scan saw the gateway
    assert "rtgate_broker_persist_lag_messages" in names  # and the broker
    return names


def metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\brtgate_[a-z0-9_]+\b", without_strings))


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    docs = render(EVERYTHING_ON)
    exprs = {
        "dashboard": list(dashboard_exprs(dashboard)),
        "PrometheusRule": [r["expr"] for r in alert_rules(docs)],
        "HPA": ["rtgate_connections"],
    }
    missing = {
        (where, name)
        for where, found in exprs.items()
        for expr in found
        for name in metric_names_in(expr)
        if name not in exported
    }
    assert missing == set()
    used = {name for found in exprs.values() for expr in found for name in metric_names_in(expr)}
    assert len(used) > 20


def test_dashboard_covers_the_issue_panels() -> None:
    text = DASHBOARD.read_text()
    # One dashboard: the chart ships the file, byte for byte.
    assert CHART_DASHBOARD.read_text() == text
    dashboard = json.loads(text)
    exprs = list(dashboard_exprs(dashboard))
    joined = "\n".join(exprs)
    for needed in (
        "rtgate_connections",
        "rtgate_frames_received_total",
        "rtgate_frames_sent_total",
        "rtgate_errors_total",
        "rtgate_slow_consumer_disconnects_total",
        "rtgate_broker_persist_lag_messages",
        "rtgate_presence_users_online",
        "rtgate_presence_active",
        "rtgate_nats_connected",
        "rtgate_broker_nats_connected",
    ):
        assert needed in joined, needed
    for histogram in ("rtgate_publish_latency_seconds", "rtgate_fanout_latency_seconds"):
        quantiles = [e for e in exprs if f"{histogram}_bucket" in e]
        assert len(quantiles) == 3
        assert all(e.startswith("histogram_quantile(") and "by (le)" in e for e in quantiles)
    assert "by (code)" in next(e for e in exprs if "rtgate_errors_total" in e)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for expr in (t["expr"] for t in panel["targets"]):
            assert_balanced(expr)
    assert dashboard["uid"] and dashboard["title"]

    cm = one(render(EVERYTHING_ON), "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rtgate.json"]) == dashboard


# --- helm/nats-values.yaml: the same users and permissions as config/nats-server.conf ---


def load_sync_script() -> Any:
    """helm/sync_nats_users.py: its parser of config/nats-server.conf is the one used here."""
    spec = importlib.util.spec_from_file_location("sync_nats_users", SYNC_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nats_values_match_the_nats_server_config() -> None:
    values = yaml.safe_load(NATS_VALUES.read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    users = {u["user"]: u for u in config["merge"]["authorization"]["users"]}
    assert set(users) == {"rtgate-gateway", "rtgate-broker", "rtgate-backend"}
    env = values["container"]["env"]
    for user, variable in (
        ("rtgate-gateway", "RTGATE_NATS_GATEWAY_PASSWORD"),
        ("rtgate-broker", "RTGATE_NATS_BROKER_PASSWORD"),
        ("rtgate-backend", "RTGATE_NATS_BACKEND_PASSWORD"),
    ):
        # The chart's "<< $VAR >>" is an unquoted variable, read from the environment.
        assert users[user]["password"] == f"<< ${variable} >>"
        assert "secretKeyRef" in env[variable]["valueFrom"]

    conf = load_sync_script().conf_permissions(NATS_CONF.read_text())
    assert set(conf) == set(users)
    stale = (
        "helm/nats-values.yaml differs from config/nats-server.conf: run "
        ".venv/bin/python helm/sync_nats_users.py"
    )
    for user, expected in conf.items():
        perms = users[user]["permissions"]
        assert perms["publish"]["allow"] == expected["publish"], f"{user}: {stale}"
        assert perms["subscribe"]["allow"] == expected["subscribe"], f"{user}: {stale}"
        assert perms.get("allow_responses", False) == expected["allow_responses"], (
            f"{user}: {stale}"
        )
    # The rtgate chart's defaults match this NATS release.
    chart = effective({})
    assert chart["nats"]["auth"]["gatewayUser"] in users
    assert chart["nats"]["auth"]["brokerUser"] in users
    assert chart["config"]["streams"]["replicas"] == config["cluster"]["replicas"]


def test_every_exported_metric_is_documented() -> None:
    """docs/operations.md lists every metric the services export: a new one
    cannot ship unexplained."""
    text = (ROOT / "docs" / "operations.md").read_text()
    exported = exported_metric_names()
    suffixes = ("_total", "_created", "_bucket", "_sum", "_count")
    names = (
        {n for n in exported if n.endswith("_total")}
        | {n.removesuffix("_bucket") for n in exported if n.endswith("_bucket")}
        | {n for n in exported if not n.endswith(suffixes)}
    )
    assert sorted(n for n in names if f"`{n}`" not in text) == []
