"""The drift monitor on BigQuery (the production adapter), through the Google provider and
google-cloud-bigquery against the v2 stand-in, and a real MLflow server holding the served versions'
reference samples.

The shipped prediction-log table is what the log shipper fills (include/deployment/README.md): one row
per served row. The monitor snapshots an interval of it into extract's dataset with a deterministic query
job (a retry reuses the table and queries nothing again) and checks each version against its reference.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from mlops_lifecycle.config import ModelLineConfig, load_model_line
from mlops_lifecycle.monitoring import served_sql
from mlops_lifecycle.operators.monitor import DriftCheckOperator, ServedSnapshotOperator
from standins.bigquery import BigQueryStandIn

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "production" / "demand_forecast.yaml"
PROJECT = "acme-mlops-prod"
SHIPPED = f"{PROJECT}.mlops_monitoring.prediction_log"
START, END = datetime(2026, 11, 30, 5, tzinfo=UTC), datetime(2026, 12, 1, 5, tzinfo=UTC)
NUMERIC = ["price", "price_ratio_28", "lag_7", "rolling_mean_28"]


@pytest.fixture
def config(tmp_path: Path, mlflow_server: Any) -> ModelLineConfig:  # noqa: ANN401
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model_line"] = "bq_monitor"
    raw["registry"] = {"model_name": "bq_monitor", "experiment": "/it/bq_monitor"}
    raw["monitoring"].pop("ground_truth")
    raw["monitoring"]["exclude"] = []
    raw["monitoring"]["limits"] = {"min_rows": 100}
    path = tmp_path / "bq_monitor.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_model_line(path)


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BigQueryStandIn:
    server = BigQueryStandIn(project=PROJECT, job_seconds=0.2, require_auth=True).start()
    key = server.service_account_file(tmp_path / "gcp-key.json")
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.emulator_host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", server.airflow_connection_json(key_path=key))
    server.create_dataset("mlops_snapshots", location="EU")
    server.create_dataset("mlops_monitoring", location="EU")
    yield server
    server.stop()


def rows(n: int, seed: int, price_factor: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "market_id": rng.choice([f"m{i:02d}" for i in range(12)], n),
            "price": rng.normal(9.0, 1.5, n) * price_factor,
            "price_ratio_28": rng.normal(1.0, 0.05, n),
            "lag_7": rng.gamma(5.0, 20.0, n),
            "rolling_mean_28": rng.gamma(5.0, 20.0, n),
        }
    )
    return frame


def register_version(config: ModelLineConfig, reference: pd.DataFrame) -> str:
    """A registered version whose training run logged a reference sample and profile, as training does."""
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    client = MlflowRegistryHook().client
    experiment = client.get_experiment_by_name(config.registry.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.registry.experiment)
    run = client.create_run(experiment_id)
    sample = reference.assign(prediction=reference["lag_7"] * 0.9)
    kinds = {"market_id": "categorical", **{c: "numeric" for c in NUMERIC}, "prediction": "numeric"}
    with tempfile.TemporaryDirectory() as folder:
        sample.to_parquet(Path(folder) / "reference_sample.parquet")
        (Path(folder) / "reference_profile.json").write_text(json.dumps({"schema_version": 2, "kinds": kinds}))
        client.log_artifacts(run.info.run_id, folder)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{config.registry.model_name}'"):
        client.create_registered_model(config.registry.model_name)
    source = f"runs:/{run.info.run_id}/reference_sample.parquet"
    return str(client.create_model_version(config.registry.model_name, source, run.info.run_id).version)


def shipped(frame: pd.DataFrame, version: str, first: datetime) -> pd.DataFrame:
    """The shipper's rows: one per served row, the features as a JSON object."""
    features = frame.to_dict(orient="records")
    return pd.DataFrame(
        {
            "ts": [first + timedelta(seconds=i) for i in range(len(frame))],
            "request_id": [f"r{version}-{i // 10}" for i in range(len(frame))],
            "model_line": "bq_monitor",
            "model_version": version,
            "row_index": [i % 10 for i in range(len(frame))],
            "features": [json.dumps(f) for f in features],
            "prediction": frame["lag_7"] * 0.9,
        }
    )


def context() -> dict[str, Any]:
    return {
        "ti": SimpleNamespace(dag_id="bq_monitor__monitor", run_id="scheduled__2026-12-01T05:00:00+00:00"),
        "data_interval_start": START,
        "data_interval_end": END,
        "dag_run": SimpleNamespace(run_id="scheduled__2026-12-01T05:00:00+00:00", run_after=END, conf={}),
    }


def test_served_sql_reads_each_feature_as_its_kind_from_the_shipped_json():
    sql = served_sql(SHIPPED, "line", START, END, {"market_id": "categorical", "price": "numeric"})
    assert "JSON_VALUE(features, '$.market_id') AS market_id" in sql
    assert "SAFE_CAST(JSON_VALUE(features, '$.price') AS FLOAT64) AS price" in sql
    assert "ts >= TIMESTAMP '2026-11-30 05:00:00+00'" in sql and "ts < TIMESTAMP '2026-12-01 05:00:00+00'" in sql
    with pytest.raises(ValueError, match="cannot be read"):
        served_sql(SHIPPED, "line", START, END, {"price'; DROP TABLE x; --": "numeric"})


def test_monitor_snapshots_the_shipped_table_once_and_splits_versions(config, standin):
    reference = rows(5000, seed=0)
    v1, v2 = register_version(config, reference), register_version(config, reference)
    table = pd.concat(
        [
            shipped(rows(400, seed=1), v1, START + timedelta(hours=1)),
            shipped(rows(400, seed=2, price_factor=1.8), v2, START + timedelta(hours=12)),
            shipped(rows(50, seed=3), v1, END + timedelta(minutes=1)),  # the next interval: not read
            shipped(rows(50, seed=4), v1, START - timedelta(minutes=1)).assign(model_line="other_line"),
        ]
    )
    standin.load_table(SHIPPED, table)

    snap = ServedSnapshotOperator(task_id="snapshot_served", config=config).execute(context())
    served = snap["served"]
    assert served["versions"] == {v1: 400, v2: 400} and served["rows"] == 800 and not served["reused"]
    assert served["uri"] == f"bq://{PROJECT}.mlops_snapshots.bq_monitor__served__20261130T050000-20261201T050000"
    executed = standin.query_executions
    again = ServedSnapshotOperator(task_id="snapshot_served", config=config).execute(context())
    assert again["served"]["reused"] and again["served"]["versions"] == served["versions"]
    assert standin.query_executions - executed <= 1  # only the count of versions, never the snapshot query

    found = DriftCheckOperator(task_id="check_drift", snapshot=snap, config=config).execute(context())
    assert found["versions"][v1]["verdict"] == "ok", found["versions"][v1]["breaches"]
    assert found["versions"][v2]["verdict"] == "breach"
    assert set(found["versions"][v2]["drifted"]) == {"price"}, found["versions"][v2]["breaches"]
