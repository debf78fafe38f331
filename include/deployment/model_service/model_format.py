"""The only model serialisation the lifecycle loads: what its training entrypoint writes, checked before loading.

Loading an MLflow model runs code the model's files choose (a pickle, a ``code`` path, a custom pyfunc
loader). Anyone who can write to the registry could otherwise make the service, the packaging job or an
Airflow worker run theirs. So a model directory is loaded only when its ``MLmodel`` says exactly what
training produces: the ``mlflow.sklearn`` pyfunc loader, skops serialisation, skops types trusted
beyond the defaults only from scikit-learn and numpy, and no code paths; and, when training recorded
one, only when its files' digest is the one recorded at training (``MODEL_DIGEST_TAG`` on the run).

Standard library and PyYAML only: the service, the packaging job and the training entrypoint all use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

MODEL_DIGEST_TAG = "lifecycle.model_sha256"
TRUSTED_TYPE_PREFIXES = ("sklearn.", "numpy.")


class UnsafeModel(RuntimeError):
    """The model directory is not in the one serialisation the lifecycle loads, or not the trained files."""


# written by MLflow into a download of a registered version (its name and version), not by training
ADDED_ON_DOWNLOAD = {"registered_model_meta"}


def model_digest(model_dir: Path) -> str:
    """SHA-256 over every file of the model directory (relative path and content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in ADDED_ON_DOWNLOAD):
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def check_model_dir(model_dir: Path, expected_digest: str | None = None, label: str = "model") -> None:
    """Raise :class:`UnsafeModel` unless ``model_dir`` is a skops scikit-learn model as training writes it."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    try:
        spec: Any = yaml.safe_load(mlmodel.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UnsafeModel(f"{label}: cannot read {mlmodel}: {exc}") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    pyfunc = (flavors or {}).get("python_function") or {}
    sklearn = (flavors or {}).get("sklearn") or {}
    problems = []
    if pyfunc.get("loader_module") != "mlflow.sklearn":
        problems.append(f"pyfunc loader {pyfunc.get('loader_module')!r}, not 'mlflow.sklearn'")
    if pyfunc.get("code") or sklearn.get("code"):
        problems.append("it ships code paths")
    if sklearn.get("serialization_format") != "skops":
        problems.append(f"serialization {sklearn.get('serialization_format')!r}, not 'skops'")
    foreign = [t for t in sklearn.get("skops_trusted_types") or [] if not str(t).startswith(TRUSTED_TYPE_PREFIXES)]
    if foreign:
        problems.append(f"it asks to trust types outside scikit-learn and numpy: {foreign[:5]}")
    if problems:
        raise UnsafeModel(f"{label} is not loaded: " + "; ".join(problems) + " (only what training writes is loaded)")
    if expected_digest and model_digest(model_dir) != expected_digest:
        raise UnsafeModel(
            f"{label} is not loaded: its files are not the ones recorded at training ({MODEL_DIGEST_TAG})"
        )
