"""The Kubernetes manifests the deployment repository's CI applies: valid objects, safe rollouts, visible pins.

Renders k8s/base + each overlay with model_service.manifests (as `model_service.cli render` does) and
checks them against the Kubernetes OpenAPI schemas (strict: unknown fields fail) and the invariants an
operator relies on.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "include" / "deployment"))

from model_service import manifests  # noqa: E402

K8S = REPO / "include" / "deployment" / "k8s"
ENVS = ("dev", "staging", "production")
# kubernetes-validate 1.37.0 ships schemas up to 1.37; validate against the newest minus one, which is
# what most managed clusters run.
K8S_VERSION = "1.36"
PACKAGE = {
    "format": 1,
    "model_line": "demand_forecast",
    "model_name": "demand_forecast_model",
    "model_version": "3",
    "run_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "source": "models:/demand_forecast_model/3",
    "packaged_at": "2025-01-01T00:00:00Z",
}
IMAGE = "registry.example.com:5000/ml/deployments/demand_forecast:v3-0123abcd"
REVISION = "0123abcd" * 5
SELECTOR = {"app.kubernetes.io/name": "model-service", "app.kubernetes.io/instance": "demand-forecast"}


def _render(env: str, k8s_dir: Path = K8S, **overrides: object) -> dict[str, dict]:
    """The rendered manifests of `env`, keyed by kind."""
    args = {"package": PACKAGE, "image": IMAGE, "code_revision": REVISION, "k8s_dir": k8s_dir, **overrides}
    docs = manifests.render(env, **args)
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one resource per kind"
    return by_kind


def _container(deployment: dict, name: str = "model-service") -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {var["name"]: var.get("value") for var in container.get("env", [])}


def _copy_k8s(tmp_path: Path) -> Path:
    k8s_dir = tmp_path / "k8s"
    shutil.copytree(K8S, k8s_dir)
    return k8s_dir


@pytest.mark.parametrize("env", ENVS)
def test_every_manifest_is_a_valid_kubernetes_object(env: str) -> None:
    docs = manifests.render(env, package=PACKAGE, image=IMAGE, code_revision=REVISION, k8s_dir=K8S)
    assert sorted(doc["kind"] for doc in docs) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION
    # What the CI job pipes to kubectl is the same objects, without YAML anchors.
    text = manifests.to_yaml(docs)
    assert list(yaml.safe_load_all(text)) == docs
    assert "&id" not in text and "*id" not in text


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = _render("dev")["Deployment"]
    _container(deployment)["readinesProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("env", ENVS)
def test_probes_port_and_zero_downtime_rollout(env: str) -> None:
    deployment = _render(env)["Deployment"]
    container = _container(deployment)
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    # The model takes ~10 s to load; the startup probe must allow well over that before liveness kicks in.
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30

    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop sleep + uvicorn's 20 s graceful shutdown must fit in the grace period, or requests are cut.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 20 + int(pre_stop[1])


@pytest.mark.parametrize("env", ENVS)
def test_every_container_has_requests_and_limits(env: str) -> None:
    for container in _render(env)["Deployment"]["spec"]["template"]["spec"]["containers"]:
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (container["name"], kind)


@pytest.mark.parametrize("env", ENVS)
def test_selectors_are_stable_and_shared(env: str) -> None:
    docs = _render(env)
    deployment = docs["Deployment"]
    assert deployment["spec"]["selector"] == {"matchLabels": SELECTOR}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= template_labels.items()
    assert docs["Service"]["spec"]["selector"] == SELECTOR
    assert docs["PodDisruptionBudget"]["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # A new model version or image must not change a selector (immutable: `kubectl apply` would fail).
    other = _render(env, package={**PACKAGE, "model_version": "4"}, image=IMAGE.replace("v3-", "v4-"))
    assert other["Deployment"]["spec"]["selector"] == deployment["spec"]["selector"]
    assert other["Service"]["spec"]["selector"] == docs["Service"]["spec"]["selector"]


@pytest.mark.parametrize("env", ENVS)
def test_labels_and_annotations_show_what_serves_where(env: str) -> None:
    docs = _render(env)
    deployment = docs["Deployment"]
    expected_labels = {
        **SELECTOR,
        "app.kubernetes.io/version": "v3-0123abcd",
        "mlops-lifecycle/model-line": "demand_forecast",
        "mlops-lifecycle/model-version": "3",
        "mlops-lifecycle/environment": env,
    }
    expected_annotations = {
        "mlops-lifecycle/model-name": "demand_forecast_model",
        "mlops-lifecycle/run-id": PACKAGE["run_id"],
        "mlops-lifecycle/code-revision": REVISION,
        "mlops-lifecycle/image": IMAGE,
    }
    for metadata in [doc["metadata"] for doc in docs.values()] + [deployment["spec"]["template"]["metadata"]]:
        assert expected_labels.items() <= metadata["labels"].items()
        assert expected_annotations.items() <= metadata["annotations"].items()
    assert _container(deployment)["image"] == IMAGE


@pytest.mark.parametrize("env", ENVS)
def test_names_and_namespace(env: str) -> None:
    docs = _render(env)
    assert {doc["metadata"]["name"] for doc in docs.values()} == {"demand-forecast"}
    assert {doc["metadata"]["namespace"] for doc in docs.values()} == {f"models-{env}"}


@pytest.mark.parametrize("env", ENVS)
def test_service_environment_and_volumes(env: str) -> None:
    pod = _render(env)["Deployment"]["spec"]["template"]["spec"]
    container = _container({"spec": {"template": {"spec": pod}}})
    assert _env(container) == {
        "MODEL_DIR": "/opt/model",
        "PREDICTION_LOG_DIR": "/var/log/predictions",
        "MODEL_SERVICE_TOKEN": None,  # from the Secret below
        "MODEL_LINE": "demand_forecast",
        "MODEL_NAME": "demand_forecast_model",
        "MODEL_VERSION": "3",
        "CODE_REVISION": REVISION,
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/log/predictions", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path


@pytest.mark.parametrize("env", ENVS)
def test_predict_token_comes_from_an_optional_secret(env: str) -> None:
    """With the Secret the service requires the bearer token on /predict; without it the pod still starts
    (an optional secretKeyRef leaves the variable unset), as in the local demo."""
    [token] = [var for var in _container(_render(env)["Deployment"])["env"] if var["name"] == "MODEL_SERVICE_TOKEN"]
    assert token == {
        "name": "MODEL_SERVICE_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "model-service-token", "key": "token", "optional": True}},
    }


@pytest.mark.parametrize("env", ENVS)
def test_pod_runs_unprivileged_and_is_scraped(env: str) -> None:
    template = _render(env)["Deployment"]["spec"]["template"]
    pod = template["spec"]
    container_sc = _container({"spec": {"template": template}})["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container_sc["readOnlyRootFilesystem"] is True
    assert container_sc["allowPrivilegeEscalation"] is False
    assert container_sc["capabilities"] == {"drop": ["ALL"]}
    assert container_sc.get("runAsUser", 10001) == 10001
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_production_is_stricter_than_dev() -> None:
    sizing = {}
    for env in ENVS:
        docs = _render(env)
        hpa, pdb = docs["HorizontalPodAutoscaler"]["spec"], docs["PodDisruptionBudget"]["spec"]
        # A PDB at or above the HPA floor would block every node drain.
        assert pdb["minAvailable"] < hpa["minReplicas"], env
        assert hpa["minReplicas"] <= hpa["maxReplicas"], env
        sizing[env] = (hpa["minReplicas"], pdb["minAvailable"], hpa["metrics"][0]["resource"]["target"])
    assert sizing["dev"] == (1, 0, {"type": "Utilization", "averageUtilization": 80})
    assert sizing["production"] == (3, 2, {"type": "Utilization", "averageUtilization": 60})
    assert sizing["dev"][0] < sizing["staging"][0] < sizing["production"][0]
    assert sizing["dev"][1] < sizing["staging"][1] < sizing["production"][1]
    prod = _container(_render("production")["Deployment"])["resources"]
    assert prod == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}


def test_without_code_revision_nothing_claims_one() -> None:
    docs = _render("dev", code_revision=None)
    deployment = docs["Deployment"]
    assert "CODE_REVISION" not in _env(_container(deployment))
    assert "mlops-lifecycle/code-revision" not in deployment["metadata"]["annotations"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("registry.example.com:5000/ml/demand_forecast:v3-0123abcd", "v3-0123abcd"),
        ("demand_forecast@sha256:" + "0123456789abcdef" * 4, "sha256-0123456789ab"),
        ("demand_forecast:v3@sha256:" + "0" * 64, "v3"),
        ("demand_forecast:" + "v" * 100, "v" * 63),
        ("demand_forecast:_build.7_", "build.7"),
    ],
)
def test_version_label_comes_from_the_image_tag_or_digest(image: str, version: str) -> None:
    deployment = _render("dev", image=image)["Deployment"]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == version
    assert _container(deployment)["image"] == image
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("image", ["registry.example.com:5000/ml/demand_forecast", "", "demand forecast:v3"])
def test_unpinned_or_malformed_image_is_refused(image: str) -> None:
    with pytest.raises(ValueError, match="image reference"):
        _render("dev", image=image)


def test_unknown_environment_names_the_overlays() -> None:
    with pytest.raises(ValueError, match=r"unknown environment 'qa'.*dev\.yaml, production\.yaml, staging\.yaml"):
        _render("qa")


@pytest.mark.parametrize(
    "model_line", ["Demand_Forecast", "1st_forecast", "demand_forecast_", "demand.forecast", "d" * 64]
)
def test_model_line_that_is_no_dns_name_is_refused(model_line: str) -> None:
    with pytest.raises(ValueError, match=rf"model line '{re.escape(model_line)}'.*not a valid DNS label"):
        _render("dev", package={**PACKAGE, "model_line": model_line})


def test_package_without_run_id_is_refused() -> None:
    with pytest.raises(ValueError, match="package.json lacks run_id"):
        _render("dev", package={key: value for key, value in PACKAGE.items() if key != "run_id"})


def test_overlay_changing_the_selector_is_refused(tmp_path: Path) -> None:
    k8s_dir = _copy_k8s(tmp_path)
    overlay = k8s_dir / "overlays" / "production.yaml"
    docs = list(yaml.safe_load_all(overlay.read_text()))
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    deployment["spec"]["selector"] = {"matchLabels": {**SELECTOR, "mlops-lifecycle/model-version": "3"}}
    overlay.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(ValueError, match=r"production\.yaml: Deployment/model-service sets spec\.selector"):
        _render("production", k8s_dir=k8s_dir)


def test_overlay_for_a_resource_not_in_the_base_is_refused(tmp_path: Path) -> None:
    k8s_dir = _copy_k8s(tmp_path)
    overlay = k8s_dir / "overlays" / "dev.yaml"
    overlay.write_text(overlay.read_text() + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: model-svc\n")
    with pytest.raises(ValueError, match=r"Service/model-svc is not in the base"):
        _render("dev", k8s_dir=k8s_dir)


def test_overlay_containers_merge_by_name(tmp_path: Path) -> None:
    """A production-style overlay adds a log-shipping sidecar and an env var without losing the base's."""
    k8s_dir = _copy_k8s(tmp_path)
    (k8s_dir / "overlays" / "prod-eu.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "model-service", "namespace": "models-prod-eu"},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "model-service", "env": [{"name": "EXTRA", "value": "1"}]},
                                {"name": "log-agent", "image": "fluent/fluent-bit:3.1"},
                            ]
                        }
                    }
                },
            }
        )
    )
    # Only the Deployment carries a namespace in this overlay: the renderer refuses the mix.
    with pytest.raises(ValueError, match="must set one metadata.namespace"):
        _render("prod-eu", k8s_dir=k8s_dir)
    for name in ("service", "hpa", "pdb"):
        base = yaml.safe_load((k8s_dir / "base" / f"{name}.yaml").read_text())
        patch = {"apiVersion": base["apiVersion"], "kind": base["kind"], "metadata": {"name": "model-service"}}
        patch["metadata"]["namespace"] = "models-prod-eu"
        with (k8s_dir / "overlays" / "prod-eu.yaml").open("a") as f:
            f.write("---\n" + yaml.safe_dump(patch))
    deployment = _render("prod-eu", k8s_dir=k8s_dir)["Deployment"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["model-service", "log-agent"]
    main = _container(deployment)
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {"MODEL_DIR", "PREDICTION_LOG_DIR", "EXTRA", "CODE_REVISION"} <= _env(main).keys()


def test_rendering_is_deterministic() -> None:
    args = {"package": PACKAGE, "image": IMAGE, "code_revision": None, "k8s_dir": K8S}
    first = manifests.to_yaml(manifests.render("staging", **args))
    again = manifests.to_yaml(manifests.render("staging", **args))
    assert first == again
    assert first.index("apiVersion") < first.index("kind") < first.index("metadata") < first.index("spec")


PLACEHOLDER = re.compile(r"\$\{|\$[A-Z_]{3,}|\{\{|\{%|<[a-z][a-z _-]*>|\b(REPLACE_?ME|CHANGE_?ME|TODO|FIXME|XXX)\b")


@pytest.mark.parametrize("path", sorted(K8S.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifest_files_hold_no_unrendered_placeholder(path: Path) -> None:
    """The renderer sets values by structure, so no `${VAR}`/`{{ }}`/`<fill-me>` may wait in the files."""
    assert PLACEHOLDER.search(path.read_text()) is None


@pytest.mark.parametrize("env", ENVS)
def test_rendered_output_holds_no_placeholder(env: str) -> None:
    text = manifests.to_yaml(manifests.render(env, package=PACKAGE, image=IMAGE, code_revision=REVISION, k8s_dir=K8S))
    assert PLACEHOLDER.search(text) is None
    assert "image: model-service" not in text  # the base's stand-in image was replaced
