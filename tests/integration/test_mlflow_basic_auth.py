"""MLflow behind its basic-auth app, configured as docker-compose.yaml runs it (config/mlflow_basic_auth.ini).

Anyone without the password can neither register a version nor move an alias; the lifecycle's hook,
given the connection's login and password, can.
"""

from __future__ import annotations

import json

import pytest

import devstack
from mlops_lifecycle import paths

PASSWORD = "CANARY-mlflow-admin-3c9d"


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    home = tmp_path_factory.mktemp("mlflow_auth")
    ini = (paths.REPO_ROOT / "config" / "mlflow_basic_auth.ini").read_text()
    assert "database_uri = sqlite:////mlflow-auth/basic_auth.db" in ini  # the compose volume, here a temp file
    (home / "basic_auth.ini").write_text(ini.replace("/mlflow-auth/", f"{home}/"))
    auth = {
        "MLFLOW_AUTH_CONFIG_PATH": str(home / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    running = devstack.MlflowServer(home / "store", devstack.free_port(), auth=auth).start()
    yield running
    running.stop()


def test_without_the_password_nothing_can_be_written(server, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    anonymous = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        anonymous.create_registered_model("forged_model")


def test_the_hook_writes_with_the_connections_login_and_password(server, monkeypatch):
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    conn = {"conn_type": "http", "host": "127.0.0.1", "port": server.port, "login": "admin", "password": PASSWORD}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_AUTH_TEST", json.dumps(conn))
    hook = MlflowRegistryHook("mlflow_auth_test")
    for name, value in hook.process_env().items():
        monkeypatch.setenv(name, value)  # what the hook's client and child processes get
    experiment = hook.client.create_experiment("/auth/line")
    run = hook.client.create_run(experiment)
    hook.client.create_registered_model("auth_line")
    version = hook.client.create_model_version("auth_line", f"runs:/{run.info.run_id}/model", run.info.run_id)
    hook.client.set_registered_model_alias("auth_line", "production", version.version)
    assert hook.alias_version("auth_line", "production") == version.version
    assert PASSWORD not in hook.tracking_uri
