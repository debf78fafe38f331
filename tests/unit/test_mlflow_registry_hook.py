"""The MLflow connection: self-hosted server with a token, or MLflow in a Databricks workspace."""

from __future__ import annotations

import json

import pytest

from mlops_lifecycle.exceptions import LifecycleError
from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook


def hook(monkeypatch, **conn) -> MlflowRegistryHook:  # noqa: ANN001, ANN003
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_UNDER_TEST", json.dumps({"conn_type": "http", **conn}))
    return MlflowRegistryHook("mlflow_under_test")


def test_self_hosted_server_gets_its_token_as_mlflow_tracking_token(monkeypatch):
    h = hook(monkeypatch, host="mlflow.example.com", schema="https", port=443, password="s3cret")
    assert h.process_env() == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com:443",
        "MLFLOW_TRACKING_TOKEN": "s3cret",
    }
    assert h.run_url("1", "abc") == "https://mlflow.example.com:443/#/experiments/1/runs/abc"


def test_databricks_workspace_tracking_gets_host_and_token_and_workspace_links(monkeypatch):
    h = hook(
        monkeypatch, host="adb-123.4.azuredatabricks.net", password="dapi-xyz", extra={"tracking_uri": "databricks"}
    )
    assert h.process_env() == {
        "MLFLOW_TRACKING_URI": "databricks",
        "DATABRICKS_HOST": "https://adb-123.4.azuredatabricks.net",
        "DATABRICKS_TOKEN": "dapi-xyz",
    }
    assert h.run_url("7", "r1") == "https://adb-123.4.azuredatabricks.net/ml/experiments/7/runs/r1"
    assert h.model_version_url("demand forecast", "3") == (
        "https://adb-123.4.azuredatabricks.net/ml/models/demand%20forecast/versions/3"
    )


def test_databricks_tracking_without_workspace_credentials_is_refused(monkeypatch):
    h = hook(monkeypatch, extra={"tracking_uri": "databricks"})
    with pytest.raises(
        LifecycleError, match="needs host \\(the workspace URL\\) and password \\(a Databricks token\\)"
    ):
        h.process_env()


def test_credentials_in_the_tracking_uri_become_basic_auth_and_never_reach_a_link(monkeypatch):
    h = hook(
        monkeypatch,
        extra={
            "tracking_uri": "https://svc-mlops:CANARY-p4ss@mlflow.example.com/",
            "ui_url": "https://viewer:CANARY-ui@mlflow.example.com",
        },
    )
    assert h.process_env() == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com/",
        "MLFLOW_TRACKING_USERNAME": "svc-mlops",
        "MLFLOW_TRACKING_PASSWORD": "CANARY-p4ss",
    }
    assert h.tracking_uri == "https://mlflow.example.com/"
    shown = [h.run_url("1", "abc"), h.model_version_url("m", "2")]
    assert shown == [
        "https://mlflow.example.com/#/experiments/1/runs/abc",
        "https://mlflow.example.com/#/models/m/versions/2",
    ]


def test_without_a_ui_url_links_come_from_the_tracking_uri_without_its_credentials(monkeypatch):
    h = hook(monkeypatch, extra={"tracking_uri": "http://u:CANARY@127.0.0.1:5000"})
    assert h.run_url("1", "r") == "http://127.0.0.1:5000/#/experiments/1/runs/r"
    assert "CANARY" not in h.tracking_uri


def test_login_and_password_are_basic_auth_as_compose_runs_mlflow(monkeypatch):
    h = hook(monkeypatch, host="mlflow", port=5000, schema="http", login="admin", password="CANARY-admin-pw")
    assert h.process_env() == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": "CANARY-admin-pw",
    }
