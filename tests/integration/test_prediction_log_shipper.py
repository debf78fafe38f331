"""The prediction-log shipper: the real service's log files -> the shipped BigQuery table the drift monitor
reads, through google-cloud-bigquery against the v2 stand-in (tabledata.insertAll).

Nothing is lost (a line still being written waits for its end, a failed insert is sent again) and nothing
is counted twice (a crash between inserting and recording the offset re-sends rows the insert ids drop).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mlops_lifecycle.config import load_model_line
from standins.base import Fault
from standins.bigquery import BigQueryStandIn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "include" / "deployment"))

from model_service.prediction_log import PredictionLog  # noqa: E402
from model_service.shipper import STATE_FILE, Shipper, bigquery_insert  # noqa: E402

PROJECT = "acme-mlops-prod"
TABLE = f"{PROJECT}.mlops_monitoring.prediction_log"


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BigQueryStandIn:
    from google.cloud import bigquery

    server = BigQueryStandIn(project=PROJECT, job_seconds=0.2).start()
    key = server.service_account_file(tmp_path / "gcp-key.json")
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.emulator_host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", server.airflow_connection_json(key_path=key))
    server.create_dataset("mlops_monitoring", location="EU")
    server.create_dataset("mlops_snapshots", location="EU")
    schema = [  # the DDL of include/deployment/README.md
        bigquery.SchemaField("ts", "TIMESTAMP"),
        bigquery.SchemaField("request_id", "STRING"),
        bigquery.SchemaField("model_line", "STRING"),
        bigquery.SchemaField("model_version", "STRING"),
        bigquery.SchemaField("row_index", "INT64"),
        bigquery.SchemaField("features", "STRING"),
        bigquery.SchemaField("prediction", "FLOAT64"),
    ]
    bigquery.Client(project=PROJECT).create_table(bigquery.Table(TABLE, schema=schema))
    yield server
    server.stop()


def served(folder: Path, version: str, requests: int, rows: int = 3) -> None:
    """What the real service writes: requests of ``rows`` rows scored by ``version``."""
    log = PredictionLog(folder, model_line="demand_forecast", model_name="demand_forecast", model_version=version)
    for r in range(requests):
        body = json.dumps({"rows": [{"market_id": f"m{i:02d}", "price": 9.5 + i} for i in range(rows)]})
        log.record(f"v{version}-req{r}", body.encode(), [100.0 + i for i in range(rows)])
    log.close()


def table_rows(standin: BigQueryStandIn) -> list[dict]:
    return standin.table_rows(TABLE)


def test_every_served_row_arrives_once_with_its_features_and_prediction(tmp_path, standin):
    logs = tmp_path / "predictions"
    served(logs, "3", requests=4)
    time.sleep(1.1)  # another process's file name (one per second and pid)
    served(logs, "4", requests=2)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    bad = logs / "demand_forecast" / "v4" / day / "other-1.jsonl"
    good = '{"ts": "2026-12-01T10:00:00Z", "request_id": "late", "model_line": "demand_forecast", '
    good += '"model_version": "4", "rows": 1, "request": {"rows": [{"market_id": "m09", "price": 1.0}]}, '
    good += '"predictions": [7.0]}'
    bad.write_text('not json\n{"ts": "x", "request": {"rows": [1]}, "predictions": [1, 2]}\n' + good[:40])

    shipper = Shipper(logs, bigquery_insert(TABLE), done_after=3600)
    assert shipper.cycle() == 18  # 6 requests x 3 rows; the torn last line waits
    rows = table_rows(standin)
    assert len(rows) == 18
    assert {r["model_version"] for r in rows} == {"3", "4"}
    first = next(r for r in rows if r["request_id"] == "v3-req0" and r["row_index"] == 2)
    assert json.loads(first["features"]) == {"market_id": "m02", "price": 11.5} and first["prediction"] == 102.0
    assert shipper.bad_lines == {"not_json": 1, "length_mismatch": 1}

    # the torn line is finished by its writer: shipped in the next cycle, nothing else again
    bad.write_text(bad.read_text() + good[40:] + "\n")
    assert shipper.cycle() == 1 and len(table_rows(standin)) == 19

    # a crash after inserting but before recording the offsets: everything is sent again, nothing counted twice
    (logs / STATE_FILE).unlink()
    again = Shipper(logs, bigquery_insert(TABLE), done_after=3600)
    assert again.cycle() == 19
    assert len(table_rows(standin)) == 19


def test_a_failed_insert_is_sent_again_and_shipped_files_are_deleted_when_idle(tmp_path, standin):
    logs = tmp_path / "predictions"
    served(logs, "3", requests=2)
    shipper = Shipper(logs, bigquery_insert(TABLE), done_after=0)
    standin.inject("POST", r".*/insertAll", Fault.status_code(403), times=1)  # e.g. a missing permission
    with pytest.raises(Exception, match="403"):
        shipper.cycle()
    assert table_rows(standin) == [] and shipper.offsets == {}
    standin._faults.clear()
    assert shipper.cycle() == 6 and len(table_rows(standin)) == 6
    assert list(logs.rglob("*.jsonl")) == []  # shipped and idle: deleted, the service's budget is free again
    assert json.loads((logs / STATE_FILE).read_text()) == {}


def test_the_monitor_reads_what_the_shipper_wrote(tmp_path, standin):
    """log -> shipper -> table -> the monitor's served snapshot: the contract holds end to end."""
    from mlops_lifecycle.operators.monitor import ServedSnapshotOperator

    logs = tmp_path / "predictions"
    served(logs, "3", requests=5)
    Shipper(logs, bigquery_insert(TABLE), done_after=3600).cycle()
    raw = yaml.safe_load((REPO / "include" / "examples" / "production" / "demand_forecast.yaml").read_text())
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_model_line(path)
    time.sleep(1.1)  # a check ends at a whole second, and only in the past
    now = datetime.now(UTC)
    context = {
        "ti": SimpleNamespace(dag_id="demand_forecast__monitor", run_id="manual__shipper"),
        "data_interval_start": None,
        "data_interval_end": None,
        "dag_run": SimpleNamespace(
            run_after=now,
            conf={"since": (now - timedelta(hours=1)).isoformat(), "until": now.isoformat()},
        ),
    }
    snap = ServedSnapshotOperator(task_id="snapshot_served", config=config).execute(context)
    assert snap["served"]["versions"] == {"3": 15}
    snapshot = standin.table_rows(snap["served"]["uri"].removeprefix("bq://"))
    assert {r["market_id"] for r in snapshot} == {"m00", "m01", "m02"}
    assert sorted({r["price"] for r in snapshot}) == [9.5, 10.5, 11.5]
