"""Test session: an isolated Airflow home and local state, a real MLflow server, a migrated metadata DB.

Airflow reads its configuration when it is first imported, so the environment is set here, at
conftest import, before any test module imports Airflow.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

if "airflow" in sys.modules:  # e.g. a warning filter in pyproject.toml naming an Airflow class
    raise RuntimeError("Airflow was imported before tests/conftest.py could point it at the test environment")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import devstack  # noqa: E402

SESSION_HOME = Path(tempfile.mkdtemp(prefix="mlops-tests-"))
MODEL_LINES = SESSION_HOME / "model_lines"
MODEL_LINES.mkdir()
_MLFLOW = devstack.MlflowServer(SESSION_HOME / "mlflow", devstack.free_port())
_PG_DATABASE = f"mlops_test_{os.getpid()}"


def _metadata_database() -> str | None:
    """PostgreSQL, as production uses, when one is reachable (or MLOPS_TEST_DATABASE_URL); else SQLite."""
    if os.environ.get("MLOPS_TEST_DATABASE_URL"):
        return os.environ["MLOPS_TEST_DATABASE_URL"]
    return devstack.postgres_database(_PG_DATABASE)


METADATA_DB = _metadata_database()
os.environ.update(devstack.stack_env(SESSION_HOME, _MLFLOW.url, database_url=METADATA_DB))
os.environ["MLOPS_MODEL_LINES_DIR"] = str(MODEL_LINES)
# a reviewer account for human-in-the-loop answers through the REST API
REVIEWER, REVIEWER_PASSWORD = "reviewer", "reviewer-test-password"
(SESSION_HOME / "passwords.json").write_text(f'{{"{REVIEWER}": "{REVIEWER_PASSWORD}"}}')
os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = f"{REVIEWER}:admin"
os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(SESSION_HOME / "passwords.json")


@pytest.fixture(scope="session")
def mlflow_server() -> devstack.MlflowServer:
    """A real ``mlflow server`` (SQLite backend, served artifacts) for the whole session."""
    _MLFLOW.start()
    yield _MLFLOW
    _MLFLOW.stop()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's Airflow metadata DB, migrated once."""
    devstack.migrate_airflow_db(dict(os.environ))
    return Path(os.environ["AIRFLOW_HOME"])


@pytest.fixture(scope="session")
def stack(mlflow_server, airflow_db) -> Path:  # noqa: ANN001
    """Everything an end-to-end lifecycle run needs; returns the local home."""
    yield SESSION_HOME
    from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

    deployer = LocalServiceDeployer(SESSION_HOME)
    for state in (SESSION_HOME / "services").glob("*.json"):
        deployer.stop(state.stem)


KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ANN201
    """Mark each test with its kind, from the folder it lives in (``pytest -m "not e2e"`` is the fast loop)."""
    for item in items:
        kind = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/e2e")
        item.add_marker(kind)


def pytest_report_header(config):  # noqa: ANN001, ANN201
    return f"Airflow metadata DB: {os.environ['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"


def pytest_sessionfinish(session, exitstatus):  # noqa: ANN001
    _MLFLOW.stop()
    if METADATA_DB and METADATA_DB.endswith(_PG_DATABASE):
        try:
            from airflow import settings

            settings.dispose_orm()
            devstack.postgres_admin(f"DROP DATABASE IF EXISTS {_PG_DATABASE} WITH (FORCE)")
        except Exception as exc:
            print(f"could not drop test database {_PG_DATABASE}: {exc}")
    if exitstatus == 0:
        shutil.rmtree(SESSION_HOME, ignore_errors=True)
    else:
        print(f"\nTest state kept for inspection: {SESSION_HOME}")
