"""The model microservice (include/service/app.py) as the local deploy adapter runs it: a real uvicorn
process serving a real registered MLflow model from a sqlite tracking store.

The model is built in a child process, not in the pytest process: ``mlflow.set_tracking_uri`` also
writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (it would leak into every later test and subprocess),
and importing mlflow/sklearn here would mask the "nothing heavy at parse time" checks of other tests.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE_DIR = REPO / "include" / "service"
MODEL_LINE = "svc_test_line"
MODEL_NAME = "svc_test_model"
SERVICE_REVISION = "0123456789abcdef0123456789abcdef01234567"
STARTUP_TIMEOUT_S = 60.0
N_ROWS = 20


def build_model(workdir: Path) -> dict[str, Any]:
    """Train a small sklearn pipeline on mixed dtypes, log it with signature and input example to a
    sqlite MLflow store in ``workdir`` and register it as version 1 of MODEL_NAME. Runs in a child."""
    import mlflow
    import numpy as np
    import pandas as pd
    import sklearn
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
    pipeline = Pipeline(
        [
            (
                "encode",
                ColumnTransformer(
                    [("market", OneHotEncoder(handle_unknown="ignore"), ["market_id"])],
                    remainder="passthrough",
                ),
            ),
            ("regress", Ridge(alpha=1.0)),
        ]
    ).fit(frame, target)

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("svc_test", artifact_location=(workdir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(frame, pipeline.predict(frame)),
            input_example=frame.head(3),
            # Explicit requirements: skips MLflow's inference, a ~10 s child process that imports the model.
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
    version = mlflow.register_model(info.model_uri, MODEL_NAME)

    sample = frame.sample(N_ROWS, random_state=1)
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in sample.to_dict("records")]
    return {
        "tracking_uri": tracking_uri,
        "run_id": run.info.run_id,
        "version": str(version.version),
        "rows": rows,
        "expected": [float(p) for p in pipeline.predict(sample)],
    }


def _clean_env() -> dict[str, str]:
    """The test process environment without anything that would steer MLflow or the service."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_", "SERVICE_"))}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stderr_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    stderr: Path


def _launch(tmp: Path, env: dict[str, str], tag: str) -> Running:
    """Start the service exactly as the local deploy adapter does."""
    port = _free_port()
    stderr = tmp / f"{tag}.stderr.log"
    cmd = [
        sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(SERVICE_DIR),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with stderr.open("wb") as err, (tmp / f"{tag}.stdout.log").open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=err)
    return Running(proc=proc, url=f"http://127.0.0.1:{port}", stderr=stderr)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _service_env(model: dict[str, Any], **overrides: str | None) -> dict[str, str]:
    env = _clean_env() | {
        "MODEL_LINE": MODEL_LINE,
        "MODEL_NAME": MODEL_NAME,
        "MODEL_VERSION": model["version"],
        "MLFLOW_TRACKING_URI": model["tracking_uri"],
        "SERVICE_REVISION": SERVICE_REVISION,
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("svc_mlflow")
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_service import build_model; print(json.dumps(build_model(Path(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(workdir)],
        cwd=workdir, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"building the test model failed:\n{done.stderr[-4000:]}"
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert built["version"] == "1"
    return built | {"workdir": workdir}


@pytest.fixture(scope="session")
def service(model: dict[str, Any]) -> Iterator[Running]:
    running = _launch(model["workdir"], _service_env(model), "healthy")
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if running.proc.poll() is not None:
                pytest.fail(f"service exited with {running.proc.returncode}:\n{_stderr_tail(running.stderr)}")
            try:
                if httpx.get(f"{running.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"service not healthy after {STARTUP_TIMEOUT_S}s:\n{_stderr_tail(running.stderr)}")
            time.sleep(0.2)
        yield running
    finally:
        _stop(running.proc)


@pytest.fixture
def client(service: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


# Start-ups that must fail, launched together (each pays the ~3 s import of mlflow) to save wall time.
FAILING_STARTS: dict[str, dict[str, str | None]] = {
    "unregistered_version": {"MODEL_VERSION": "99"},
    "no_MODEL_NAME": {"MODEL_NAME": None},
    "no_line_version_uri": {"MODEL_LINE": None, "MODEL_VERSION": "", "MLFLOW_TRACKING_URI": None},
    "missing_sqlite_file": {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"},
}


@dataclass
class Exited:
    returncode: int | None  # None: still running after STARTUP_TIMEOUT_S (then killed)
    stderr: str


@pytest.fixture(scope="session")
def failed_starts(model: dict[str, Any]) -> dict[str, Exited]:
    launched = {
        tag: _launch(model["workdir"], _service_env(model, **overrides), tag)
        for tag, overrides in FAILING_STARTS.items()
    }
    returncodes: dict[str, int | None] = {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        for tag, running in launched.items():
            try:
                returncodes[tag] = running.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                returncodes[tag] = None
    finally:
        for running in launched.values():
            _stop(running.proc)
    return {
        tag: Exited(returncodes.get(tag), running.stderr.read_text(errors="replace"))
        for tag, running in launched.items()
    }


def _startup_failure(exited: Exited) -> str:
    """The service's own one-line JSON report of why it did not start (after checking that it exited)."""
    assert exited.returncode is not None, f"still running after {STARTUP_TIMEOUT_S}s:\n{exited.stderr[-3000:]}"
    assert exited.returncode != 0, exited.stderr[-3000:]
    events = [json.loads(line) for line in exited.stderr.splitlines() if line.startswith("{")]
    failures = [e["error"] for e in events if e.get("event") == "startup_failed"]
    assert len(failures) == 1, exited.stderr[-3000:]
    return failures[0]


# --------------------------------------------------------------------------------------------------


def test_health(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_version_reports_the_served_model(client: httpx.Client, model: dict[str, Any]) -> None:
    response = client.get("/version")
    assert response.status_code == 200
    assert response.json() == {
        "model_line": MODEL_LINE,
        "model_name": MODEL_NAME,
        "model_version": "1",
        "run_id": model["run_id"],
        "service_revision": SERVICE_REVISION,
    }


@pytest.mark.parametrize("n", [1, N_ROWS])
def test_predict_returns_one_finite_float_per_row(client: httpx.Client, model: dict[str, Any], n: int) -> None:
    response = client.post("/predict", json={"rows": model["rows"][:n]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL_NAME
    assert body["model_version"] == "1"
    predictions = body["predictions"]
    assert len(predictions) == n
    assert all(isinstance(p, float) and math.isfinite(p) for p in predictions)
    assert predictions == pytest.approx(model["expected"][:n], rel=1e-9)


_DROP = object()


def _row(model: dict[str, Any], i: int = 0, **changes: Any) -> dict[str, Any]:
    row = dict(model["rows"][i])
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


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
    }[case]
    rows = [_row(model, 0), _row(model, 1), _row(model, 2)]
    rows[row_index] = bad
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "rows", row_index, field]]
    assert field in errors[0]["msg"] and f"row {row_index}" in errors[0]["msg"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rows": []}, "rows"),
        ({}, "rows"),
        ({"rows": "not a list"}, "rows"),
        ({"rows": [{"price": 1.0}], "extra": 1}, "extra"),
    ],
)
def test_malformed_body_is_422_naming_field(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    assert any(e["loc"][:2] == ["body", field] for e in response.json()["detail"]), response.text


def test_every_request_is_one_json_log_line(client: httpx.Client, service: Running, model: dict[str, Any]) -> None:
    client.get("/version")
    client.post("/predict", json={"rows": []})
    time.sleep(0.2)
    events = [json.loads(line) for line in service.stderr.read_text().splitlines() if line.startswith("{")]
    requests = [e for e in events if e["event"] == "request"]
    assert {"route", "status", "latency_ms", "model_version"} <= requests[-1].keys()
    assert (requests[-2]["route"], requests[-2]["status"]) == ("/version", 200)
    assert (requests[-1]["route"], requests[-1]["status"], requests[-1]["model_version"]) == (
        "/predict",
        422,
        "1",
    )
    assert not [e for e in requests if e["status"] >= 500]
    loaded = [e for e in events if e["event"] == "model_loaded"]
    assert len(loaded) == 1 and loaded[0]["run_id"] == model["run_id"]


def test_unregistered_version_exits_non_zero_naming_it(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["unregistered_version"])
    assert MODEL_NAME in error and "version 99" in error and "not registered" in error


def test_missing_model_name_exits_non_zero_naming_it(failed_starts: dict[str, Exited]) -> None:
    error = _startup_failure(failed_starts["no_MODEL_NAME"])
    assert error == "missing required environment variable(s): MODEL_NAME"


def test_all_missing_variables_are_named_at_once(failed_starts: dict[str, Exited]) -> None:
    """An empty value counts as missing (MODEL_VERSION is set to "" here)."""
    error = _startup_failure(failed_starts["no_line_version_uri"])
    assert error == "missing required environment variable(s): MODEL_LINE, MODEL_VERSION, MLFLOW_TRACKING_URI"


def test_missing_sqlite_store_exits_instead_of_creating_an_empty_one(
    failed_starts: dict[str, Exited],
) -> None:
    error = _startup_failure(failed_starts["missing_sqlite_file"])
    assert "/nonexistent/dir/mlflow.db" in error and "does not exist" in error
