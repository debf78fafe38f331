"""Functional tests of the service on the model package this pipeline built: the CI ``test`` job.

Run from the repository root, once per packaged model line::

    MODEL_DIR=build/<line> python -m pytest tests/ -q

The service runs in-process (FastAPI's TestClient, with its start-up: package checks, model load,
golden-set check) on the same requirement files as the image. MODEL_LINE, MODEL_NAME and
MODEL_VERSION default to the package's own (the CI job exports them from ``build/images/<line>.env``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MODEL_DIR = os.environ.get("MODEL_DIR", "").strip()
if not MODEL_DIR:
    pytest.skip(
        "MODEL_DIR is not set: these tests check a built model package, "
        "run them as MODEL_DIR=build/<line> python -m pytest tests/",
        allow_module_level=True,
    )

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model_service, wherever pytest runs from

from fastapi.testclient import TestClient  # noqa: E402
from model_service.app import app  # noqa: E402

TOLERANCE = {"rel": 1e-6, "abs": 1e-9}  # what the service's start-up check and the smoke test accept
BAD_VALUES = {"string": 12345, "double": "not a number", "float": "not a number", "integer": 1.5, "long": 1.5}


@pytest.fixture(scope="module")
def package() -> dict[str, Any]:
    """package.json of MODEL_DIR."""
    path = Path(MODEL_DIR) / "package.json"
    assert path.is_file(), f"MODEL_DIR={MODEL_DIR}: no package.json, not a model package"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads((Path(MODEL_DIR) / "golden_set.json").read_text())


@pytest.fixture(scope="module")
def client(package: dict[str, Any]) -> Iterator[TestClient]:
    """The app with its start-up done, configured like the image built from this package."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("model_line", "model_name", "model_version"):
            if not os.environ.get(name.upper(), "").strip():
                env.setenv(name.upper(), str(package[name]))
        with TestClient(app) as test_client:
            yield test_client


def test_ready(client: TestClient, package: dict[str, Any]) -> None:
    assert client.get("/health").status_code == 200
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "model_version": str(package["model_version"])}


def test_version_is_the_package(client: TestClient, package: dict[str, Any]) -> None:
    version = client.get("/version").json()
    for name in ("model_line", "model_name", "model_version", "run_id", "packaged_at"):
        assert str(version[name]) == str(package[name]), name


def test_golden_set_reproduces_the_offline_predictions(client: TestClient, golden: dict[str, Any]) -> None:
    response = client.post("/predict", json={"rows": golden["rows"]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == pytest.approx(golden["predictions"], **TOLERANCE)


def test_batch_of_100_rows(client: TestClient, golden: dict[str, Any]) -> None:
    count = len(golden["rows"])
    rows = [golden["rows"][i % count] for i in range(100)]
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 100
    assert predictions == pytest.approx([golden["predictions"][i % count] for i in range(100)], **TOLERANCE)


def _typed_field(client: TestClient) -> tuple[str, Any]:
    """A field of the model signature and a value of the wrong type for it."""
    validator = client.app.state.service.model.validator
    if not validator.enabled:
        pytest.skip("the model has no column signature: the service passes rows to the model unchecked")
    for name, dtype, _ in validator.columns:
        if dtype in BAD_VALUES:
            return name, BAD_VALUES[dtype]
    pytest.skip("the model signature has no string or numeric column")


@pytest.mark.parametrize("problem", ["wrong_type", "unknown_field"])
def test_bad_row_is_422_naming_row_and_field(client: TestClient, golden: dict[str, Any], problem: str) -> None:
    field, bad_value = _typed_field(client) if problem == "wrong_type" else ("not_a_model_feature", 1)
    rows = [dict(golden["rows"][0]), dict(golden["rows"][0])]
    rows[1][field] = bad_value
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [error["loc"] for error in errors] == [["body", "rows", 1, field]], errors
    assert field in errors[0]["msg"] and "row 1" in errors[0]["msg"]
