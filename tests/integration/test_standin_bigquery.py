"""The BigQuery stand-in, driven through google-cloud-bigquery and apache-airflow-providers-google.

Credentials are real: a service-account key whose ``token_uri`` is the stand-in, exchanged for a token
by google-auth (and gcloud-aio-auth), and the stand-in refuses requests without it (``require_auth``).
What the extract adapter relies on: a query job with a fixed id writes its snapshot table once, a
second insert of that id is a Conflict and runs nothing, failures say why, and the provider's
deferrable insert-job operator and trigger see the job through RUNNING to DONE.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from airflow.providers.common.compat.sdk import AirflowException, TaskDeferred
from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook
from airflow.providers.google.cloud.operators.bigquery import BigQueryInsertJobOperator
from airflow.providers.google.cloud.triggers.bigquery import BigQueryInsertJobTrigger
from airflow.sdk import DAG
from google.api_core.exceptions import BadRequest, Conflict, NotFound
from google.cloud import bigquery

from standins.base import Fault
from standins.bigquery import BigQueryStandIn
from trigger_events import TaskStateStore, provider_context

PROJECT = "test-project"
ORDERS = f"{PROJECT}.sales.orders"
SNAPSHOT = f"{PROJECT}.snapshots.demand_20240102"
WINDOW_SQL = """
SELECT id, DATE_TRUNC(day, MONTH) AS month, amount * 2 AS doubled, SAFE_DIVIDE(amount, qty) AS unit_price
FROM `test-project.sales.orders`
WHERE day >= '2024-01-02' AND day < '2024-01-04'
ORDER BY id
"""


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BigQueryStandIn:
    server = BigQueryStandIn(project=PROJECT, job_seconds=0.3, require_auth=True).start()
    key = server.service_account_file(tmp_path / "key.json")
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.emulator_host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", server.airflow_connection_json(key_path=key))
    server.load_table(
        ORDERS,
        pd.DataFrame(
            {
                "id": [1, 2, 3, 4],
                "day": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]).date,
                "amount": [10.0, 20.0, None, 40.0],
                "qty": [1, 4, 2, 0],
                "shop": ["a", "b", "b", None],
                "at": pd.to_datetime(
                    ["2024-01-01 10:00", "2024-01-02 11:30", "2024-01-03 00:00", "2024-01-04 23:59"]
                ).tz_localize("UTC"),
            }
        ),
    )
    server.create_dataset("snapshots", location="US")
    yield server
    server.stop()


@pytest.fixture
def client(standin: BigQueryStandIn) -> bigquery.Client:
    """A plain client: project and credentials from GOOGLE_APPLICATION_CREDENTIALS, endpoint from the emulator host."""
    return bigquery.Client()


def _query_job(client: bigquery.Client, sql: str, job_id: str, destination: str | None = SNAPSHOT, **config: Any):
    job_config = bigquery.QueryJobConfig(
        destination=destination, write_disposition=config.pop("write_disposition", "WRITE_TRUNCATE"), **config
    )
    return client.query(sql, job_config=job_config, job_id=job_id, location="US", job_retry=None)


# -- google-cloud-bigquery ------------------------------------------------------------------------
def test_query_job_writes_the_destination_and_reads_back(standin, client) -> None:
    job = _query_job(client, WINDOW_SQL, "snap_demand_20240102", labels={"model-line": "demand"})

    assert job.state == "RUNNING"  # inserted, not yet run: the client has to poll
    rows = [dict(row) for row in job.result()]
    frame = client.list_rows(SNAPSHOT).to_dataframe(create_bqstorage_client=False)

    assert [r["id"] for r in rows] == [2, 3]
    assert frame["id"].tolist() == [2, 3]
    assert frame["doubled"].tolist()[0] == 40.0 and pd.isna(frame["doubled"].tolist()[1])
    assert frame["unit_price"].iloc[0] == 5.0 and pd.isna(frame["unit_price"].iloc[1])
    assert str(frame["month"].iloc[0]) == "2024-01-01"
    assert standin.query_executions == 1
    assert standin.table_rows(SNAPSHOT)[0]["id"] == 2
    table = client.get_table(SNAPSHOT)
    assert (table.num_rows, table.location) == (2, "US")
    assert {f.name: f.field_type for f in table.schema} == {
        "id": "INTEGER",
        "month": "DATE",
        "doubled": "FLOAT",
        "unit_price": "FLOAT",
    }
    fetched = client.get_job("snap_demand_20240102", location="US")
    assert fetched.labels == {"model-line": "demand"}
    assert fetched.state == "DONE" and fetched.error_result is None
    assert fetched.destination.table_id == "demand_20240102"
    # the credentials were exchanged at the token endpoint and carried on every API call
    assert standin.count("POST", "/token") >= 1
    assert all(r.headers.get("authorization", "").startswith("Bearer ya29.standin-") for r in standin.log[1:])


def test_feature_sql_gives_the_same_rows_as_the_local_warehouse(standin, client, tmp_path) -> None:
    """The model line's real SQL, run by the stand-in and by the local (DuckDB) adapter, over the same data."""
    from datetime import date

    from mlops_lifecycle.adapters.sample_data import generate_daily_demand
    from mlops_lifecycle.adapters.warehouse import LocalWarehouse
    from mlops_lifecycle.sql import render_sql

    template = (Path(__file__).resolve().parents[2] / "include" / "sql" / "demand_forecast_features.sql").read_text()
    data = generate_daily_demand(date(2024, 1, 1), date(2024, 3, 31), n_markets=3)
    local = LocalWarehouse(tmp_path / "warehouse")
    local.table_dir("daily_demand").mkdir(parents=True)
    data.to_parquet(local.table_dir("daily_demand") / "2024.parquet", index=False)
    standin.load_table(f"{PROJECT}.sales.daily_demand", local.table_dir("daily_demand"))
    window = (date(2024, 3, 1), date(2024, 3, 15))

    expected = pd.read_parquet(local.snapshot(template, {"daily_demand": "daily_demand"}, *window, "w").uri)
    sql = render_sql(template, {"daily_demand": f"{PROJECT}.sales.daily_demand"}, *window)  # no backticks
    _query_job(client, sql, "features").result()
    got = client.list_rows(SNAPSHOT).to_dataframe(create_bqstorage_client=False)

    assert len(got) == len(expected) == 3 * 14
    assert list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(
        got.astype(object).where(got.notna(), None),
        expected.astype(object).where(expected.notna(), None),
        check_dtype=False,
    )
    schema = {f.name: f.field_type for f in client.get_table(SNAPSHOT).schema}
    assert (schema["date"], schema["units_sold"], schema["lag_7"], schema["month"]) == (
        "DATE",
        "FLOAT",
        "FLOAT",
        "INTEGER",
    )


def test_types_and_paging_of_tabledata_list(standin, client) -> None:
    source = client.list_rows(ORDERS, page_size=3)
    frame = source.to_dataframe(create_bqstorage_client=False)

    assert frame["id"].tolist() == [1, 2, 3, 4]
    assert str(frame["at"].iloc[1]) == "2024-01-02 11:30:00+00:00"
    assert frame["shop"].isna().tolist() == [False, False, False, True]
    assert standin.count("GET", r".*/tables/orders/data") == 2  # 4 rows in pages of 3
    assert [f.field_type for f in client.get_table(ORDERS).schema] == [
        "INTEGER",
        "DATE",
        "FLOAT",
        "INTEGER",
        "STRING",
        "TIMESTAMP",
    ]


def test_same_job_id_again_is_a_conflict_and_runs_nothing(standin, client) -> None:
    _query_job(client, WINDOW_SQL, "snap_once").result()

    with pytest.raises(Conflict, match="Already Exists: Job test-project:US.snap_once"):
        _query_job(client, WINDOW_SQL, "snap_once")

    assert standin.query_executions == 1
    assert standin.count("POST", r".*/projects/test-project/jobs") == 2
    # a job is found with its location, or with none given
    assert client.get_job("snap_once").location == "US"
    with pytest.raises(NotFound, match="Not found: Job test-project:EU.snap_once"):
        client.get_job("snap_once", location="EU")


def test_bad_query_fails_the_job_with_the_reason(standin, client) -> None:
    job = _query_job(client, "SELEC id FROM `test-project.sales.orders`", "bad_sql", destination=None)

    with pytest.raises(BadRequest, match=r"Syntax error: .* at \[1:13\]"):
        job.result()
    job.reload()  # the error came from getQueryResults; jobs.get has it too
    assert (job.state, job.error_result["reason"]) == ("DONE", "invalidQuery")

    duckdb_error = _query_job(client, "SELECT no_such_column FROM `test-project.sales.orders`", "bad_column", None)
    with pytest.raises(BadRequest, match="no_such_column"):
        duckdb_error.result()

    missing = _query_job(client, "SELECT * FROM `test-project.sales.nope`", "missing_table", destination=None)
    with pytest.raises(NotFound, match="Not found: Table test-project:sales.nope"):
        missing.result()

    no_dataset = _query_job(client, WINDOW_SQL, "missing_dataset", destination=f"{PROJECT}.nowhere.t")
    with pytest.raises(NotFound, match="Not found: Dataset test-project:nowhere"):
        no_dataset.result()
    assert not standin.table_exists(f"{PROJECT}.nowhere.t")


def test_write_dispositions_and_query_parameters(standin, client) -> None:
    sql = "SELECT id FROM `test-project`.sales.orders WHERE day >= @start"
    params = [bigquery.ScalarQueryParameter("start", "DATE", "2024-01-03")]
    _query_job(client, sql, "w1", query_parameters=params).result()
    _query_job(client, sql, "w2", write_disposition="WRITE_APPEND", query_parameters=params).result()
    assert [r["id"] for r in standin.table_rows(SNAPSHOT)] == [3, 4, 3, 4]

    refused = _query_job(client, sql, "w3", write_disposition="WRITE_EMPTY", query_parameters=params)
    with pytest.raises(Conflict, match="Already Exists: Table test-project:snapshots.demand_20240102"):
        refused.result()
    assert len(standin.table_rows(SNAPSHOT)) == 4  # untouched

    # jobs.query (a short query, no job id chosen by the caller)
    assert client.query_and_wait("SELECT count(*) AS n FROM sales.orders").to_dataframe()["n"].tolist() == [4]


def test_datasets_tables_and_job_listing(standin, client) -> None:
    created = client.create_dataset(bigquery.Dataset(f"{PROJECT}.eu_snapshots"), exists_ok=True)
    assert created.location == "US"  # the API default when none is given
    with pytest.raises(Conflict, match="Already Exists: Dataset test-project:eu_snapshots"):
        client.create_dataset(f"{PROJECT}.eu_snapshots")
    eu = bigquery.Dataset(f"{PROJECT}.eu_only")
    eu.location = "EU"
    client.create_dataset(eu)
    assert {d.dataset_id for d in client.list_datasets()} == {"sales", "snapshots", "eu_snapshots", "eu_only"}
    with pytest.raises(NotFound, match="Not found: Dataset test-project:missing"):
        client.get_dataset(f"{PROJECT}.missing")

    schema = [bigquery.SchemaField("id", "INTEGER"), bigquery.SchemaField("at", "TIMESTAMP")]
    table = bigquery.Table(f"{PROJECT}.eu_snapshots.empty", schema=schema)
    table.labels = {"owner": "mlops"}
    client.create_table(table)
    fetched = client.get_table(f"{PROJECT}.eu_snapshots.empty")
    assert (fetched.num_rows, fetched.labels, [f.field_type for f in fetched.schema]) == (
        0,
        {"owner": "mlops"},
        ["INTEGER", "TIMESTAMP"],
    )
    assert [t.table_id for t in client.list_tables(f"{PROJECT}.eu_snapshots")] == ["empty"]
    client.delete_table(f"{PROJECT}.eu_snapshots.empty")
    client.delete_table(f"{PROJECT}.eu_snapshots.empty", not_found_ok=True)
    client.delete_dataset(f"{PROJECT}.eu_snapshots")

    # a dataset in the EU is not found by a job in the US
    standin.load_table(f"{PROJECT}.eu_only.t", pd.DataFrame({"x": [1]}))
    job = _query_job(client, "SELECT x FROM eu_only.t", "wrong_location", destination=None)
    with pytest.raises(NotFound, match="Not found: Dataset test-project:eu_only was not found in location US"):
        job.result()
    assert [j.job_id for j in client.list_jobs()] == ["wrong_location"]


def test_cancel_stops_a_running_job_before_its_sql_runs(standin, client) -> None:
    standin.job_seconds = 5
    job = _query_job(client, WINDOW_SQL, "to_cancel")

    assert job.cancel()
    job.reload()

    assert (job.state, job.error_result["reason"]) == ("DONE", "stopped")
    assert standin.query_executions == 0 and not standin.table_exists(SNAPSHOT)


def test_requests_without_credentials_are_refused(standin) -> None:
    from google.auth.credentials import AnonymousCredentials

    anonymous = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials())
    with pytest.raises(Exception, match="Anonymous credentials cannot be refreshed"):  # google-auth, after the 401
        anonymous.get_table(ORDERS)
    standin.require_auth = False
    assert anonymous.get_table(ORDERS).num_rows == 4


def test_gcloud_aio_auth_honours_token_uri(standin, tmp_path) -> None:
    from gcloud.aio.auth import Token

    async def fetch() -> str:
        async with Token(
            service_file=str(tmp_path / "key.json"), scopes=["https://www.googleapis.com/auth/bigquery"]
        ) as token:
            return await token.get()

    assert asyncio.run(fetch()) in standin.tokens


def test_database_file_keeps_tables_and_dataset_locations(tmp_path) -> None:
    first = BigQueryStandIn(database=tmp_path / "bq.duckdb").start()
    first.create_dataset("eu_data", location="EU")
    first.load_table(f"{PROJECT}.eu_data.t", pd.DataFrame({"x": [1, 2]}))
    first.stop()

    second = BigQueryStandIn(database=tmp_path / "bq.duckdb").start()
    try:
        assert second.table_rows(f"{PROJECT}.eu_data.t") == [{"x": 1}, {"x": 2}]
        assert second.dataset_location("eu_data") == "EU"
    finally:
        second.stop()


# -- apache-airflow-providers-google ----------------------------------------------------------------
def _configuration() -> dict[str, Any]:
    return {
        "query": {
            "query": WINDOW_SQL,
            "useLegacySql": False,
            "destinationTable": {"projectId": PROJECT, "datasetId": "snapshots", "tableId": "demand_20240102"},
            "writeDisposition": "WRITE_TRUNCATE",
            "createDisposition": "CREATE_IF_NEEDED",
            "priority": "INTERACTIVE",
        },
        "labels": {"model-line": "demand", "window": "20240102-20240104"},
    }


@pytest.fixture(scope="module", autouse=True)
def _hook_lineage_loaded() -> None:
    """The provider's first insert loads Airflow's plugins for hook lineage (~1.3 s, once per process): pay it
    here, so that the job is still RUNNING when the operator first looks at it."""
    from airflow.providers.common.compat.lineage.hook import get_hook_lineage_collector

    get_hook_lineage_collector()


@pytest.fixture
def slow_jobs(standin: BigQueryStandIn) -> BigQueryStandIn:
    """Jobs RUNNING for 1 s: enough for the operator to see RUNNING and defer, or for a retry to find it running."""
    standin.job_seconds = 1.0
    return standin


def _operator(**kwargs: Any) -> BigQueryInsertJobOperator:
    """A new instance per try, as Airflow makes it."""
    arguments: dict[str, Any] = {
        "task_id": "snapshot",
        "configuration": _configuration(),
        "project_id": PROJECT,
        "location": "US",
        "job_id": "snap_x",
        "force_rerun": False,
        "reattach_states": {"PENDING", "RUNNING"},
        "deferrable": True,
        "poll_interval": 0.05,
    }
    with DAG("demand_forecast", schedule=None):
        return BigQueryInsertJobOperator(**{**arguments, **kwargs})


def _first_event(trigger: BigQueryInsertJobTrigger) -> dict[str, Any]:
    classpath, kwargs = trigger.serialize()  # what the triggerer gets
    assert classpath == "airflow.providers.google.cloud.triggers.bigquery.BigQueryInsertJobTrigger"
    rebuilt = BigQueryInsertJobTrigger(**kwargs)

    async def first() -> dict[str, Any]:
        async for event in rebuilt.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first())


def _defer(op: BigQueryInsertJobOperator, context: dict[str, Any]) -> BigQueryInsertJobTrigger:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "execute_complete"
    return deferred.value.trigger


def test_deferrable_insert_job_operator_and_trigger(standin, slow_jobs) -> None:
    context = provider_context()
    op = _operator()

    trigger = _defer(op, context)
    job_id = trigger.job_id
    assert job_id.startswith("snap_x_")  # force_rerun=False: the configuration's hash is appended
    assert (trigger.project_id, trigger.location) == (PROJECT, "US")
    event = _first_event(trigger)

    assert event == {"job_id": job_id, "status": "success", "message": "Job completed"}
    assert op.execute_complete(context, event) == job_id
    assert [r["id"] for r in standin.table_rows(SNAPSHOT)] == [2, 3]
    assert standin.query_executions == 1
    job = standin.job(job_id)
    assert job.location == "US"
    assert job.labels == {
        "model-line": "demand",
        "window": "20240102-20240104",
        "airflow-dag": "demand_forecast",
        "airflow-task": "snapshot",
    }
    assert context["ti"].xcom["bigquery_table"]["table_id"] == "demand_20240102"
    # how the extract adapter checks the snapshot, through the sync hook
    hook = BigQueryHook()
    assert hook.get_client(project_id=PROJECT, location="US").get_table(SNAPSHOT).num_rows == 2
    # the trigger polled jobs.get with the location until DONE
    polls = standin.requests_matching("GET", rf".*/jobs/{job_id}")
    assert polls and all(r.arg("location") == "US" for r in polls)

    # a retry of the task once the job is DONE: same id (same configuration), the SQL does not run again,
    # and the provider refuses to go on
    with pytest.raises(AirflowException) as refused:
        _operator().execute(provider_context(try_number=2))
    assert str(refused.value) == (
        f"Job with id: {job_id} already exists and is in DONE state. If you want to force rerun it consider "
        "setting `force_rerun=True`.Or, if you want to reattach in this scenario add DONE to `reattach_states`"
    )
    with pytest.raises(AirflowException, match="^Job is already in state DONE. Can not reattach to this job.$"):
        _operator(reattach_states={"PENDING", "RUNNING", "DONE"}).execute(provider_context(try_number=2))
    assert standin.query_executions == 1


def test_retry_while_running_reattaches(standin, slow_jobs) -> None:
    first = _defer(_operator(), provider_context())
    second = _defer(_operator(), provider_context(try_number=2))  # the job is still RUNNING: Conflict, then reattach

    assert second.job_id == first.job_id
    assert _first_event(second)["status"] == "success"
    assert standin.query_executions == 1
    assert standin.count("POST", r".*/projects/test-project/jobs") == 2


def test_lost_answer_to_jobs_insert_reattaches(standin) -> None:
    """The job is created but the answer is lost: the client retries, gets 409, and the operator reattaches."""
    standin.job_seconds = 30  # the client waits up to 1 s before it retries the insert: keep the job RUNNING
    standin.inject("POST", r".*/projects/test-project/jobs", Fault.drop_after())

    trigger = _defer(_operator(), provider_context())
    standin.finish_job(trigger.job_id)

    assert _first_event(trigger)["status"] == "success"
    assert standin.count("POST", r".*/projects/test-project/jobs") == 2
    assert standin.query_executions == 1 and len(standin.jobs) == 1


def test_failed_job_reaches_execute_complete_as_an_error(standin, slow_jobs) -> None:
    op = _operator()
    op.configuration["query"]["query"] = "SELECT * FROM `test-project.sales.missing`"
    context = provider_context()

    event = _first_event(_defer(op, context))

    assert event["status"] == "error"
    assert "Not found: Table test-project:sales.missing" in event["message"]
    with pytest.raises(AirflowException, match="Not found: Table"):
        op.execute_complete(context, event)


def test_non_deferrable_retry_uses_the_task_state_store(standin) -> None:
    store = TaskStateStore()
    job_id = _operator(deferrable=False).execute(provider_context(store=store))
    assert store["bigquery_job_id"] == job_id and standin.job(job_id).state == "DONE"

    again = _operator(deferrable=False).execute(provider_context(try_number=2, store=store))

    assert again == job_id
    assert standin.query_executions == 1
    assert standin.count("POST", r".*/projects/test-project/jobs") == 1  # found by id, no insert at all


def test_trigger_on_kill_cancels_through_gcloud_aio(standin, monkeypatch) -> None:
    """gcloud-aio-bigquery (the async hook's cancel) wants the emulator host without a scheme, and sends no token."""
    standin.job_seconds = 5
    trigger = _defer(_operator(), provider_context())
    standin.require_auth = False
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", standin.aio_emulator_host)

    asyncio.run(trigger.on_kill())

    job = standin.job(trigger.job_id)
    assert (job.state, job.error_result["reason"]) == ("DONE", "stopped")
    assert standin.query_executions == 0
    cancel = standin.requests_matching("POST", rf".*/jobs/{trigger.job_id}/cancel")
    assert cancel[0].arg("location") == "US" and "authorization" not in cancel[0].headers


def test_hook_calls_of_the_extract_adapter(standin) -> None:
    """get_job (NotFound first), insert_job(nowait=True), cancel_job: what a find-or-submit operator uses."""
    standin.job_seconds = 30
    hook = BigQueryHook(location="US")
    with pytest.raises(NotFound):
        hook.get_job(job_id="mlops_demand_w1", project_id=PROJECT, location="US")

    job = hook.insert_job(
        configuration=_configuration(), job_id="mlops_demand_w1", project_id=PROJECT, location="US", nowait=True
    )
    assert (job.state, job.location) == ("RUNNING", "US")
    assert hook.get_job(job_id="mlops_demand_w1", project_id=PROJECT, location="US").state == "RUNNING"
    hook.cancel_job(job_id="mlops_demand_w1", project_id=PROJECT, location="US")

    cancelled = hook.get_job(job_id="mlops_demand_w1", project_id=PROJECT, location="US")
    assert (cancelled.state, cancelled.error_result["reason"]) == ("DONE", "stopped")
    assert standin.query_executions == 0


def test_connection_with_inline_key(standin, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", standin.airflow_connection_json())
    hook = BigQueryHook()

    assert hook.project_id == PROJECT
    assert hook.get_client(project_id=PROJECT).get_table(ORDERS).num_rows == 4
    assert json.loads(standin.airflow_connection_json())["extra"]["keyfile_dict"]["token_uri"].endswith("/token")
