"""The model microservice of the deployment template (include/deployment/model_service) as real processes.

A small registered MLflow model (sqlite store, file artifacts) is packaged with the template's own CLI
(``python -m model_service.cli package``), then served by real ``uvicorn`` processes exactly as the
image's CMD and the local deploy adapter run it: no registry call at start-up, only the package.

The model is built in a child process, not in the pytest process: ``mlflow.set_tracking_uri`` also
writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (it would leak into every later test and subprocess),
and importing mlflow/sklearn here would mask the "nothing heavy at parse time" checks of other tests.
Every service process of this module (the one under test, the one that gets SIGTERM, the start-ups that
must fail) is launched at once: each pays a few seconds of imports, and they overlap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT_DIR = REPO / "include" / "deployment"
MODEL_LINE = "svc_test_line"
MODEL_NAME = "svc_test_model"
CODE_REVISION = "0123456789abcdef0123456789abcdef01234567"
IMAGE_BUILT_AT = "2026-01-02T03:04:05Z"
STARTUP_TIMEOUT_S = 90.0
N_ROWS = 20
GOLDEN_ROWS = 12  # logged by the v1 training run
EXAMPLE_ROWS = 5  # v1 and v2 input example (v2's golden set)
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
PREDICT_TOKEN = "t0k3n-" + "0123456789abcdef" * 2  # the ``auth`` service's MODEL_SERVICE_TOKEN
MAX_BODY_BYTES = 32 * 1024 * 1024


def build_model(workdir: Path) -> dict[str, Any]:
    """Train small sklearn pipelines on mixed dtypes and register two versions of MODEL_NAME in a sqlite
    MLflow store in ``workdir``: v1 logs a ``golden_set.json`` run artifact, v2 (another alpha) does not.
    Runs in a child process."""
    import mlflow
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    import skops.io
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(7)
    n = 200
    frame = pd.DataFrame(
        {
            "market_id": rng.choice(["de", "fr", "it", "es"], n),
            "day_of_week": rng.integers(0, 7, n).astype("int64"),
            "units_lag_7": rng.integers(0, 500, n).astype("int64"),
            "price": rng.uniform(1.0, 20.0, n),
            "temperature": rng.normal(12.0, 6.0, n),
        }
    )
    target = 0.8 * frame["units_lag_7"] - 3.0 * frame["price"] + rng.normal(0.0, 5.0, n)

    def fit(alpha: float) -> Pipeline:
        encode = ColumnTransformer(
            [("market", OneHotEncoder(handle_unknown="ignore"), ["market_id"])], remainder="passthrough"
        )
        return Pipeline([("encode", encode), ("regress", Ridge(alpha=alpha))]).fit(frame, target)

    def records(part: pd.DataFrame) -> list[dict[str, Any]]:
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in part.to_dict("records")]

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("svc_test", artifact_location=(workdir / "artifacts").as_uri())
    example = frame.head(EXAMPLE_ROWS)
    golden = frame.sample(GOLDEN_ROWS, random_state=2)
    versions: dict[str, dict[str, Any]] = {}
    for alpha, log_golden in ((1.0, True), (25.0, False)):
        pipeline = fit(alpha)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = mlflow.sklearn.log_model(
                pipeline,
                name="model",
                # the one format the lifecycle loads (model_service.model_format), as training writes it
                serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
                skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)) or None,
                signature=infer_signature(frame, pipeline.predict(frame)),
                input_example=example,
                # Explicit requirements: skips MLflow's inference, a ~10 s child process that imports the model.
                pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"skops=={skops.__version__}"],
            )
            golden_set = {"rows": records(golden), "predictions": [float(p) for p in pipeline.predict(golden)]}
            if log_golden:
                mlflow.log_dict(golden_set, "golden_set.json")
        version = str(mlflow.register_model(info.model_uri, MODEL_NAME).version)
        versions[version] = {
            "run_id": run.info.run_id,
            "golden": golden_set,
            "example": {"rows": records(example), "predictions": [float(p) for p in pipeline.predict(example)]},
        }

    sample = frame.sample(N_ROWS, random_state=1)
    v1 = fit(1.0)
    return {
        "tracking_uri": tracking_uri,
        "versions": versions,
        "rows": records(sample),
        "expected": [float(p) for p in v1.predict(sample)],
    }


# --------------------------------------------------------------------------------------------------
# Helpers shared with test_deployment_cli.py
# --------------------------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without anything that would steer MLflow, the service, the CLI or git."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_", "CI_", "PREDICTION_", "GIT_"))}
    return env | {"PYTHONDONTWRITEBYTECODE": "1"} | extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> list[str]:
    """The argv of ``python -m model_service.cli <args>`` (run it with ``cwd`` = the deployment repository)."""
    return [sys.executable, "-m", "model_service.cli", *args]


def write_pin(path: Path, **fields: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{key}: "{value}"\n' for key, value in fields.items()))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Built:
    """The registered model and the packages the CLI built from its two versions."""

    workdir: Path
    model: dict[str, Any]
    packages: dict[str, Path]
    package_runs: dict[str, subprocess.CompletedProcess[str]]

    @property
    def tracking_uri(self) -> str:
        return self.model["tracking_uri"]

    def run_id(self, version: str) -> str:
        return self.model["versions"][version]["run_id"]


_BUILT: list[Built] = []


def built_packages(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build the model (child process) and package v1 and v2 with the CLI, once per pytest process."""
    if _BUILT:
        return _BUILT[0]
    workdir = tmp_path_factory.mktemp("svc_mlflow")
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_model_service import build_model; print(json.dumps(build_model(Path(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(workdir)],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, f"building the test model failed:\n{done.stderr[-4000:]}"
    model = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(model["versions"]) == ["1", "2"]

    env = clean_env(MLFLOW_TRACKING_URI=model["tracking_uri"])
    packages: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen[str]] = {}
    for version, info in model["versions"].items():
        pin = write_pin(
            workdir / "pins" / f"v{version}" / "models" / f"{MODEL_LINE}.yaml",
            model_line=MODEL_LINE, model_name=MODEL_NAME, model_version=version, run_id=info["run_id"],
        )  # fmt: skip
        packages[version] = workdir / "build" / f"v{version}" / MODEL_LINE
        argv = cli("package", "--pin", str(pin), "--out", str(packages[version]))
        procs[version] = subprocess.Popen(
            argv, cwd=DEPLOYMENT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    runs = {}
    for version, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        runs[version] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert proc.returncode == 0, f"packaging v{version} failed:\n{stderr[-4000:]}"
    _BUILT.append(Built(workdir, model, packages, runs))
    return _BUILT[0]


def stderr_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    stderr: Path
    env: dict[str, str] = field(default_factory=dict)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = json_lines(self.stderr.read_text(errors="replace"))
        return [e for e in found if name is None or e.get("event") == name]


def service_env(package: Path, version: str = "1", **overrides: str | None) -> dict[str, str]:
    """What the image (or the local deploy adapter) gives the service; ``None`` removes a variable."""
    env = clean_env() | {
        "MODEL_DIR": str(package),
        "MODEL_LINE": MODEL_LINE,
        "MODEL_NAME": MODEL_NAME,
        "MODEL_VERSION": version,
        "CODE_REVISION": CODE_REVISION,
        "IMAGE_BUILT_AT": IMAGE_BUILT_AT,
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def launch(logs: Path, env: dict[str, str], tag: str) -> Running:
    """Start the service as the image's CMD and the local deploy adapter do."""
    port = free_port()
    stderr = logs / f"{tag}.stderr.log"
    cmd = [
        sys.executable, "-m", "uvicorn", "model_service.app:app", "--app-dir", str(DEPLOYMENT_DIR),
        "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "20",
    ]  # fmt: skip
    with stderr.open("wb") as err, (logs / f"{tag}.stdout.log").open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=logs, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return Running(proc=proc, url=f"http://127.0.0.1:{port}", stderr=stderr, env=env)


def wait_ready(running: Running, timeout: float = STARTUP_TIMEOUT_S) -> Running:
    """Wait for ``/ready`` (the port opens only once the model is loaded and warmed)."""
    deadline = time.monotonic() + timeout
    while True:
        if running.proc.poll() is not None:
            pytest.fail(f"service exited with {running.proc.returncode}:\n{stderr_tail(running.stderr)}")
        try:
            if httpx.get(f"{running.url}/ready", timeout=2).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"service not ready after {timeout}s:\n{stderr_tail(running.stderr)}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_packages(tmp_path_factory)


@pytest.fixture(scope="session")
def model(built: Built) -> dict[str, Any]:
    return built.model


def _damaged(package: Path, where: Path, damage: str) -> Path:
    """A copy of ``package`` with one kind of damage."""
    copy = where / f"pkg-{damage}"
    shutil.copytree(package, copy)
    manifest = json.loads((copy / "package.json").read_text())
    model_file = next(name for name in manifest["files"] if name.startswith("model/model."))
    if damage == "missing_artifact":
        (copy / model_file).unlink()
    elif damage == "tampered":
        with (copy / model_file).open("ab") as handle:
            handle.write(b"\0")
    elif damage == "golden_edited":
        # A package built with a wrong golden set (checksums updated): only the model itself can tell.
        golden = json.loads((copy / "golden_set.json").read_text())
        golden["predictions"][3] += 1.0
        (copy / "golden_set.json").write_text(json.dumps(golden))
        manifest["files"]["golden_set.json"] = sha256(copy / "golden_set.json")
        (copy / "package.json").write_text(json.dumps(manifest))
    return copy


# Start-ups that must fail: tag -> (package damage or None, environment overrides).
FAILING_STARTS: dict[str, tuple[str | None, dict[str, str | None]]] = {
    "wrong_version": (None, {"MODEL_VERSION": "2"}),
    "missing_dir": (None, {"MODEL_DIR": "/nonexistent/model-package"}),
    "missing_artifact": ("missing_artifact", {}),
    "tampered": ("tampered", {}),
    "missing_env": (None, {"MODEL_DIR": None, "MODEL_NAME": None, "MODEL_VERSION": ""}),
    "golden_edited": ("golden_edited", {}),
    "weak_token": (None, {"MODEL_SERVICE_TOKEN": "hunter2-short"}),
}


@pytest.fixture(scope="module")
def fleet(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    """Every service process of this module, launched together: ``main`` (under test; its prediction
    log directory holds a stale file an earlier process left), ``drain`` (gets SIGTERM), ``auth`` (with
    a bearer token) and the FAILING_STARTS."""
    logs = tmp_path_factory.mktemp("svc_logs")
    package = built.packages["1"]
    _stale_prediction_file(logs / "predictions-main")
    envs = {
        "main": service_env(
            package, PREDICTION_LOG_DIR=str(logs / "predictions-main"), PREDICTION_LOG_MAX_AGE_HOURS="24"
        ),
        "drain": service_env(package, PREDICTION_LOG_DIR=str(logs / "predictions-drain")),
        "auth": service_env(package, MODEL_SERVICE_TOKEN=f"{PREDICT_TOKEN}\n"),  # as a Secret made from a file
    }
    for tag, (damage, overrides) in FAILING_STARTS.items():
        damaged = _damaged(package, logs, damage) if damage else package
        envs[tag] = service_env(damaged, **overrides)
    launched: dict[str, Running] = {}
    try:
        for tag, env in envs.items():
            launched[tag] = launch(logs, env, tag)
        yield launched
    finally:
        for running in launched.values():
            stop(running.proc)


def _stale_prediction_file(directory: Path) -> Path:
    """A prediction log file of an earlier process, last written two days ago (beyond the 24 h max age)."""
    path = directory / MODEL_LINE / "v0" / "2026-01-01" / "earlier-1-1-1.jsonl"
    path.parent.mkdir(parents=True)
    record = {"ts": "2026-01-01T00:00:00.000Z", "request_id": "stale", "rows": 1, "request": {"rows": [{}]}}
    path.write_text(json.dumps(record | {"predictions": [1.0]}) + "\n")
    two_days_ago = time.time() - 2 * 86400
    os.utime(path, (two_days_ago, two_days_ago))
    return path


@pytest.fixture(scope="module")
def service(fleet: dict[str, Running]) -> Running:
    return wait_ready(fleet["main"])


@pytest.fixture(scope="module")
def auth_service(fleet: dict[str, Running]) -> Running:
    return wait_ready(fleet["auth"])


@pytest.fixture
def client(service: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        yield http


@dataclass
class Exited:
    returncode: int | None  # None: still running after STARTUP_TIMEOUT_S (then killed)
    stderr: str


@pytest.fixture(scope="module")
def failed_starts(fleet: dict[str, Running]) -> dict[str, Exited]:
    returncodes: dict[str, int | None] = {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for tag in FAILING_STARTS:
        try:
            returncodes[tag] = fleet[tag].proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncodes[tag] = None
            stop(fleet[tag].proc)
    return {tag: Exited(returncodes[tag], fleet[tag].stderr.read_text(errors="replace")) for tag in FAILING_STARTS}


def _startup_failure(exited: Exited) -> str:
    """The service's own one-line JSON report of why it did not start (after checking that it exited)."""
    assert exited.returncode is not None, f"still running after {STARTUP_TIMEOUT_S}s:\n{exited.stderr[-3000:]}"
    assert exited.returncode != 0, exited.stderr[-3000:]
    failures = [e["error"] for e in json_lines(exited.stderr) if e.get("event") == "startup_failed"]
    assert len(failures) == 1, exited.stderr[-3000:]
    assert not [e for e in json_lines(exited.stderr) if e.get("event") == "model_loaded"]
    assert "\n" not in failures[0]
    return failures[0]


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert len(values) <= 1, f"{name} {labels} matches {len(values)} samples"
    return values[0] if values else 0.0


def _prediction_records(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, json.loads(line))
        for path in sorted(directory.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def _wait_for_records(directory: Path, request_ids: set[str], timeout: float = 10.0) -> list[tuple[Path, dict]]:
    """The prediction log's records once every one of ``request_ids`` shows up (the log flushes every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _prediction_records(directory) if directory.exists() else []
        if request_ids <= {r["request_id"] for _, r in records} or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


_DROP = object()


def _row(model: dict[str, Any], i: int = 0, **changes: Any) -> dict[str, Any]:
    row = dict(model["rows"][i])
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


# --------------------------------------------------------------------------------------------------
# Identity: health, readiness, version
# --------------------------------------------------------------------------------------------------
def test_health(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_names_the_version(client: httpx.Client) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model_version": "1"}


def test_version_is_the_pin_the_package_and_the_build(client: httpx.Client, built: Built) -> None:
    manifest = json.loads((built.packages["1"] / "package.json").read_text())
    response = client.get("/version")
    assert response.status_code == 200
    assert response.json() == {
        "model_line": MODEL_LINE,
        "model_name": MODEL_NAME,
        "model_version": "1",
        "run_id": built.run_id("1"),
        "code_revision": CODE_REVISION,
        "image_built_at": IMAGE_BUILT_AT,
        "packaged_at": manifest["packaged_at"],
    }


# --------------------------------------------------------------------------------------------------
# Predictions and request ids
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, N_ROWS])
def test_predict_equals_offline_predictions(client: httpx.Client, model: dict[str, Any], n: int) -> None:
    response = client.post("/predict", json={"rows": model["rows"][:n]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.keys() == {"model_name", "model_version", "request_id", "predictions"}
    assert (body["model_name"], body["model_version"]) == (MODEL_NAME, "1")
    assert body["request_id"] == response.headers["x-request-id"]
    assert GENERATED_ID.match(body["request_id"])
    predictions = body["predictions"]
    assert len(predictions) == n
    assert all(isinstance(p, float) and math.isfinite(p) for p in predictions)
    assert predictions == pytest.approx(model["expected"][:n], rel=1e-9)


def test_client_request_id_is_echoed(client: httpx.Client, model: dict[str, Any]) -> None:
    request_id = "order-42.retry:1_" + uuid.uuid4().hex
    response = client.post("/predict", json={"rows": model["rows"][:1]}, headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert response.json()["request_id"] == request_id


@pytest.mark.parametrize("bad_id", ["has spaces in it", "x" * 200], ids=["spaces", "200_chars"])
def test_invalid_request_id_is_replaced(client: httpx.Client, model: dict[str, Any], bad_id: str) -> None:
    response = client.post("/predict", json={"rows": model["rows"][:1]}, headers={"X-Request-ID": bad_id})
    assert response.status_code == 200
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert GENERATED_ID.match(response.headers["x-request-id"])


# --------------------------------------------------------------------------------------------------
# Bad input: 422 naming row and field, never 500
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "field", "row_index"),
    [
        ("missing", "price", 0),
        ("unknown", "colour", 1),
        ("string_in_float", "temperature", 1),
        ("string_in_int", "day_of_week", 0),
        ("float_in_int", "units_lag_7", 0),
        ("number_in_string", "market_id", 1),
        ("null_in_required", "price", 1),
        ("integer_too_large_for_double", "price", 2),
    ],
)
def test_invalid_row_is_422_naming_field_and_row(
    client: httpx.Client, model: dict[str, Any], case: str, field: str, row_index: int
) -> None:
    bad = {
        "missing": _row(model, price=_DROP),
        "unknown": _row(model, 1, colour="red"),
        "string_in_float": _row(model, 1, temperature="warm"),
        "string_in_int": _row(model, day_of_week="monday"),
        "float_in_int": _row(model, units_lag_7=12.5),
        "number_in_string": _row(model, 1, market_id=49),
        "null_in_required": _row(model, 1, price=None),
        "integer_too_large_for_double": _row(model, 2, price=10**400),
    }[case]
    rows = [_row(model, 0), _row(model, 1), _row(model, 2)]
    rows[row_index] = bad
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "rows", row_index, field]]
    assert field in errors[0]["msg"] and f"row {row_index}" in errors[0]["msg"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_number_is_422_naming_field(client: httpx.Client, model: dict[str, Any], token: str) -> None:
    """Python's JSON parser accepts NaN/Infinity tokens; the service must refuse them, not score them."""
    row = json.dumps(_row(model, 0, price=0.5)).replace("0.5", token)
    assert token in row
    raw = f'{{"rows": [{json.dumps(_row(model, 1))}, {row}]}}'
    response = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "rows", 1, "price"]]
    assert "finite" in errors[0]["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"rows": []}, ["body", "rows"]),
        ({}, ["body", "rows"]),
        ({"rows": "not a list"}, ["body", "rows"]),
        ({"rows": [{"price": 1.0}], "extra": 1}, ["body", "extra"]),
        (b'{"rows": [', ["body"]),
        (b"", ["body"]),
        ([{"price": 1.0}], ["body"]),
        ({"rows": [{"price": 1.0}, 7]}, ["body", "rows", 1]),
        ("10001_rows", ["body", "rows"]),
        (b'{"rows": [{"price": ' + b"[" * 5000 + b"]" * 5000 + b"}]}", ["body"]),
    ],
    ids=[
        "empty_rows", "no_rows", "rows_not_a_list", "extra_key", "invalid_json", "empty_body",
        "body_is_a_list", "row_not_an_object", "10001_rows", "nested_too_deeply",
    ],
)  # fmt: skip
def test_malformed_body_is_422_naming_the_place(
    client: httpx.Client, model: dict[str, Any], body: Any, loc: list[Any]
) -> None:
    if body == "10001_rows":
        body = {"rows": [model["rows"][0]] * 10_001}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert loc in [e["loc"] for e in response.json()["detail"]], response.text


# --------------------------------------------------------------------------------------------------
# Hostile input: bounded work, other requests answered meanwhile, only UTF-8, no key twice
# --------------------------------------------------------------------------------------------------
def _unknown_keys_body(keys: int) -> bytes:
    return b'{"rows": [{' + b", ".join(b'"k%07d": 0' % i for i in range(keys)) + b"}]}"


def _reset_peak_rss(pid: int) -> int:
    """The process's RSS (KiB), after setting its peak RSS to it (/proc/<pid>/clear_refs, Linux)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _proc_status_kib(pid, "VmRSS")


def _peak_rss_growth_mib(pid: int, rss_before: int) -> float:
    return (_proc_status_kib(pid, "VmHWM") - rss_before) / 1024


def _proc_status_kib(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)[1])  # type: ignore[index]


def test_a_row_of_100k_unknown_keys_is_refused_at_little_cost(client: httpx.Client, service: Running) -> None:
    """1.3 MB naming 100k unknown fields cost 49 MB and 1.4 s when an error was built for each key."""
    body = _unknown_keys_body(100_000)
    rss = _reset_peak_rss(service.proc.pid)
    started = time.perf_counter()
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    seconds = time.perf_counter() - started
    growth = _peak_rss_growth_mib(service.proc.pid, rss)
    assert response.status_code == 422, response.text[:500]
    [error] = response.json()["detail"]
    assert error["type"] == "too_many_keys" and "100000 keys" in error["msg"], error
    assert growth < 30, f"peak RSS grew {growth:.0f} MiB for a 1.3 MB body"
    assert seconds < 0.3, f"took {seconds:.2f} s"


def test_ordinary_requests_are_answered_while_a_hostile_32_mib_body_is_read(
    client: httpx.Client, service: Running, model: dict[str, Any]
) -> None:
    """Unknown keys up to the body limit (2.6 million): refused before parsing, and the service keeps
    answering other requests meanwhile (before: ~1.2 GB and 35 s inside the event loop)."""
    body = _unknown_keys_body((MAX_BODY_BYTES - 64) // len(b'"k0000000": 0, '))
    assert len(body) <= MAX_BODY_BYTES
    answers: list[httpx.Response] = []

    def send_hostile() -> None:
        with httpx.Client(base_url=service.url, timeout=120) as hostile:
            answers.append(hostile.post("/predict", content=body, headers={"Content-Type": "application/json"}))

    rss = _reset_peak_rss(service.proc.pid)
    hostile_client = threading.Thread(target=send_hostile)
    hostile_client.start()
    latencies = []
    while hostile_client.is_alive():
        started = time.perf_counter()
        assert client.post("/predict", json={"rows": model["rows"][:1]}, timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
    hostile_client.join()
    growth = _peak_rss_growth_mib(service.proc.pid, rss)
    assert answers[0].status_code == 413, answers[0].text[:500]
    assert "JSON values" in answers[0].json()["detail"] and "fewer rows" in answers[0].json()["detail"]
    assert latencies, "no ordinary request was sent while the hostile one was read"
    assert max(latencies) < 0.5, f"an ordinary request took {max(latencies):.2f} s beside the hostile body"
    assert growth < 150, f"peak RSS grew {growth:.0f} MiB for a 32 MiB body"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_only_utf8_json_is_accepted(client: httpx.Client, model: dict[str, Any], encoding: str) -> None:
    """json.loads(bytes) would take these (and the prediction log would store them: no UTF-8 line)."""
    body = json.dumps({"rows": model["rows"][:1]}).encode(encoding)
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 415, response.text[:300]
    assert "UTF-8" in response.json()["detail"] and encoding.upper() in response.json()["detail"]


def test_invalid_utf8_is_refused_naming_the_byte(client: httpx.Client, model: dict[str, Any]) -> None:
    """An encoded surrogate (ED A0 80) passes json.loads' decoding, and is no UTF-8."""
    text = json.dumps({"rows": [_row(model, market_id="SURROGATE")]})
    body = text.encode().replace(b"SURROGATE", b"\xed\xa0\x80")
    at = text.index("SURROGATE")
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 415, response.text[:300]
    assert response.json()["detail"].endswith(f"byte {at} (0xed) is not valid UTF-8")


def test_a_key_repeated_in_a_row_is_422_naming_row_and_key(client: httpx.Client, model: dict[str, Any]) -> None:
    """json.loads keeps the last of a repeated key silently: the model would score the other value."""
    second = json.dumps(_row(model, 1))[:-1] + ', "price": 99.5}'
    raw = f'{{"rows": [{json.dumps(_row(model, 0))}, {second}]}}'
    response = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "rows", 1, "price"] and error["type"] == "duplicate_key"
    assert error["msg"] == "row 1: field 'price' appears more than once"


# --------------------------------------------------------------------------------------------------
# Telemetry: metrics, request log, prediction log
# --------------------------------------------------------------------------------------------------
def test_metrics_count_requests_by_route_status_and_version(
    client: httpx.Client, model: dict[str, Any], built: Built
) -> None:
    labels_200 = {"route": "/predict", "method": "POST", "status": "200", "model_version": "1"}
    labels_422 = labels_200 | {"status": "422"}
    before = client.get("/metrics").text
    for _ in range(3):
        assert client.post("/predict", json={"rows": model["rows"][:2]}).status_code == 200
    for _ in range(2):
        assert client.post("/predict", json={"rows": []}).status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("model_service_requests_total", **labels_200) == 3
    assert delta("model_service_requests_total", **labels_422) == 2
    assert delta("model_service_request_duration_seconds_count", **labels_200) == 3
    assert delta("model_service_request_duration_seconds_count", **labels_422) == 2
    assert _metric(after, "model_service_request_duration_seconds_bucket", **labels_200, le="+Inf") >= 3
    assert delta("model_service_predicted_rows_total", model_version="1") == 6
    info = {"model_line": MODEL_LINE, "model_name": MODEL_NAME, "model_version": "1", "code_revision": CODE_REVISION}
    assert _metric(after, "model_service_model_info", **info, run_id=built.run_id("1")) == 1


def test_every_request_is_one_json_log_line(client: httpx.Client, service: Running, model: dict[str, Any]) -> None:
    tag = uuid.uuid4().hex[:8]
    client.get("/version", headers={"X-Request-ID": f"log-version-{tag}"})
    client.post("/predict", json={"rows": model["rows"][:3]}, headers={"X-Request-ID": f"log-ok-{tag}"})
    client.post("/predict", json={"rows": [{"price": "x"}]}, headers={"X-Request-ID": f"log-bad-{tag}"})
    time.sleep(0.2)
    requests = service.events("request")
    mine = {e["request_id"]: e for e in requests if e.get("request_id", "").endswith(tag)}
    assert sorted(mine) == sorted(f"log-{kind}-{tag}" for kind in ("version", "ok", "bad"))
    assert len([e for e in requests if e.get("request_id", "").endswith(tag)]) == 3, "one line per request"
    for event in mine.values():
        assert {"ts", "level", "request_id", "method", "route", "status", "latency_ms", "model_version", "rows"} <= (
            event.keys()
        )
        assert isinstance(event["latency_ms"], float | int) and event["latency_ms"] >= 0
        assert event["model_version"] == "1"
    assert (mine[f"log-version-{tag}"]["route"], mine[f"log-version-{tag}"]["status"]) == ("/version", 200)
    assert (mine[f"log-ok-{tag}"]["route"], mine[f"log-ok-{tag}"]["status"], mine[f"log-ok-{tag}"]["rows"]) == (
        "/predict", 200, 3,
    )  # fmt: skip
    assert (mine[f"log-bad-{tag}"]["route"], mine[f"log-bad-{tag}"]["status"]) == ("/predict", 422)
    assert not [e for e in requests if e["status"] >= 500]


def test_model_loaded_is_logged_once_with_run_and_serving_path(service: Running, built: Built) -> None:
    loaded = service.events("model_loaded")
    assert len(loaded) == 1
    assert loaded[0]["run_id"] == built.run_id("1")
    assert isinstance(loaded[0]["serving_path"], str) and loaded[0]["serving_path"]  # e.g. "scikit-learn predict"
    assert (loaded[0]["model_line"], loaded[0]["model_version"]) == (MODEL_LINE, "1")
    assert loaded[0]["golden_rows"] == GOLDEN_ROWS


def test_prediction_log_has_every_scored_row_with_its_prediction(
    client: httpx.Client, service: Running, model: dict[str, Any]
) -> None:
    directory = Path(service.env["PREDICTION_LOG_DIR"])
    tag = uuid.uuid4().hex[:8]
    rejected = f"plog-422-{tag}"
    assert (
        client.post("/predict", json={"rows": [{"price": "x"}]}, headers={"X-Request-ID": rejected}).status_code == 422
    )
    sent: dict[str, tuple[list[dict[str, Any]], list[float]]] = {}
    for i, n in enumerate((1, 7, N_ROWS)):
        request_id = f"plog-{i}-{tag}"
        rows = model["rows"][:n]
        response = client.post("/predict", json={"rows": rows}, headers={"X-Request-ID": request_id})
        assert response.status_code == 200
        sent[request_id] = (rows, response.json()["predictions"])

    records = _wait_for_records(directory, set(sent))
    mine = [(path, r) for path, r in records if r["request_id"].endswith(tag)]
    assert rejected not in {r["request_id"] for _, r in mine}, "a rejected request logs nothing"
    assert sorted(r["request_id"] for _, r in mine) == sorted(sent), "one line per scored request"
    today = datetime.now(UTC).date()
    for path, record in mine:
        relative = path.relative_to(directory).parts
        assert relative[:2] == (MODEL_LINE, "v1") and len(relative) == 4, path
        day = datetime.strptime(relative[2], "%Y-%m-%d").replace(tzinfo=UTC).date()
        assert today - timedelta(days=1) <= day <= today
        rows, predictions = sent[record["request_id"]]
        assert record["model_version"] == "1" and record["model_name"] == MODEL_NAME
        # request.rows[i] was scored as predictions[i], exactly as sent and answered
        assert record["request"] == {"rows": rows} and record["rows"] == len(rows)
        assert record["predictions"] == predictions


def test_prediction_log_is_owner_only_and_keeps_no_file_past_its_max_age(
    client: httpx.Client, service: Running, model: dict[str, Any]
) -> None:
    """The log holds raw inputs (0600 files, 0700 directories); PREDICTION_LOG_MAX_AGE_HOURS=24 removed
    the two-day-old file an earlier process had left, at start-up, with no request needed."""
    directory = Path(service.env["PREDICTION_LOG_DIR"])
    assert not (directory / MODEL_LINE / "v0" / "2026-01-01" / "earlier-1-1-1.jsonl").exists()
    request_id = f"private-{uuid.uuid4().hex[:8]}"
    assert client.post("/predict", json={"rows": model["rows"][:1]}, headers={"X-Request-ID": request_id}).is_success
    [(path, _)] = [(p, r) for p, r in _wait_for_records(directory, {request_id}) if r["request_id"] == request_id]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    created = [path.parent, path.parent.parent]  # <line>/v1/<day>: the line's folder holds the stale file's
    assert [stat.S_IMODE(folder.stat().st_mode) for folder in created] == [0o700, 0o700]


# --------------------------------------------------------------------------------------------------
# Graceful shutdown
# --------------------------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_requests_and_loses_no_prediction(
    fleet: dict[str, Running], model: dict[str, Any]
) -> None:
    """Kubernetes sends SIGTERM on every rollout: requests in flight must complete, and be logged.

    Each of the concurrent requests sends half of its body and waits; once a ``/health`` probe shows
    the server has read them all (their handlers are running), SIGTERM goes, and only after the server
    has stopped listening do the clients send the rest. So every request is provably in flight when
    the shutdown starts. (A request whose first bytes arrive in the very event-loop turn that starts
    the shutdown is reset by uvicorn; in Kubernetes the preStop sleep of k8s/base/deployment.yaml
    keeps new requests away from a terminating pod.)
    """
    running = wait_ready(fleet["drain"])
    port = int(running.url.rsplit(":", 1)[1])
    n_requests, n_rows = 20, 2000
    rows = [model["rows"][i % N_ROWS] for i in range(n_rows)]
    expected = [model["expected"][i % N_ROWS] for i in range(n_rows)]
    payload = json.dumps({"rows": rows}).encode()
    results: dict[str, httpx.Response | BaseException] = {}
    lock = threading.Lock()
    half_sent = threading.Semaphore(0)
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield payload[: len(payload) // 2]
        half_sent.release()
        release.wait(timeout=60)
        yield payload[len(payload) // 2 :]

    def call(request_id: str) -> None:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload)), "X-Request-ID": request_id}
        try:
            with httpx.Client(base_url=running.url, timeout=60) as http:
                response = http.post("/predict", content=body(), headers=headers)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            response = exc
        with lock:
            results[request_id] = response

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    request_ids = [f"drain-{i:02d}" for i in range(n_requests)]
    threads = [threading.Thread(target=call, args=(request_id,)) for request_id in request_ids]
    try:
        for thread in threads:
            thread.start()
        for _ in request_ids:
            assert half_sent.acquire(timeout=60), "the requests were not all started"
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200
        running.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while listening() and time.monotonic() - signalled < 10:
            time.sleep(0.05)
        assert not listening(), "still accepting connections 10 s after SIGTERM"
        assert not results, "a request was answered before its body was complete"
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)
    returncode = running.proc.wait(timeout=30)
    exit_seconds = time.monotonic() - signalled

    for request_id in request_ids:
        response = results[request_id]
        assert isinstance(response, httpx.Response), f"{request_id}: {response!r}"
        assert response.status_code == 200, response.text[:500]
        assert response.json()["request_id"] == request_id
        assert response.json()["predictions"] == pytest.approx(expected, rel=1e-9)
    stderr = running.stderr.read_text(errors="replace")
    # uvicorn re-raises the signal once shut down (exit status 143 in a container): still a clean exit
    assert returncode in (0, -signal.SIGTERM), stderr[-3000:]
    assert exit_seconds < 20, f"took {exit_seconds:.1f}s to exit after SIGTERM"
    complete = [e for e in json_lines(stderr) if e.get("event") == "shutdown_complete"]
    assert len(complete) == 1, stderr[-3000:]
    assert complete[0]["prediction_log_written_rows"] == n_requests * n_rows
    assert complete[0]["prediction_log_dropped_rows"] == 0
    records = _prediction_records(Path(running.env["PREDICTION_LOG_DIR"]))
    logged = {record["request_id"]: len(record["predictions"]) for _, record in records}
    assert logged == dict.fromkeys(request_ids, n_rows)
    assert all(len(record["request"]["rows"]) == n_rows for _, record in records)


# --------------------------------------------------------------------------------------------------
# Bearer token on /predict (MODEL_SERVICE_TOKEN)
# --------------------------------------------------------------------------------------------------
MISSING_TOKEN = "/predict requires an 'Authorization: Bearer <token>' header"


@pytest.mark.parametrize(
    ("authorization", "error", "detail"),
    [
        (None, None, MISSING_TOKEN),
        ("Basic dXNlcjpwYXNz", None, MISSING_TOKEN),
        ("Bearer", None, MISSING_TOKEN),
        ("Bearer not-the-token", "invalid_token", "the bearer token is not valid"),
        (f"Bearer {PREDICT_TOKEN[:-1]}", "invalid_token", "the bearer token is not valid"),
    ],
    ids=["no_header", "basic", "no_token", "wrong_token", "token_prefix"],
)  # fmt: skip
def test_predict_without_the_token_is_401_before_the_body_is_read(
    auth_service: Running, authorization: str | None, error: str | None, detail: str
) -> None:
    """The body is not JSON at all: an unauthenticated client cannot make the service parse anything."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    response = httpx.post(f"{auth_service.url}/predict", content=b"{not json", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": detail}
    challenge = 'Bearer realm="model-service"' + (f', error="{error}"' if error else "")
    assert response.headers["www-authenticate"] == challenge


def test_predict_with_the_token_scores(auth_service: Running, model: dict[str, Any]) -> None:
    for scheme in ("Bearer", "bearer"):
        response = httpx.post(
            f"{auth_service.url}/predict",
            json={"rows": model["rows"][:3]},
            headers={"Authorization": f"{scheme} {PREDICT_TOKEN}"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == pytest.approx(model["expected"][:3], rel=1e-9)


def test_probes_version_and_metrics_need_no_token(auth_service: Running) -> None:
    for path in ("/health", "/ready", "/version", "/metrics"):
        assert httpx.get(f"{auth_service.url}{path}").status_code == 200, path


def test_smoke_step_sends_the_token_from_its_environment(auth_service: Running, built: Built) -> None:
    """The pipeline's pre-production check reads MODEL_SERVICE_TOKEN like the service does."""
    argv = cli("smoke", "--url", auth_service.url, "--package", str(built.packages["1"]), "--wait", "30")
    run = functools.partial(subprocess.run, argv, cwd=DEPLOYMENT_DIR, capture_output=True, text=True, timeout=120)
    with_token = run(env=clean_env(MODEL_SERVICE_TOKEN=PREDICT_TOKEN))
    assert with_token.returncode == 0, with_token.stderr[-2000:]
    without = run(env=clean_env())
    assert without.returncode == 1 and "HTTP 401" in without.stderr, without.stderr[-2000:]


def test_the_token_is_never_logged(auth_service: Running, model: dict[str, Any]) -> None:
    httpx.post(f"{auth_service.url}/predict", json={"rows": []}, headers={"Authorization": f"Bearer {PREDICT_TOKEN}"})
    time.sleep(0.2)
    assert PREDICT_TOKEN not in auth_service.stderr.read_text(errors="replace")
    [loaded] = auth_service.events("model_loaded")
    assert loaded["predict_auth"] == "bearer token"


# --------------------------------------------------------------------------------------------------
# Start-ups that must fail: exit non-zero with one `startup_failed` line naming the cause
# --------------------------------------------------------------------------------------------------
def test_wrong_version_pinned_names_both_versions(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["wrong_version"])
    assert "model_version is '1', the image pins '2'" in error, error


def test_missing_package_directory_is_named(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["missing_dir"])
    assert "/nonexistent/model-package" in error and "does not exist" in error, error


def test_missing_model_artifact_is_named(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["missing_artifact"])
    assert "damaged" in error and re.search(r"model/model\.\w+ is missing", error), error


def test_tampered_file_fails_its_checksum(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["tampered"])
    assert "damaged" in error and re.search(r"model/model\.\w+ does not match its checksum", error), error


def test_all_missing_variables_are_named_at_once(failed_starts: dict[str, Exited]) -> None:
    """An empty value counts as missing (MODEL_VERSION is set to "" here)."""
    error = _startup_failure(failed_starts["missing_env"])
    assert error == "missing required environment variable(s): MODEL_DIR, MODEL_NAME, MODEL_VERSION"


def test_golden_set_not_reproduced_refuses_to_serve(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["golden_edited"])
    assert "golden row 3" in error and "does not reproduce the model" in error, error


def test_a_weak_token_refuses_to_start_without_showing_it(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["weak_token"])
    assert error.startswith("MODEL_SERVICE_TOKEN must be at least 16 characters"), error
    assert "hunter2" not in failed_starts["weak_token"].stderr


def test_no_request_of_this_module_got_a_500(service: Running) -> None:
    """Everything above, bad input included, was answered without a server error (runs last)."""
    statuses = [(e["route"], e["status"]) for e in service.events("request")]
    assert statuses, "no request was logged"
    assert not [s for s in statuses if s[1] >= 500], statuses


# --------------------------------------------------------------------------------------------------
# The deployment repository's own CI `test` job, executed for real
# --------------------------------------------------------------------------------------------------
def test_deployment_repository_test_job_passes(built: Built, tmp_path: Path) -> None:
    """``MODEL_DIR=build/<line> python -m pytest tests/ -q`` from the deployment repository root, with the
    pin variables the package job's ``build/images/<line>.env`` exports, as the CI ``test`` job runs it."""
    root = tmp_path / "deployment-repository"
    shutil.copytree(DEPLOYMENT_DIR, root, ignore=shutil.ignore_patterns("__pycache__", "build", ".pytest_cache"))
    shutil.copytree(built.packages["1"], root / "build" / MODEL_LINE)
    env = clean_env(MODEL_DIR=f"build/{MODEL_LINE}", MODEL_LINE=MODEL_LINE, MODEL_NAME=MODEL_NAME, MODEL_VERSION="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/", "-q"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"^6 passed", done.stdout.splitlines()[-1]), done.stdout[-2000:]


def test_an_oversized_body_is_refused_with_413_before_it_is_read(client: httpx.Client) -> None:
    """A client cannot make a pod hold an arbitrarily large body in memory (32 MiB limit)."""
    response = client.post("/predict", content=b" " * ((32 << 20) + 1), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "32 MiB" in response.json()["detail"]
    assert client.get("/ready").status_code == 200
