"""The BigQuery extract operator, through the Google provider and google-cloud-bigquery, against the v2 stand-in.

The line is the production example (``include/examples/production/demand_forecast.yaml``) with a short
poll interval; its SQL reads ``acme-sales-prod.sales.daily_demand`` (generated sample data, in the EU)
and writes one snapshot table per window into ``acme-mlops-prod.mlops_snapshots``. Credentials are a
service-account key whose token endpoint is the stand-in, which refuses requests without a token.

Each deferring ``execute`` runs as Airflow runs it: ``TaskDeferred``, the trigger rebuilt from its
serialised form and run to its first event, then ``execute_complete`` on a fresh operator. Jobs stay
RUNNING until the test finishes them, so what a retry sees is decided by the test, not by timing.

What a user relies on: the query is the line's SQL for the run's window, in BigQuery dialect, with labels
BigQuery accepts; the wait is deferred; training gets a ``bq://`` table with rows in it; a retry never runs
the query twice (while running, after success, after a lost answer) but does run again after a failure;
an empty window fails, naming the table and window; a killed task cancels its job; and parsing the DAG
does not import the Google libraries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import TaskDeferred

from mlops_lifecycle.config import ModelLineConfig, load_model_line
from mlops_lifecycle.exceptions import SnapshotError
from mlops_lifecycle.operators.extract_bigquery import BigQueryExtractOperator, job_id_for, label, snapshot_table
from mlops_lifecycle.sql import render_sql
from standins.base import Fault
from standins.bigquery import BigQueryStandIn
from trigger_events import deferral as defers
from trigger_events import event_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "production" / "demand_forecast.yaml"
PROJECT = "acme-mlops-prod"
SOURCE = "acme-sales-prod.sales.daily_demand"
SNAPSHOTS = f"{PROJECT}.mlops_snapshots"
DAG_ID = "demand_forecast__lifecycle"
RUN_ID = "scheduled__2026-01-12T03:00:00+00:00"
MANUAL_RUN_ID = "manual__2026-11-29T21:33:12.759156+00:00"
INTERVAL = (datetime(2026, 1, 5, 3, tzinfo=UTC), datetime(2026, 1, 12, 3, tzinfo=UTC))
NEXT = (datetime(2026, 1, 12, 3, tzinfo=UTC), datetime(2026, 1, 19, 3, tzinfo=UTC))
TABLE = f"{SNAPSHOTS}.demand_forecast__20260105T0300_20260112T0300"
BASE_JOB_ID = job_id_for("demand_forecast/20260105T0300-20260112T0300", RUN_ID)
MARKETS = 12  # generate_daily_demand's default
LOOKBACK_DAYS = 730  # the production example's training_lookback_days
INSERTS = rf".*/projects/{PROJECT}/jobs"  # jobs.insert (cancel is .../jobs/<id>/cancel)
JOB_ID_CHARS = re.compile(r"[A-Za-z0-9_-]{1,1024}")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demand() -> Any:
    """Sample data covering the test window's history (train start minus 60 days) and a little after."""
    from mlops_lifecycle.adapters.sample_data import generate_daily_demand

    return generate_daily_demand(date(2023, 10, 1), date(2026, 3, 31))


@pytest.fixture
def config(tmp_path: Path) -> ModelLineConfig:
    """The production example, polling every 50 ms, loaded from ``<tmp>/demand_forecast.yaml``."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["extract"]["poll_interval_seconds"] = 0.05
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_model_line(path)


@pytest.fixture
def bare_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BigQueryStandIn:
    """The EU datasets exist, the source table does not; jobs stay RUNNING until a test finishes them."""
    server = BigQueryStandIn(project=PROJECT, job_seconds=60, require_auth=True).start()
    key = server.service_account_file(tmp_path / "gcp-key.json")
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.emulator_host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", server.airflow_connection_json(key_path=key))
    server.create_dataset("sales", location="EU", project="acme-sales-prod")
    server.create_dataset("mlops_snapshots", location="EU")
    yield server
    server.stop()


@pytest.fixture
def standin(bare_standin: BigQueryStandIn, demand: Any) -> BigQueryStandIn:
    bare_standin.load_table(SOURCE, demand)
    return bare_standin


def context(
    run_id: str = RUN_ID,
    interval: tuple[datetime, datetime] | None = INTERVAL,
    run_after: datetime | None = None,
) -> dict[str, Any]:
    """What the operator reads from the Airflow context: ti ids, the data interval, the dag run."""
    return {
        "ti": SimpleNamespace(dag_id=DAG_ID, run_id=run_id, task_id="extract"),
        "data_interval_start": interval[0] if interval else None,
        "data_interval_end": interval[1] if interval else None,
        "dag_run": SimpleNamespace(run_id=run_id, run_after=run_after or (interval[1] if interval else None)),
    }


def operator(config: ModelLineConfig) -> BigQueryExtractOperator:
    """A new instance per try, as Airflow makes it."""
    return BigQueryExtractOperator(task_id="extract", config=config)


def deferral(config: ModelLineConfig, ctx: dict[str, Any]) -> TaskDeferred:
    """``execute`` must defer to ``execute_complete``."""
    return defers(lambda: operator(config).execute(ctx))


def finish(standin: BigQueryStandIn, deferred: TaskDeferred, ctx: dict[str, Any], config: ModelLineConfig) -> Any:
    """Let the job run now, then resume the task as the triggerer would."""
    standin.finish_job(deferred.trigger.job_id)
    event = event_of(deferred)
    return operator(config).execute_complete(ctx, event, **deferred.kwargs)


def run_to_result(standin: BigQueryStandIn, config: ModelLineConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """One try of the task: execute, and if it defers, finish the job and complete."""
    try:
        return operator(config).execute(ctx)
    except TaskDeferred as deferred:
        return finish(standin, deferred, ctx, config)


# -- names: job id, labels, table -------------------------------------------------------------------
@pytest.mark.parametrize(
    "run_id",
    [
        RUN_ID,
        MANUAL_RUN_ID,
        "backfill__2026-01-12T03:00:00+00:00",
        "asset_triggered__2026-01-12T03:00:00.123456+00:00_Ab1cD2eF",
        "Ünïcode run / with spaces & symbols " * 4,
    ],
)
def test_job_id_is_deterministic_and_uses_allowed_characters_only(run_id: str) -> None:
    key = "demand_forecast/20260105T0300-20260112T0300"

    job_id = job_id_for(key, run_id)

    assert job_id == job_id_for(key, run_id), "a retry of the same run computes the same id"
    assert JOB_ID_CHARS.fullmatch(job_id), job_id
    assert job_id.startswith("mlops_demand_forecast_20260105T0300-20260112T0300_"), "readable run key first"
    assert job_id != job_id_for(key.replace("0105", "0106"), run_id), "another window, another job"
    assert job_id != job_id_for(key, run_id + "x"), "another Airflow run, another job"


@pytest.mark.parametrize(
    "value",
    [DAG_ID, MANUAL_RUN_ID, "Demand.Forecast/Ünïcode ÄÖ", "x" * 200, "20260105t0300-20260112t0300"],
)
def test_label_values_are_valid_bigquery_label_values(value: str) -> None:
    assert LABEL_VALUE.fullmatch(label(value)), label(value)
    assert label(value) == label(label(value)), "already valid values pass unchanged"


def test_snapshot_table_is_named_by_line_and_window(config: ModelLineConfig) -> None:
    window = operator(config).window(context())
    assert snapshot_table(config.extract, window) == TABLE


# -- the job -----------------------------------------------------------------------------------------
def test_query_job_is_the_lines_sql_for_the_window_with_valid_labels(config, standin) -> None:
    """A manual run without a data interval (Airflow 3) still gets a real window, and BigQuery-valid labels."""
    triggered = datetime(2026, 11, 29, 21, 33, 12, 759156, tzinfo=UTC)
    ctx = context(run_id=MANUAL_RUN_ID, interval=None, run_after=triggered)
    window = operator(config).window(ctx)
    assert (window.interval_start, window.interval_end) == (
        datetime(2026, 11, 16, 3, tzinfo=UTC),
        datetime(2026, 11, 23, 3, tzinfo=UTC),
    ), "the last complete Monday-to-Monday period before the trigger"

    deferred = deferral(config, ctx)

    (job,) = standin.jobs.values()
    assert job.job_id == deferred.trigger.job_id == job_id_for(window.run_key, MANUAL_RUN_ID)
    assert JOB_ID_CHARS.fullmatch(job.job_id)
    assert job.location == "EU"
    [insert] = standin.requests_matching("POST", INSERTS)
    assert insert.json()["jobReference"] == {"jobId": job.job_id, "projectId": PROJECT, "location": "EU"}
    query = job.configuration["query"]
    expected_sql = render_sql(
        (REPO / "include" / "sql" / "demand_forecast_features.sql").read_text(),
        {"daily_demand": SOURCE},
        date(2024, 11, 23),  # 730 days before the window end
        date(2026, 11, 23),
    )
    assert query["query"] == expected_sql
    sql = query["query"]
    assert f"FROM {SOURCE}" in sql
    assert "DATE '2024-11-23'" in sql and "DATE '2026-11-23'" in sql
    assert "{{" not in sql and "{%" not in sql
    for bigquery_only in ("DATE_DIFF(date, DATE '1970-01-01', DAY)", "FLOAT64", "SAFE_DIVIDE(", "INT64"):
        assert bigquery_only in sql, f"the BigQuery dialect is sent untouched (no transpiling): {bigquery_only}"
    assert query["useLegacySql"] is False
    assert query["writeDisposition"] == "WRITE_EMPTY", "a snapshot is never rewritten"
    assert query["destinationTable"] == {
        "projectId": PROJECT,
        "datasetId": "mlops_snapshots",
        "tableId": "demand_forecast__20261116T0300_20261123T0300",
    }
    assert job.labels == {
        "model-line": "demand_forecast",
        "window": "20261116t0300-20261123t0300",
        "airflow-dag": "demand_forecast__lifecycle",
        "airflow-run": "manual__2026-11-29t21-33-12-759156-00-00",
    }
    for key, value in job.labels.items():
        assert LABEL_KEY.fullmatch(key) and LABEL_VALUE.fullmatch(value), (key, value)
    # the trigger the triggerer gets: our project, location, connection and poll interval; kill cancels
    classpath, kwargs = deferred.trigger.serialize()
    assert classpath == "airflow.providers.google.cloud.triggers.bigquery.BigQueryInsertJobTrigger"
    assert kwargs["project_id"] == PROJECT and kwargs["location"] == "EU"
    assert kwargs["conn_id"] == "google_cloud_default" and kwargs["poll_interval"] == 0.05
    assert kwargs["cancel_on_kill"] is True
    assert standin.query_executions == 0, "nothing ran yet: the worker slot was given back while RUNNING"


def test_defers_while_running_and_returns_the_snapshot_table(config, standin) -> None:
    ctx = context()
    deferred = deferral(config, ctx)
    job_id = deferred.trigger.job_id
    assert job_id == BASE_JOB_ID
    assert standin.job(job_id).state == "RUNNING" and standin.query_executions == 0
    assert deferred.kwargs == {"reused": False, "job_id": deferred.trigger.job_id}

    threading.Timer(0.3, standin.finish_job, args=(job_id,)).start()  # the trigger sees RUNNING first
    event = event_of(deferred)
    assert event == {"job_id": job_id, "status": "success", "message": "Job completed"}
    result = operator(config).execute_complete(ctx, event, **deferred.kwargs)

    window = operator(config).window(ctx)
    assert result == {
        "uri": f"bq://{TABLE}",
        "table": TABLE,
        "rows": MARKETS * LOOKBACK_DAYS,
        "job_id": job_id,
        "reused": False,
        **window.as_dict(),
    }
    assert result["run_key"] == "demand_forecast/20260105T0300-20260112T0300"
    assert (result["train_start"], result["window_end"]) == ("2024-01-13", "2026-01-12")
    json.dumps(result)  # XCom carries ids and URIs only, as JSON
    # the table holds the SQL's rows: one per market and day of the training window, with features
    frame = standin.table_frame(TABLE)
    assert len(frame) == MARKETS * LOOKBACK_DAYS
    days = sorted({str(d)[:10] for d in frame["date"]})
    assert (days[0], days[-1], len(days)) == ("2024-01-13", "2026-01-11", LOOKBACK_DAYS), "[train start, window end)"
    assert frame["market_id"].nunique() == MARKETS and not frame.duplicated(["market_id", "date"]).any()
    assert {"units_sold", "lag_7", "lag_28", "rolling_mean_28", "price_ratio_28", "day_of_week"} <= set(frame)
    assert frame["lag_7"].notna().all(), "history before the window was read, so lags are complete"
    assert standin.query_executions == 1
    polls = standin.requests_matching("GET", rf".*/projects/{PROJECT}/jobs/{job_id}")
    assert len(polls) >= 3 and all(p.arg("location") == "EU" for p in polls)


# -- retries: the query never runs twice ------------------------------------------------------------
def test_retry_while_the_job_runs_reattaches(config, standin) -> None:
    ctx = context()
    first = deferral(config, ctx)

    second = deferral(config, ctx)  # the worker died; Airflow retries while the job still runs

    assert second.trigger.job_id == first.trigger.job_id == BASE_JOB_ID
    assert standin.count("POST", INSERTS) == 1, "no second insert"
    result = finish(standin, second, ctx, config)
    assert (result["job_id"], result["rows"], result["reused"]) == (BASE_JOB_ID, MARKETS * LOOKBACK_DAYS, False)
    assert standin.query_executions == 1 and len(standin.jobs) == 1


def test_retry_after_success_reuses_the_snapshot_at_once(config, standin) -> None:
    ctx = context()
    first = run_to_result(standin, config, ctx)
    requests_before = len(standin.log)

    again = operator(config).execute(ctx)  # no TaskDeferred: nothing to wait for

    assert again == {**first, "reused": True}
    assert standin.count("POST", INSERTS) == 1 and standin.query_executions == 1
    assert all(r.method == "GET" or r.path == "/token" for r in standin.log[requests_before:]), "reads only"


def test_lost_answer_to_the_insert_still_makes_one_job(config, standin) -> None:
    """The job is created but the answer is lost: the client re-sends, gets 409, the operator looks it up."""
    standin.inject("POST", INSERTS, Fault.drop_after())
    ctx = context()

    deferred = deferral(config, ctx)

    assert deferred.trigger.job_id == BASE_JOB_ID
    assert standin.count("POST", INSERTS) == 2, "the insert was sent again after the dropped answer"
    assert len(standin.jobs) == 1
    result = finish(standin, deferred, ctx, config)
    assert result["rows"] == MARKETS * LOOKBACK_DAYS
    assert standin.query_executions == 1 and len(standin.jobs) == 1


def test_retry_after_a_failed_job_submits_the_next_attempt(config, bare_standin, demand) -> None:
    standin = bare_standin  # the source table is not there yet: the job fails
    ctx = context()
    first = deferral(config, ctx)
    standin.finish_job(BASE_JOB_ID)
    event = event_of(first)
    assert event["status"] == "error"
    with pytest.raises(SnapshotError, match="Not found: Table acme-sales-prod:sales.daily_demand"):
        operator(config).execute_complete(ctx, event, **first.kwargs)

    standin.load_table(SOURCE, demand)  # fixed; Airflow retries
    second = deferral(config, ctx)

    assert second.trigger.job_id == f"{BASE_JOB_ID}_attempt2"
    third = deferral(config, ctx)  # and a retry while that attempt runs reattaches to it
    assert third.trigger.job_id == f"{BASE_JOB_ID}_attempt2" and standin.count("POST", INSERTS) == 2
    result = finish(standin, third, ctx, config)
    assert (result["job_id"], result["reused"], result["rows"]) == (
        f"{BASE_JOB_ID}_attempt2",
        False,
        MARKETS * LOOKBACK_DAYS,
    )
    assert standin.job(BASE_JOB_ID).error_result["reason"] == "notFound", "the failed job is kept, not reused"
    # one more retry (say a later task failed and this one was cleared): the successful attempt is reused
    again = operator(config).execute(ctx)
    assert (again["job_id"], again["reused"]) == (f"{BASE_JOB_ID}_attempt2", True)
    assert standin.count("POST", INSERTS) == 2 and len(standin.jobs) == 2
    assert standin.query_executions == 1


def test_a_failed_job_is_named_in_the_error(config, bare_standin) -> None:
    ctx = context()
    deferred = deferral(config, ctx)
    bare_standin.finish_job(BASE_JOB_ID)
    event = event_of(deferred)

    with pytest.raises(SnapshotError) as failed:
        operator(config).execute_complete(ctx, event, **deferred.kwargs)

    assert BASE_JOB_ID in str(failed.value), str(failed.value)


def test_another_airflow_run_of_the_same_window_reuses_its_snapshot_never_rewrites_it(
    config, standin, tmp_path
) -> None:
    """A model may have been trained on the window's snapshot (and a re-run reuses that model): a second
    Airflow run of the window (a manual re-run beside the scheduled one) reuses the snapshot even after
    the source data changed, so the audit never names data the model did not see."""
    from mlops_lifecycle.adapters.sample_data import generate_daily_demand

    scheduled = run_to_result(standin, config, context())
    before = standin.table_rows(TABLE)
    changed = tmp_path / "restated.parquet"  # the source is restated: every day's sales change
    restated = generate_daily_demand(date(2023, 10, 1), date(2026, 3, 31))
    restated["units_sold"] = restated["units_sold"] + 1
    restated.to_parquet(changed, index=False)
    standin.load_table(SOURCE, changed)

    manual = operator(config).execute(context(run_id=MANUAL_RUN_ID))  # no deferral: nothing to wait for

    assert manual["table"] == scheduled["table"] == TABLE and manual["reused"] is True
    assert manual["job_id"] == scheduled["job_id"], "the job that wrote the snapshot, named in the audit"
    assert standin.query_executions == 1 and len(standin.jobs) == 1
    assert standin.table_rows(TABLE) == before, "the snapshot a model was trained on was rewritten"


def test_two_runs_racing_for_one_window_leave_one_snapshot(config, standin) -> None:
    """Both submit before either finishes: the second job finds the table written (WRITE_EMPTY) and its run
    reuses the first one's snapshot instead of failing or overwriting it."""
    first, second = deferral(config, context()), deferral(config, context(run_id=MANUAL_RUN_ID))
    standin.finish_job(first.trigger.job_id)
    scheduled = operator(config).execute_complete(context(), event_of(first), **first.kwargs)
    standin.finish_job(second.trigger.job_id)
    manual = operator(config).execute_complete(context(run_id=MANUAL_RUN_ID), event_of(second), **second.kwargs)

    assert standin.job(second.trigger.job_id).error_result["reason"] == "duplicate"
    assert manual["reused"] is True and manual["job_id"] == scheduled["job_id"] == first.trigger.job_id
    assert len(standin.table_rows(TABLE)) == MARKETS * LOOKBACK_DAYS


# -- empty windows, kill ------------------------------------------------------------------------------
FUTURE = (datetime(2030, 1, 7, 3, tzinfo=UTC), datetime(2030, 1, 14, 3, tzinfo=UTC))
FUTURE_TABLE = f"{SNAPSHOTS}.demand_forecast__20300107T0300_20300114T0300"


def test_a_window_without_data_fails_naming_the_table_and_window(config, standin) -> None:
    ctx = context(run_id="scheduled__2030-01-14T03:00:00+00:00", interval=FUTURE)

    with pytest.raises(SnapshotError) as empty:
        run_to_result(standin, config, ctx)

    message = str(empty.value)
    assert FUTURE_TABLE in message, message
    assert "2028-01-15..2030-01-14" in message and "no rows" in message, message


def test_retry_after_an_empty_snapshot_queries_again(config, standin, tmp_path) -> None:
    from mlops_lifecycle.adapters.sample_data import generate_daily_demand

    ctx = context(run_id="scheduled__2030-01-14T03:00:00+00:00", interval=FUTURE)
    with pytest.raises(SnapshotError):
        run_to_result(standin, config, ctx)

    late = tmp_path / "late.parquet"  # a parquet file: the stand-in cannot register a DataFrame after a query
    generate_daily_demand(date(2027, 11, 1), date(2030, 1, 31)).to_parquet(late, index=False)
    standin.load_table(SOURCE, late)  # the window's data landed
    result = run_to_result(standin, config, ctx)  # Airflow retries (SnapshotError is retryable)

    assert result["rows"] == MARKETS * LOOKBACK_DAYS and result["reused"] is False
    assert standin.query_executions == 2


def test_on_kill_cancels_the_submitted_job(config, standin) -> None:
    operator(config).on_kill()  # killed before anything was submitted: nothing to cancel, no call
    assert standin.log == []

    op = operator(config)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context())
    op.on_kill()

    job = standin.job(deferred.value.trigger.job_id)
    assert (job.state, job.error_result["reason"]) == ("DONE", "stopped")
    assert standin.count("POST", rf".*/projects/{PROJECT}/jobs/{job.job_id}/cancel") == 1
    assert standin.query_executions == 0 and not standin.table_exists(TABLE)


# -- parse time ------------------------------------------------------------------------------------
PARSE = """
import sys
at_startup = set(sys.modules)  # an -nspkg.pth in site-packages makes google.cloud an empty namespace here
import json
from pathlib import Path
from mlops_lifecycle.config import load_model_line
from mlops_lifecycle.dag_factory import build_lifecycle_dag
from mlops_lifecycle.operators.extract_bigquery import BigQueryExtractOperator

config = load_model_line(Path(sys.argv[1]))
BigQueryExtractOperator(task_id="standalone_extract", config=config)
dag = build_lifecycle_dag(config)
print(json.dumps({
    "extract": type(dag.get_task("extract")).__name__,
    "imported": sorted(set(sys.modules) - at_startup),
    "google.cloud": getattr(sys.modules.get("google.cloud"), "__file__", "absent"),
}))
"""
# Airflow's ProvidersManager imports every installed provider's package and metadata entry point while it
# reads the configuration (databricks, smtp, ... as well): version checks, no hook, operator or client.
PROVIDER_DISCOVERY = {"airflow.providers.google", "airflow.providers.google.get_provider_info"}


def test_building_the_dag_imports_neither_google_cloud_nor_the_google_provider(config, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(tmp_path / "demand_forecast.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])

    assert parsed["extract"] == "BigQueryExtractOperator", "the DAG was built with the BigQuery extract"
    assert "mlops_lifecycle.operators.extract_bigquery" in parsed["imported"]
    google = [m for m in parsed["imported"] if m == "google.cloud" or m.startswith(("google.cloud.", "google.api"))]
    assert google == [], f"google-cloud libraries imported while parsing: {google[:20]}"
    assert parsed["google.cloud"] in (None, "absent"), "google.cloud is at most the empty namespace package"
    provider = {m for m in parsed["imported"] if m.startswith("airflow.providers.google")}
    assert provider <= PROVIDER_DISCOVERY, f"Google provider modules imported while parsing: {sorted(provider)}"


def test_window_dates_in_the_sql_follow_the_interval(config) -> None:
    """Plain check of the rendering the job uses: the window end is the interval end's date, exclusive."""
    window = operator(config).window(context())
    assert window.window_end - window.train_start == timedelta(days=LOOKBACK_DAYS)
    sql = render_sql(config.sql_path.read_text(), dict(config.extract.tables), window.train_start, window.window_end)
    assert "DATE '2024-01-13'" in sql and "DATE '2026-01-12'" in sql


# -- retention ---------------------------------------------------------------------------------------
def test_a_snapshot_expires_unless_an_audit_record_names_it(config, standin, mlflow_server, monkeypatch) -> None:
    """Snapshot tables expire retention.snapshot_days after they are written; housekeeping takes the
    expiration off the ones a kept version's audit record names, and leaves the others to expire."""
    import uuid

    from mlflow.tracking import MlflowClient

    from mlops_lifecycle.operators.housekeeping import HousekeepingOperator

    named = run_to_result(standin, config, context())
    other = run_to_result(standin, config, context(run_id="scheduled__2026-01-19T03:00:00+00:00", interval=NEXT))
    client = operator(config).client()
    expires = client.get_table(named["table"]).expires
    days = (expires - datetime.now(UTC)).total_seconds() / 86400
    assert config.retention.snapshot_days - 1 < days <= config.retention.snapshot_days

    name = f"bq_retention_{uuid.uuid4().hex[:8]}"
    line = config.model_copy(update={"registry": config.registry.model_copy(update={"model_name": name})})
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "extra": {"tracking_uri": mlflow_server.url}})
    )
    mlflow = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = mlflow.create_experiment(f"/tests/{name}")
    run = mlflow.create_run(experiment)
    mlflow.create_registered_model(name)
    version = mlflow.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    mlflow.set_model_version_tag(name, version, "audit.snapshot", named["uri"])
    mlflow.set_model_version_tag(name, version, "audit.event.0001", json.dumps({"event": "staged"}))

    summary = HousekeepingOperator(task_id="housekeeping", config=line).execute(context())

    assert summary["bigquery_snapshots_kept"] == [named["uri"]]
    assert client.get_table(named["table"]).expires is None, "a snapshot the audit names must never expire"
    assert client.get_table(other["table"]).expires is not None, "the rest expire as set"
