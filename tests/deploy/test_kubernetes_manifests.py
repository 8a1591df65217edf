"""Kubernetes manifests: schema-valid (kubernetes-validate bundles the schemas: offline), every
overlay renders (kubectl's built-in kustomize), and the pieces agree with each other and with
the server: probes, drain time, GPUs per parallel size, HPA metrics served by the adapter."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from deploy_helpers import KUBERNETES, METRICS, OVERLAYS, RULES, load_yaml_docs, tool

from cdserve.config_flags import ENV_PREFIX, env_names
from cdserve.server.settings import ServerSettings

# The oldest Kubernetes the manifests promise to work on, and the newest the validator knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
RAW_MANIFESTS = sorted(
    p
    for d in ("base", "jobs")
    for p in (KUBERNETES / d).glob("*.yaml")
    if p.name != "kustomization.yaml"
)
CRDS = sorted((KUBERNETES / "monitoring").glob("*.yaml"))


def kv():
    try:
        import kubernetes_validate
    except ImportError:
        tool("kubernetes-validate")  # fails in CI, skips elsewhere, with the install hint
    return kubernetes_validate


def render(overlay) -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", *(o.name for o in OVERLAYS)])
def rendered(request) -> tuple[str, list[dict]]:
    path = (
        KUBERNETES / "base" if request.param == "base" else KUBERNETES / "overlays" / request.param
    )
    return request.param, render(path)


def one(docs: list[dict], kind: str) -> dict | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1, f"{len(found)} {kind}s"
    return found[0] if found else None


@pytest.mark.parametrize("path", RAW_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raw_manifest_is_schema_valid(path, version):
    for doc in load_yaml_docs(path):
        kv().validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_overlay_is_schema_valid(rendered, version):
    _, docs = rendered
    for doc in docs:
        kv().validate(doc, version, strict=True)


def test_validator_rejects_a_broken_manifest():
    """The validator really checks: an unknown field and a wrong type both fail."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "eighty"}], "selectr": {}},
    }
    with pytest.raises(kv().ValidationError):
        kv().validate(bad, K8S_VERSIONS[-1], strict=True)


def test_every_overlay_is_rendered():
    assert {o.name for o in OVERLAYS} >= {"single-gpu", "tensor-parallel", "cpu"}


def test_probes_and_port(rendered):
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    config = one(docs, "ConfigMap")["data"]
    port = int(config["CDSERVE_PORT"])
    assert config["CDSERVE_HOST"] == "0.0.0.0"
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_termination_grace_covers_the_drain(rendered):
    """SIGKILL must not come before preStop sleep + the server's drain (+ a margin)."""
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    grace = float(one(docs, "ConfigMap")["data"]["CDSERVE_SHUTDOWN_GRACE_SECONDS"])
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(cmd[1]) + grace + 5


def test_gpus_match_the_parallel_sizes(rendered):
    name, docs = rendered
    config = one(docs, "ConfigMap")["data"]
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    gpus = {k: int(v) for k, v in c["resources"].get("limits", {}).items() if k == "nvidia.com/gpu"}
    if config["CDSERVE_BACKEND"] == "hf":
        assert name == "cpu" and not gpus and config["CDSERVE_DEVICE"] == "cpu"
        return
    # Pipeline stages beyond one node run as Ray workers elsewhere (deploy/README.md); in a pod,
    # tensor parallelism takes exactly the pod's GPUs.
    assert gpus == {"nvidia.com/gpu": int(config["CDSERVE_VLLM__TENSOR_PARALLEL_SIZE"])}
    assert (
        c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert int(config["CDSERVE_VLLM__PIPELINE_PARALLEL_SIZE"]) == 1


def test_selectors_match_the_pods(rendered):
    _, docs = rendered
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [one(docs, "Service")["spec"]["selector"]]
    selectors += [
        d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"
    ]
    for sel in selectors:
        assert sel.items() <= labels.items(), sel


def test_api_key_comes_from_the_example_secret(rendered):
    _, docs = rendered
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    ref = next(e for e in c["env"] if e["name"] == "CDSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    (secret,) = load_yaml_docs(KUBERNETES / "base" / "secret.example.yaml")
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (ref["name"], "cdserve")
    assert ref["key"] in secret["stringData"]
    assert not any(d["kind"] == "Secret" for d in docs), "never ship a key in the kustomization"


def test_hpa_metrics_are_served_by_the_adapter(rendered):
    _, docs = rendered
    hpa = one(docs, "HorizontalPodAutoscaler")
    if hpa is None:
        return
    adapter = yaml.safe_load(
        (KUBERNETES / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    )
    served = {}
    for rule in adapter["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        assert series in METRICS, series
        served[rule["name"]["as"]] = rule
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    used = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert used and set(used) <= set(served), (used, sorted(served))
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 1


def test_config_keys_are_server_settings(rendered):
    """A typo in a ConfigMap key would be silently ignored by pydantic-settings: catch it here."""
    _, docs = rendered
    assert set(one(docs, "ConfigMap")["data"]) <= env_names(ServerSettings)


def test_monitoring_custom_resources_parse():
    """PodMonitor and PrometheusRule are CRDs (no bundled schema): check their shape by hand."""
    kinds = {}
    for path in CRDS:
        for doc in load_yaml_docs(path):
            kinds[doc.get("kind", path.stem)] = doc
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert "PrometheusRule" in kinds and "prometheus-adapter-values" in kinds


def test_prometheus_rule_matches_the_compose_rules():
    (rule,) = load_yaml_docs(KUBERNETES / "monitoring" / "prometheusrule.yaml")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_fetch_job_fills_the_folders_the_config_names():
    (job,) = load_yaml_docs(KUBERNETES / "jobs" / "fetch-models.yaml")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    config = load_yaml_docs(KUBERNETES / "base" / "configmap.yaml")[0]["data"]
    assert c["args"] == ["fetch-only"]
    assert (env["CDSERVE_MODEL_DIR"], env["CDSERVE_SCORER_DIR"]) == (
        config["CDSERVE_MODEL"],
        config["CDSERVE_SCORER"],
    )
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    (pvc,) = load_yaml_docs(KUBERNETES / "base" / "models-pvc.yaml")
    assert claim == pvc["metadata"]["name"]


def test_config_values_make_valid_settings(rendered, monkeypatch):
    """The ConfigMap's values pass the server's own validation (the model and scorer folders,
    which live on the cluster's volume, stand in as the embedded ones)."""
    _, docs = rendered
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    data = one(docs, "ConfigMap")["data"] | {
        "CDSERVE_MODEL": "smollm2",
        "CDSERVE_SCORER": "default",
    }
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    s = ServerSettings()
    assert s.port == int(data["CDSERVE_PORT"])
    assert s.vllm.tensor_parallel_size == int(data["CDSERVE_VLLM__TENSOR_PARALLEL_SIZE"])
