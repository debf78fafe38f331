"""Render the Kubernetes manifests of one model line for one environment (used by the CI deploy jobs).

`k8s/base/*.yaml` holds the shared Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget;
`k8s/overlays/<env>.yaml` holds partial manifests deep-merged onto them by (kind, metadata.name). The
renderer then names every resource after the model line, sets the labels and annotations that show what
serves where (`kubectl get deploy -L mlops-lifecycle/model-version`), the selectors, the image and the
pin's environment variables. Only the standard library and PyYAML: it runs in a plain CI job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

APP_NAME = "model-service"
CONTAINER = "model-service"  # the service container in k8s/base/deployment.yaml
LABEL_PREFIX = "mlops-lifecycle/"

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_REQUIRED_PACKAGE_KEYS = ("model_line", "model_name", "model_version", "run_id")


def dns_name(model_line: str) -> str:
    """The resource name of a model line: `demand_forecast` -> `demand-forecast`.

    Checked as a DNS-1035 label (what a Service name must be): lower-case letters, digits and '-',
    starting with a letter, ending alphanumeric, at most 63 characters.
    """
    name = model_line.replace("_", "-")
    if len(name) > 63 or not _DNS_1035.fullmatch(name):
        raise ValueError(
            f"model line {model_line!r} gives Kubernetes name {name!r}, which is not a valid DNS label: "
            "use lower-case letters, digits, '_' or '-', start with a letter, end with a letter or digit, "
            "at most 63 characters"
        )
    return name


def label_value(what: str, value: str) -> str:
    """`value` unchanged if it is a valid label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric ends)."""
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid Kubernetes label value "
            "(at most 63 characters of letters, digits, '.', '_', '-', beginning and ending alphanumeric)"
        )
    return value


def image_version(image: str) -> str:
    """The label form of an image reference's tag, or of its digest (`sha256-<12 hex>`) if it has no tag.

    An image without either is refused: the deployed version must be pinned to be reproducible.
    """
    if not image or any(ch.isspace() for ch in image):
        raise ValueError(f"image reference {image!r} is empty or contains whitespace")
    reference, _, digest = image.partition("@")
    tag = reference.rsplit("/", 1)[-1].partition(":")[2]  # a registry's ':port' is before the last '/'
    if tag:
        raw = tag
    elif digest:
        algorithm, _, hex_digest = digest.partition(":")
        raw = f"{algorithm}-{hex_digest[:12]}"
    else:
        raise ValueError(f"image reference {image!r} has neither a tag nor a digest; pin the image")
    value = re.sub(r"[^A-Za-z0-9._-]", "-", raw)[:63]
    value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)
    if not value:
        raise ValueError(f"image reference {image!r} gives no usable version label from {raw!r}")
    return value


def deep_merge(base: Any, overlay: Any) -> Any:
    """`overlay` merged onto `base` as a new structure (no part of `overlay` is shared with the result).

    Mappings merge key by key; lists whose items all have a `name` (containers, env, ports, volumes)
    merge item by item on that name, new names appended; anything else in `overlay` replaces `base`.
    """
    if isinstance(overlay, dict):
        merged = dict(base) if isinstance(base, dict) else {}
        for key, value in overlay.items():
            merged[key] = deep_merge(merged.get(key), value)
        return merged
    if isinstance(overlay, list):
        if not (_named_items(base) and _named_items(overlay)):
            return [deep_merge(None, item) for item in overlay]
        by_name = {item["name"]: item for item in base}
        for item in overlay:
            by_name[item["name"]] = deep_merge(by_name.get(item["name"]), item)
        return list(by_name.values())
    return overlay


def _named_items(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, dict) and "name" in i for i in value)


def _load(path: Path) -> list[dict]:
    """The non-empty documents of a YAML file; each must be a manifest without a selector."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not doc.get("kind") or not (doc.get("metadata") or {}).get("name"):
            raise ValueError(f"{path}: every document needs `kind` and `metadata.name`")
        if "selector" in (doc.get("spec") or {}):
            raise ValueError(
                f"{path}: {doc['kind']}/{doc['metadata']['name']} sets spec.selector; the renderer sets "
                "selectors (app.kubernetes.io/name + instance only) because they are immutable in Kubernetes"
            )
    return docs


def render(env: str, *, package: dict, image: str, code_revision: str | None, k8s_dir: Path) -> list[dict]:
    """The manifests of `package`'s model line in `env`: base + overlay, named, labelled and pinned."""
    overlays = {path.stem: path for path in sorted((Path(k8s_dir) / "overlays").glob("*.yaml"))}
    if env not in overlays:
        available = ", ".join(f"{name}.yaml" for name in overlays) or "none"
        raise ValueError(f"unknown environment {env!r}: overlays available in {k8s_dir}/overlays: {available}")
    missing = [key for key in _REQUIRED_PACKAGE_KEYS if package.get(key) in (None, "")]
    if missing:
        raise ValueError(f"package.json lacks {', '.join(missing)}")

    model_line = str(package["model_line"])
    name = dns_name(model_line)
    selector = {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name}
    labels = {
        **selector,
        "app.kubernetes.io/version": image_version(image),
        f"{LABEL_PREFIX}model-line": label_value("model line", model_line),
        f"{LABEL_PREFIX}model-version": label_value("model version", str(package["model_version"])),
        f"{LABEL_PREFIX}environment": label_value("environment", env),
    }
    annotations = {
        f"{LABEL_PREFIX}model-name": str(package["model_name"]),
        f"{LABEL_PREFIX}run-id": str(package["run_id"]),
        f"{LABEL_PREFIX}image": image,
    }
    env_vars = [
        {"name": "MODEL_LINE", "value": model_line},
        {"name": "MODEL_NAME", "value": str(package["model_name"])},
        {"name": "MODEL_VERSION", "value": str(package["model_version"])},
    ]
    if code_revision:
        annotations[f"{LABEL_PREFIX}code-revision"] = code_revision
        env_vars.append({"name": "CODE_REVISION", "value": code_revision})

    docs = {}
    for path in sorted((Path(k8s_dir) / "base").glob("*.yaml")):
        for doc in _load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            if key in docs:
                raise ValueError(f"{path}: {key[0]}/{key[1]} is defined twice in the base")
            docs[key] = doc
    for doc in _load(overlays[env]):
        key = (doc["kind"], doc["metadata"]["name"])
        if key not in docs:
            known = ", ".join(f"{kind}/{res}" for kind, res in docs)
            raise ValueError(f"{overlays[env]}: {key[0]}/{key[1]} is not in the base ({known})")
        docs[key] = deep_merge(docs[key], doc)

    rendered = []
    for (kind, _), doc in docs.items():
        patch: dict[str, Any] = {"metadata": {"name": name, "labels": labels, "annotations": annotations}}
        if kind == "Deployment":
            containers = doc["spec"]["template"]["spec"].get("containers") or []
            if not any(c.get("name") == CONTAINER for c in containers):
                raise ValueError(f"the Deployment has no container named {CONTAINER!r}")
            patch["spec"] = {
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": labels, "annotations": annotations},
                    "spec": {"containers": [{"name": CONTAINER, "image": image, "env": env_vars}]},
                },
            }
        elif kind == "Service":
            patch["spec"] = {"selector": selector}
        elif kind == "PodDisruptionBudget":
            patch["spec"] = {"selector": {"matchLabels": selector}}
        elif kind == "HorizontalPodAutoscaler":
            patch["spec"] = {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}}
        rendered.append(deep_merge(doc, patch))

    namespaces = {doc["metadata"].get("namespace") for doc in rendered}
    if len(namespaces) != 1 or None in namespaces:
        raise ValueError(f"{overlays[env]} must set one metadata.namespace on every resource, got {namespaces}")
    return rendered


def to_yaml(docs: list[dict]) -> str:
    """Multi-document YAML for `kubectl apply -f -`, keys in manifest order (apiVersion, kind, ...)."""
    return yaml.dump_all(docs, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a repeated mapping out in full instead of as a YAML anchor/alias (`&id001`)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
