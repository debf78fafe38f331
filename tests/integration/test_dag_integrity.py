"""DAG integrity: the DAG folder parses in a fresh process, fast, without heavy imports or network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlops_lifecycle import paths

HEAVY = [
    "mlflow",
    "pandas",
    "numpy",
    "sklearn",
    "gitlab",
    "google.cloud.bigquery",
    "databricks",
    "duckdb",
    "sqlglot",
    "pyarrow",
    # Airflow itself reads every provider's package info at start-up; the operator modules are the cost
    "airflow.providers.google.cloud",
    "airflow.providers.databricks.operators",
    "airflow.providers.databricks.hooks",
]

PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in json.loads(sys.argv[2])))
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {
        "tags": sorted(dag.tags),
        "timetable": type(dag.timetable).__name__,
        "tasks": [t.task_id for t in dag.topological_sort()],
        "downstream": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "owner": dag.owner,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "schedule_assets": sorted(a.name for a in getattr(dag.timetable, "asset_condition", None).objects)
        if getattr(dag.timetable, "asset_condition", None) is not None else [],
        "timetable_inner": type(getattr(dag.timetable, "timetable", dag.timetable)).__name__,
        "outlets": {t.task_id: sorted(a.name for a in t.outlets) for t in dag.tasks},
    }
print(json.dumps({"dags": dags, "errors": bag.import_errors, "heavy": heavy}))
"""


def parse_dag_folder(model_lines: Path) -> dict:
    env = {**os.environ, "MLOPS_MODEL_LINES_DIR": str(model_lines)}
    out = subprocess.run(
        [sys.executable, "-c", PARSE, str(paths.REPO_ROOT / "dags"), json.dumps(HEAVY)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped() -> dict:
    return parse_dag_folder(paths.include_dir() / "model_lines")


def test_no_import_errors_and_a_lifecycle_and_a_monitor_dag_per_model_line(shipped):
    assert shipped["errors"] == {}
    lines = sorted(p.stem for p in (paths.include_dir() / "model_lines").glob("*.yaml"))
    assert sorted(shipped["dags"]) == sorted(f"{line}__{kind}" for line in lines for kind in ("lifecycle", "monitor"))


def test_monitor_requests_retrains_through_the_asset_the_lifecycle_is_scheduled_on(shipped):
    for line in ("demand_forecast", "high_demand_alert"):
        monitor, lifecycle = shipped["dags"][f"{line}__monitor"], shipped["dags"][f"{line}__lifecycle"]
        assert monitor["tasks"][:2] == ["snapshot_served", "check_drift"]
        # alerting and the retrain request both hang on the check: a mail outage cannot hold a retrain back
        assert sorted(monitor["downstream"]["check_drift"]) == ["alert_owners", "request_retrain"]
        asset = f"{line}__retrain_request"
        # only the request task emits the event: a breach without a request (cool-down) emits nothing
        assert monitor["outlets"] == {
            "snapshot_served": [], "check_drift": [], "alert_owners": [], "request_retrain": [asset]
        }
        # the lifecycle keeps its cron and also starts on a request
        assert lifecycle["timetable"] == "AssetOrTimeSchedule" and lifecycle["schedule_assets"] == [asset]
        assert lifecycle["timetable_inner"] == "CronDataIntervalTimetable"
        assert monitor["timetable"] == "CronDataIntervalTimetable" and monitor["max_active_runs"] == 1
        assert {"mlops", "monitor", f"line:{line}"} <= set(monitor["tags"])


def test_no_heavy_module_is_imported_at_parse_time(shipped):
    assert shipped["heavy"] == []


def test_lifecycle_shape_tags_owner_and_retries(shipped):
    dag = shipped["dags"]["demand_forecast__lifecycle"]
    chain = [
        "route",
        "extract",
        "train",
        "gate",
        "stage",
        "open_review",
        "approve_review",
        "merge_review",
        "deploy",
        "verify_serving",
        "promote",
    ]
    backtest = ["backtest_extract", "backtest_train", "backtest_report"]
    assert set(dag["tasks"]) == {*chain, "restore_staging", "housekeeping", *backtest}
    assert dag["downstream"]["promote"] == ["housekeeping"]  # retention after a promotion, never in a backtest
    for upstream, downstream in [*zip(chain, chain[1:], strict=False), *zip(backtest, backtest[1:], strict=False)]:
        assert downstream in dag["downstream"][upstream], f"{upstream} >> {downstream} missing"
    assert set(dag["downstream"]["route"]) == {"extract", "backtest_extract"}  # a backfill branches to the backtest
    assert dag["downstream"]["housekeeping"] == []  # a leaf after promote: a failed promotion fails the run
    for task in ("open_review", "approve_review", "merge_review", "deploy", "verify_serving"):
        assert "restore_staging" in dag["downstream"][task]
    assert {"mlops", "lifecycle", "line:demand_forecast", "team:forecasting", "forecasting"} <= set(dag["tags"])
    assert dag["owner"] == "forecasting"
    # restore_staging is as safe to retry as any other step: it moves the alias back only from this run's candidate
    assert dag["retries"]["train"] == 2 and dag["retries"]["restore_staging"] == 2
    # one lifecycle run of a line at a time: the scheduler makes it the single writer of the line's state
    assert dag["max_active_runs"] == 1 and dag["catchup"] is False
    other = shipped["dags"]["high_demand_alert__lifecycle"]
    assert other["owner"] == "store-ops-ml" and other["retries"]["train"] == 1


def test_timetables_give_real_data_intervals(shipped):
    # a lifecycle scheduled on its cron or a retrain request keeps the cron's real intervals for its scheduled runs
    assert {d["timetable_inner"] for d in shipped["dags"].values()} == {"CronDataIntervalTimetable"}


def test_bad_config_is_an_import_error_in_the_ui_and_the_other_lines_still_load(tmp_path):
    for name in ("demand_forecast", "high_demand_alert"):
        shutil.copy(paths.include_dir() / "model_lines" / f"{name}.yaml", tmp_path)
    bad = yaml.safe_load((tmp_path / "high_demand_alert.yaml").read_text())
    bad["gate"]["metrics"]["roc_auc"]["threshold"] = "high"
    (tmp_path / "high_demand_alert.yaml").write_text(yaml.safe_dump(bad))

    parsed = parse_dag_folder(tmp_path)
    assert sorted(parsed["dags"]) == ["demand_forecast__lifecycle", "demand_forecast__monitor"]
    [(error_file, message)] = parsed["errors"].items()
    assert error_file.endswith("model_line_config_errors.py")
    assert "high_demand_alert.yaml" in message
    assert "gate.metrics.roc_auc.threshold: Input should be a valid number" in message


def test_production_adapters_build_their_dag_without_importing_providers_or_clients(tmp_path):
    """BigQuery, Databricks and GitLab lines parse as cheaply as local ones: clients load in tasks only."""
    shutil.copy(paths.include_dir() / "examples" / "production" / "demand_forecast.yaml", tmp_path)

    parsed = parse_dag_folder(tmp_path)

    assert parsed["errors"] == {} and parsed["heavy"] == []
    dag = parsed["dags"]["demand_forecast__lifecycle"]
    chain = ["route", "extract", "train", "gate", "stage", "open_review", "await_merge", "await_pipeline"]
    chain += ["await_deployments", "verify_serving", "promote"]
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert downstream in dag["downstream"][upstream], f"{upstream} >> {downstream} missing"
    assert set(dag["tasks"]) == {
        *chain,
        "restore_staging",
        "housekeeping",
        "backtest_extract",
        "backtest_train",
        "backtest_report",
    }
    for task in ("open_review", "await_merge", "await_pipeline", "await_deployments", "verify_serving"):
        assert "restore_staging" in dag["downstream"][task]
