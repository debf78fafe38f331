"""The model package: one registered MLflow model version's artifacts, exactly as the image bakes them in.

The CI ``package`` job (and the local deploy adapter) builds it from the pin file with ``build``; the
service opens it with ``open_package`` at start-up and never calls the registry. Layout::

    package.json     what it holds (line, registered name, version, run id, source) and a SHA-256 per file
    model/           the MLflow model directory of that version (MLmodel, the model file, requirements.txt)
    golden_set.json  feature rows and the predictions made for them offline, for the smoke tests

``open_package`` refuses a package that is missing, holds another version than the image pins, whose
files do not match their checksums (a partial copy, an edited file), or whose model is not in the one
format the lifecycle loads (``model_format``): the service then does not start, and the message says
which of these it is. ``build`` refuses a version whose model is not in that format or whose files are
not the ones its training run recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from model_service.model_format import MODEL_DIGEST_TAG, UnsafeModel, check_model_dir

FORMAT = 1
MANIFEST = "package.json"
MODEL_SUBDIR = "model"
GOLDEN_SET = "golden_set.json"
GOLDEN_SET_ARTIFACT = "golden_set.json"  # logged by the training entrypoint next to the model
PIN_FIELDS = ("model_line", "model_name", "model_version", "run_id")
GOLDEN_RELATIVE_TOLERANCE = 1e-6


class PackageError(RuntimeError):
    """The package cannot be built or does not hold what the image pins."""


class ModelOutputError(RuntimeError):
    """The model returned something that is not one finite number per row: a model bug, not bad input."""


def to_floats(raw: Any, n_rows: int) -> list[float]:
    """One finite float per row, the shape of every prediction here (served, and in the golden set):
    values, or the positive-class column of (n, 2) class probabilities."""
    import numpy as np

    values = np.asarray(raw.to_numpy() if hasattr(raw, "to_numpy") else raw)
    if values.ndim == 2 and values.shape[1] in (1, 2):
        values = values[:, -1]
    if values.ndim != 1 or values.shape[0] != n_rows:
        raise ModelOutputError(f"model returned output of shape {values.shape}, expected ({n_rows},)")
    try:
        floats = values.astype(float)
    except (TypeError, ValueError) as exc:
        raise ModelOutputError(f"model output is not numeric ({values.dtype}): {exc}") from exc
    if not np.isfinite(floats).all():
        raise ModelOutputError(f"model returned a non-finite prediction at row {int(np.argmin(np.isfinite(floats)))}")
    return floats.tolist()


def golden_mismatches(served: list[Any], expected: list[float]) -> list[str]:
    """Golden rows whose served prediction is not the offline one (relative 1e-6), as readable parts."""
    return [
        f"golden row {i}: served {got!r}, offline {want!r}"
        for i, (got, want) in enumerate(zip(served, expected, strict=True))
        if not isinstance(got, int | float)
        or not math.isclose(got, want, rel_tol=GOLDEN_RELATIVE_TOLERANCE, abs_tol=1e-9)
    ]


@dataclass(frozen=True)
class Pin:
    """Which model version a line serves: the pin file the lifecycle merges into the deployment repository."""

    model_line: str
    model_name: str
    model_version: str
    run_id: str

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> Pin:
        if not isinstance(data, Mapping):
            raise PackageError(f"{where}: expected a mapping with {', '.join(PIN_FIELDS)}, got {type(data).__name__}")
        missing = [name for name in PIN_FIELDS if not str(data.get(name) or "").strip()]
        if missing:
            raise PackageError(f"{where}: missing {', '.join(missing)}")
        pin = cls(**{name: str(data[name]).strip() for name in PIN_FIELDS})
        if not pin.model_version.isdigit():
            raise PackageError(f"{where}: model_version must be a version number like '3', got {pin.model_version!r}")
        return pin

    @classmethod
    def from_file(cls, path: Path) -> Pin:
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise PackageError(f"pin file {path} does not exist") from None
        except yaml.YAMLError as exc:
            # PyYAML's message spans several lines (a caret diagram): the CLI promises one line.
            mark = getattr(exc, "problem_mark", None)
            detail = getattr(exc, "problem", None) or " ".join(str(exc).split())
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise PackageError(f"pin file {path} is not valid YAML: {detail}{where}") from None
        return cls.from_mapping(data, f"pin file {path}")

    def label(self) -> str:
        return f"{self.model_line}: {self.model_name} v{self.model_version} (run {self.run_id})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): _sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


# --------------------------------------------------------------------------------------------------
# Build (CI package job, local deploy adapter): needs MLflow and MLFLOW_TRACKING_URI.
# --------------------------------------------------------------------------------------------------
def build(pin: Pin, out: Path, golden_rows: int = 20) -> dict[str, Any]:
    """Download the pinned version's model into ``out`` (replacing it atomically) and describe it.

    The registry must agree with the pin (same run): a pin edited by hand to another run is refused.
    The golden set is the one the training run logged; a run without one gets rows from the model's
    input example scored here with MLflow's own pyfunc loader, the offline path.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # CI logs, not a terminal
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        # Without it MLflow would quietly open an empty ./mlruns store and report every version missing.
        raise PackageError("MLFLOW_TRACKING_URI is not set: the registry the pin refers to is unknown")
    client = MlflowClient()
    try:
        registered = client.get_model_version(pin.model_name, pin.model_version)
    except MlflowException as exc:
        reason = "not found in" if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else "could not be read from"
        detail = " ".join(str(exc).split())[:300]
        raise PackageError(f"{pin.label()}: {reason} the MLflow registry ({exc.error_code}: {detail})") from None
    if registered.run_id != pin.run_id:
        raise PackageError(
            f"{pin.label()}: the registry says version {pin.model_version} comes from run {registered.run_id}, "
            "not the pinned run; the pin file does not describe this version"
        )

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{pin.model_name}/{pin.model_version}", dst_path=str(partial / MODEL_SUBDIR)
    )
    if not (partial / MODEL_SUBDIR / "MLmodel").is_file():
        raise PackageError(f"{pin.label()}: the downloaded artifacts have no MLmodel file")
    recorded = client.get_run(pin.run_id).data.tags.get(MODEL_DIGEST_TAG)
    _check_format(partial / MODEL_SUBDIR, recorded, pin.label())
    golden = _golden_set(pin, partial / MODEL_SUBDIR, golden_rows)
    (partial / GOLDEN_SET).write_text(json.dumps(golden, allow_nan=False, indent=1))

    manifest = {
        "format": FORMAT,
        **asdict(pin),
        "source": f"models:/{pin.model_name}/{pin.model_version}",
        "golden_set_source": golden["source"],
        "packaged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mlflow_version": mlflow.__version__,
        "files": _checksums(partial),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return manifest


def _golden_set(pin: Pin, model_dir: Path, limit: int) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    # Listed first, so that only a run without one falls back; a failing download is an error.
    logged_by_run = any(item.path == GOLDEN_SET_ARTIFACT for item in MlflowClient().list_artifacts(pin.run_id))
    if logged_by_run:
        local = mlflow.artifacts.download_artifacts(run_id=pin.run_id, artifact_path=GOLDEN_SET_ARTIFACT)
        logged = json.loads(Path(local).read_text())
        return {"source": f"runs:/{pin.run_id}/{GOLDEN_SET_ARTIFACT}", **_golden_fields(logged, limit)}

    try:
        model = mlflow.pyfunc.load_model(str(model_dir))
    except ImportError as exc:
        raise PackageError(
            f"{pin.label()}: the run logged no {GOLDEN_SET_ARTIFACT}, and scoring the model's input example "
            f"instead needs the model's own libraries ({exc.name} is missing): "
            f"pip install -r {model_dir / 'requirements.txt'}"
        ) from None
    example = model.input_example
    if example is None:
        raise PackageError(f"{pin.label()}: the run logged no {GOLDEN_SET_ARTIFACT} and the model has no input example")
    frame = example.head(limit)
    try:
        predictions = to_floats(model.predict(frame), len(frame))
    except ModelOutputError as exc:
        raise PackageError(f"{pin.label()}: scoring the input example for the golden set: {exc}") from None
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in frame.to_dict("records")]
    return {"source": "input example scored by mlflow.pyfunc at packaging", "rows": rows, "predictions": predictions}


def _golden_fields(logged: Mapping[str, Any], limit: int) -> dict[str, Any]:
    rows, predictions = logged.get("rows"), logged.get("predictions")
    if not isinstance(rows, list) or not isinstance(predictions, list) or len(rows) != len(predictions) or not rows:
        raise PackageError(f"{GOLDEN_SET_ARTIFACT}: expected equally long, non-empty 'rows' and 'predictions' lists")
    return {"rows": rows[:limit], "predictions": [float(p) for p in predictions[:limit]]}


# --------------------------------------------------------------------------------------------------
# Open (service start-up): stdlib only, no registry.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    root: Path
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_SUBDIR

    @cached_property
    def pin(self) -> Pin:
        return Pin.from_mapping(self.manifest, f"{self.root / MANIFEST}")

    @cached_property
    def golden_set(self) -> dict[str, Any]:
        return json.loads((self.root / GOLDEN_SET).read_text())


def open_package(root: Path, expected: Mapping[str, str] | None = None, verify: bool = True) -> Package:
    """The package at ``root``, checked against what the image pins (``expected`` fields) and its checksums."""
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise PackageError(f"model package directory {root} does not exist: the image was built without the model")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{manifest_path} is missing: {root} is not a model package") from None
    except ValueError as exc:
        raise PackageError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{manifest_path}: package format {manifest.get('format')!r}, this service reads {FORMAT}")
    package = Package(root, manifest)
    pin = package.pin
    wrong = [
        f"{field} is {getattr(pin, field)!r}, the image pins {str(value)!r}"
        for field, value in (expected or {}).items()
        if str(getattr(pin, field)) != str(value)
    ]
    if wrong:
        raise PackageError(f"{root} holds another model than pinned: " + "; ".join(wrong))
    if verify:
        _verify(root, manifest.get("files") or {})
        _check_format(root / MODEL_SUBDIR, None, pin.label())
    return package


def _check_format(model_dir: Path, digest: str | None, label: str) -> None:
    try:
        check_model_dir(model_dir, digest, label=label)
    except UnsafeModel as exc:
        raise PackageError(str(exc)) from None


def _verify(root: Path, files: Mapping[str, str]) -> None:
    if not files:
        raise PackageError(f"{root / MANIFEST} lists no files")
    problems = []
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(path) != digest:
            problems.append(f"{name} does not match its checksum")
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PackageError(f"model package {root} is damaged: {shown}")
