"""The Kubernetes and KServe manifests, checked offline: the core resources against the
Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), the KServe custom
resources' containers against the core Container schema and their KServe fields by hand,
and every RESNET_SERVE_* variable they set against Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from tests.deploy.settings_env import PREFIX, not_settings, settings_from

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
SCHEMAS = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
# fields of KServe's predictor `model` that are KServe's own; the rest is a core Container
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri",
                       "runtimeVersion", "storage"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def cluster() -> dict[str, dict[str, Any]]:
    return by_kind([doc for path in sorted(KUBERNETES.glob("*.yaml"))
                    for doc in documents(path)])


@pytest.fixture(scope="module")
def kserve() -> dict[str, dict[str, Any]]:
    return by_kind(documents(KSERVE))


def validate_container(container: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `container` is a valid core v1 Container."""
    schema = schema_contents(f"{SCHEMAS}/container-v1.json", K8S_VERSION)
    definitions = schema_contents(f"{SCHEMAS}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema)
                                                       @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(container)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def assert_configures_settings(container: dict[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", [])]
    assert any(n.startswith(PREFIX) for n in names)
    assert not not_settings(names), f"not Settings fields: {not_settings(names)}"
    env = env_of(container)
    settings_from(env)  # the values themselves pass Settings' validation
    return env


def test_core_manifests_pass_the_kubernetes_schemas(cluster: dict[str, dict[str, Any]]
                                                    ) -> None:
    assert set(cluster) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                            "PersistentVolumeClaim"}
    for doc in cluster.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught(cluster: dict[str, dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(cluster["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        validate_container({"name": "x", "image": "y", "ports": [{"containerPort": "80"}]})


def test_deployment_runs_on_a_gpu_with_probes_and_a_checkpoint_volume(
        cluster: dict[str, dict[str, Any]]) -> None:
    deployment, service, hpa = (cluster[k] for k in ("Deployment", "Service",
                                                     "HorizontalPodAutoscaler"))
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    port = container["ports"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    env = assert_configures_settings(container)
    assert int(env[f"{PREFIX}PORT"]) == port["containerPort"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    checkpoints = [m for m in mounts.values() if m["mountPath"] == env[f"{PREFIX}CHECKPOINT_DIR"]]
    assert checkpoints and checkpoints[0]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[checkpoints[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == cluster["PersistentVolumeClaim"]["metadata"]["name"]
    # SIGTERM drains within the shutdown timeout, before the kubelet's grace period ends
    assert float(env[f"{PREFIX}SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_kserve_runtime_and_inference_service(kserve: dict[str, dict[str, Any]]) -> None:
    runtime, service = kserve["ServingRuntime"], kserve["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["storageUri"].split("://", 1)[0] in {"pvc", "s3", "gs", "https", "hf", "oci"}
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the model's container overrides are a core Container, as is each runtime container
    validate_container({"name": "kserve-container",
                        **{k: v for k, v in model.items() if k not in KSERVE_MODEL_FIELDS}})
    [container] = runtime["spec"]["containers"]
    validate_container(container)
    assert container["name"] == "kserve-container"
    env = assert_configures_settings(container)
    assert env[f"{PREFIX}CHECKPOINT_DIR"] == "/mnt/models"  # where KServe mounts storageUri
    port = container["ports"][0]["containerPort"]
    assert int(env[f"{PREFIX}PORT"]) == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
