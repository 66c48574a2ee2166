"""deploy/kubernetes: every manifest valid against the Kubernetes API schemas (kubernetes-validate, offline, strict:
unknown fields are errors), and consistent with Lantern: the endpoint configuration it mounts parses, the command is
`lantern serve` with draining shorter than the grace period, the probes are Lantern's, every variable the Secret gives
is one Lantern reads, and the Service, budget and autoscaler select the replicas."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.config import parse_endpoint_config
from serving.environment import ADMIN_ENV, HOST_ENV, PRIMARY_ENV, SECONDARY_ENV, STATE_URI_ENV

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.30.0"


def manifests() -> dict[str, dict]:
    """kind -> the manifest (one of each)."""
    found = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                                  "HorizontalPodAutoscaler"])
def test_every_manifest_is_valid_kubernetes(kind: str) -> None:
    kubernetes_validate.validate(manifests()[kind], KUBERNETES, strict=True)


def test_the_kustomization_names_every_manifest() -> None:
    listed = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_replicas_run_lantern_as_the_endpoint_needs() -> None:
    found = manifests()
    deployment = found["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    parse_endpoint_config(yaml.safe_load(found["ConfigMap"]["data"]["endpoint.yaml"]))  # Lantern's schema
    arguments = container["args"]
    assert arguments[:2] == ["serve", "/etc/lantern/endpoint.yaml"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/lantern"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    drain = float(arguments[arguments.index("--drain-seconds") + 1])
    timeout_s = max(d["request_settings"]["request_timeout_ms"] for d in yaml.safe_load(
        found["ConfigMap"]["data"]["endpoint.yaml"])["deployments"]) / 1000
    assert pod["terminationGracePeriodSeconds"] > drain + timeout_s
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = int(arguments[arguments.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port and arguments[arguments.index("--host") + 1] == "0.0.0.0"

    secret = found["Secret"]
    assert [source["secretRef"]["name"] for source in container["envFrom"]] == [secret["metadata"]["name"]]
    assert set(secret["stringData"]) == {PRIMARY_ENV, SECONDARY_ENV, ADMIN_ENV, STATE_URI_ENV, "MLFLOW_TRACKING_URI"}
    assert secret["stringData"][STATE_URI_ENV].startswith("postgresql+psycopg://")
    assert {variable["name"] for variable in container["env"]} >= {HOST_ENV, "LANTERN_HOME"}


def test_service_budget_and_autoscaler_select_the_replicas() -> None:
    found = manifests()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", found["Deployment"]["metadata"]["name"])
    assert found["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # the budget lets one go at a time


def test_the_image_recipe_installs_lantern_and_runs_as_the_pods_user() -> None:
    recipe = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", recipe, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), name
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in {p.rstrip("*") for p in packages}:
        assert f"COPY {package} {package}" in recipe, package
    assert 'ENTRYPOINT ["lantern"]' in recipe
    user = re.search(r"^USER (\d+)$", recipe, re.M).group(1)
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user)
