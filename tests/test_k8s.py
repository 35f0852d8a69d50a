"""Static checks of the Kubernetes manifests (deploy/k8s): every resource validates against the
Kubernetes schema (kubernetes-validate, strict, offline), every setting they give is one the
service reads, what production requires is provided, and the worker Deployments match the slots
the dispatcher fills."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "k8s" / "base"
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "example-cluster"
KUBERNETES = "1.31.0"  # the oldest version these manifests are meant for
REQUIRED = {"W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_ADMIN_KEY", "W2S_SESSION_SECRET", "W2S_ENVIRONMENT"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> list[dict[str, Any]]:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    return [doc for name in listed for doc in documents(BASE / name)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in base_resources() if doc["kind"] == kind]


MANIFESTS = [p for p in [*BASE.glob("*.yaml"), *OVERLAY.glob("*.yaml")] if p.name != "kustomization.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_resource_validates_against_the_kubernetes_schema(path: Path) -> None:
    import kubernetes_validate

    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_kustomization_lists_every_base_file_but_the_secret_example() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk


def settings_given() -> dict[str, str]:
    [config] = of_kind("ConfigMap")
    secret = documents(BASE / "secret.example.yaml")[0]
    return {**config["data"], **secret["stringData"]}


def test_every_setting_given_is_one_the_service_reads_and_production_needs_are_met() -> None:
    given = settings_given()
    known = {f"W2S_{name.upper()}" for name in Settings.model_fields}
    assert not set(given) - known, f"not settings of the service: {sorted(set(given) - known)}"
    assert set(given) >= REQUIRED
    assert given["W2S_ENVIRONMENT"] == "production"
    assert given["W2S_ARTIFACT_STORE"].startswith("s3://")  # shared by every node, not one pod's disk
    assert given["W2S_DATA_URL"].startswith("s3://")


def workloads() -> list[dict[str, Any]]:
    return [*of_kind("Deployment"), *of_kind("Job")]


def test_every_workload_reads_the_config_and_the_secret_and_runs_unprivileged() -> None:
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "w2s" and pod["securityContext"]["runAsNonRoot"]
        for container in pod["containers"]:
            sources = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
            assert sources == {"w2s-config", "w2s-secrets"}, workload["metadata"]["name"]


def queue_of(deployment: dict[str, Any]) -> str | None:
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("--queue") + 1] if "--queue" in command else None


def test_worker_replicas_match_the_slots_the_dispatcher_fills() -> None:
    slots = json.loads(settings_given()["W2S_QUEUE_SLOTS"])
    classes = json.loads(settings_given()["W2S_GPU_CLASSES"])
    replicas: dict[str, int] = {}
    for deployment in of_kind("Deployment"):
        queue = queue_of(deployment)
        if queue and queue not in ("control", "exports"):  # these hold no slot
            replicas[queue] = replicas.get(queue, 0) + deployment["spec"]["replicas"]
            limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            if queue in classes:  # one GPU per worker pod, on a node of its class
                assert limits["nvidia.com/gpu"] == "1"
                assert deployment["spec"]["template"]["spec"]["nodeSelector"]["w2s.dev/gpu-class"] == queue
            else:
                assert "nvidia.com/gpu" not in limits
    assert replicas == slots


def test_planning_and_exports_have_workers_of_their_own() -> None:
    queues = [queue_of(deployment) for deployment in of_kind("Deployment")]
    assert queues.count("control") == 1 and queues.count("exports") == 1
    [exports] = [d for d in of_kind("Deployment") if queue_of(d) == "exports"]
    limits = exports["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert exports["spec"]["template"]["spec"]["containers"][0]["image"] == "w2s-service:cpu"


def test_the_api_is_probed_and_the_dispatchers_and_api_survive_a_drain() -> None:
    [api] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "w2s-api"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    [dispatcher] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "w2s-dispatcher"]
    assert dispatcher["spec"]["replicas"] >= 2  # the advisory lock keeps their rounds apart
    budgets = {
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for pdb in of_kind("PodDisruptionBudget")
    }
    assert {"w2s-api", "w2s-dispatcher"} <= budgets
    [migrate] = of_kind("Job")
    assert migrate["spec"]["template"]["spec"]["containers"][0]["command"] == ["w2s-service", "migrate"]


def test_the_example_overlay_names_its_images_and_patches_what_exists() -> None:
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    used = {c["image"] for w in workloads() for c in w["spec"]["template"]["spec"]["containers"]}
    assert {image["name"] for image in overlay["images"]} == used
    for patch in overlay["patches"]:
        [doc] = documents(OVERLAY / patch["path"])
        assert any(
            r["kind"] == doc["kind"] and r["metadata"]["name"] == doc["metadata"]["name"]
            for r in base_resources()
        )
