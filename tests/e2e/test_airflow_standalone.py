"""A lifecycle as a user runs it: `airflow standalone` (API server, scheduler, DAG processor, triggerer,
LocalExecutor), a scheduled run, approval through the REST API, the wait in the triggerer.

Also measures what the issue asks for: worker slots held while waiting on review and on the service.
"""

from __future__ import annotations

import copy
import datetime
import time

import pytest
import yaml

import devstack
from conftest import MODEL_LINES, REVIEWER
from mlops_lifecycle import paths
from standalone import start_standalone

LINE = "e2e_scheduled"
DAG_ID = f"{LINE}__lifecycle"


@pytest.fixture(scope="module")
def api(stack):  # noqa: ANN001, ANN201
    """A running `airflow standalone` and an authenticated client to its REST API."""
    base = yaml.safe_load((paths.include_dir() / "model_lines" / "high_demand_alert.yaml").read_text())
    data = copy.deepcopy(base)
    port = devstack.free_port()
    # one retry: Airflow can fail a task as it resumes from a deferral or from awaiting input on this loaded
    # 2-core machine ("state attribute is queued"); a retry finds the recorded approval and asks nobody again
    data.update(model_line=LINE, retries=1, retry_delay_seconds=1)
    data["registry"].update(model_name=LINE, experiment=f"/e2e/{LINE}")
    data["deploy"].update(port=port, verify_timeout_seconds=120, poll_interval_seconds=0.5)
    data["review"].update(auto_approve=False, reviewers=[REVIEWER])
    # a yearly schedule: production's data then ends before today, so the drift test's retrain request has new
    # days to train on (a line retrained today is not retrained again for drift: it would see the same days)
    data["schedule"] = {"cron": "30 4 1 1 *", "timezone": "UTC", "start_date": datetime.date(2025, 1, 1)}
    data["monitoring"].setdefault("limits", {})["min_rows"] = 100  # the drift test sends 400 rows
    (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))

    try:
        with start_standalone("standalone.log") as standalone:
            yield standalone.api
    finally:
        (MODEL_LINES / f"{LINE}.yaml").unlink()


def wait_for(what: str, probe, timeout: float = 300, every: float = 1.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def task_states(api, run_id: str) -> dict[str, str | None]:  # noqa: ANN001
    response = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return {t["task_id"]: t["state"] for t in response.json()["task_instances"]}


def running_slots(api) -> int:  # noqa: ANN001
    return api.get("/api/v2/pools/default_pool").json()["running_slots"]


def test_scheduled_run_waits_for_approval_and_service_without_holding_worker_slots(api):
    wait_for("the DAG to be parsed", lambda: api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, timeout=120)
    assert api.get("/api/v2/importErrors").json()["total_entries"] == 0
    api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()

    def scheduled_run() -> dict | None:
        runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
        return next((r for r in runs if r["run_type"] == "scheduled"), None)

    run = wait_for("the scheduler to create the latest scheduled run", scheduled_run, timeout=120)
    run_id = run["dag_run_id"]
    assert run["data_interval_end"] > run["data_interval_start"], "a real data interval"

    wait_for(
        "approve_review to wait for input",
        lambda: task_states(api, run_id)["approve_review"] == "awaiting_input",
        timeout=300,
    )
    slots_while_reviewing = []
    for _ in range(3):  # sampled over a few seconds of waiting
        slots_while_reviewing.append(running_slots(api))
        time.sleep(1)
    detail = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_review/-1/hitlDetails").json()
    assert detail["subject"].startswith(f"Approve {LINE} v") and "| roc_auc | threshold |" in detail["body"]
    api.patch(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_review/-1/hitlDetails",
        json={"chosen_options": ["Approve"], "params_input": {}},
    ).raise_for_status()

    # The new service loads beside the old one while `deploy` is deferred (blue/green); `verify_serving`
    # then defers too, and finds the stable port already answering as the new version.
    seen_deploy, slots_while_starting = set(), []

    def finished() -> str | None:
        states = task_states(api, run_id)
        seen_deploy.add(states["deploy"])
        if states["deploy"] == "deferred":
            slots_while_starting.append(running_slots(api))
        state = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        return state if state in ("success", "failed") else None

    assert wait_for("the run to finish", finished, timeout=300, every=0.3) == "success", task_states(api, run_id)
    assert "deferred" in seen_deploy, f"deploy never deferred: {seen_deploy}"
    assert slots_while_reviewing == [0, 0, 0]
    assert slots_while_starting and set(slots_while_starting) == {0}
    print(
        f"\nworker slots held: while awaiting review {max(slots_while_reviewing)}, "
        f"while waiting for the service {max(slots_while_starting)}"
    )

    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    reg = MlflowRegistryHook()
    aliases = reg.aliases(LINE)
    assert aliases["production"] == aliases["staging"]
    tags = reg.version_tags(LINE, aliases["production"])
    assert tags["audit.approved_by"] == REVIEWER
    assert tags["audit.promoted_by"] == f"airflow:{DAG_ID}/{run_id}"
    run = reg.get_run(tags["audit.run_id"])
    links = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/train/links").json()["extra_links"]
    assert links["MLflow run"] == reg.run_url(run.info.experiment_id, run.info.run_id)
    assert links["MLflow model version"] == reg.model_version_url(LINE, aliases["production"])
    links = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/verify_serving/links").json()
    assert links["extra_links"]["Service /version"].endswith("/version")


def test_a_drift_breach_requests_a_retrain_that_the_scheduler_starts(api):
    """The monitor, triggered through the REST API, sees shifted traffic on the served version and emits the
    line's retrain request; the scheduler then starts a lifecycle run of its own window (asset-triggered)."""
    import json
    import urllib.request
    from datetime import UTC, timedelta

    import pandas as pd

    monitor = f"{LINE}__monitor"
    port = yaml.safe_load((MODEL_LINES / f"{LINE}.yaml").read_text())["deploy"]["port"]
    snapshots = paths.local_home() / "warehouse" / "snapshots"
    [snapshot] = [p for p in snapshots.glob(f"{LINE}__2*.parquet")]  # the scheduled run's training data
    frame = pd.read_parquet(snapshot).dropna()
    features = [c for c in frame.columns if c not in ("market_id", "date", "high_demand")]
    rows = json.loads(frame[features].sample(400, random_state=7).to_json(orient="records"))
    since = datetime.datetime.now(UTC) - timedelta(seconds=1)
    for first in range(0, len(rows), 100):
        batch = [r | {"price_ratio_28": r["price_ratio_28"] * 1.5} for r in rows[first : first + 100]]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict",
            data=json.dumps({"rows": batch}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    time.sleep(1.5)  # the prediction log is written every 0.5 s
    until = datetime.datetime.now(UTC)

    api.patch(f"/api/v2/dags/{monitor}", json={"is_paused": False}).raise_for_status()
    response = api.post(
        f"/api/v2/dags/{monitor}/dagRuns",
        json={"logical_date": None, "conf": {"since": since.isoformat(), "until": until.isoformat()}},
    )
    response.raise_for_status()
    run_id = response.json()["dag_run_id"]

    def finished(dag_id: str, run: str) -> str | None:
        state = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run}").json()["state"]
        return state if state in ("success", "failed") else None

    assert wait_for("the monitor run", lambda: finished(monitor, run_id), timeout=300) == "success"
    states = {
        t["task_id"]: t["state"]
        for t in api.get(f"/api/v2/dags/{monitor}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    }
    assert states["request_retrain"] == "success", states
    links = api.get(f"/api/v2/dags/{monitor}/dagRuns/{run_id}/taskInstances/check_drift/links").json()
    assert "/artifacts/drift_report.html" in links["extra_links"]["Drift report"]

    def requested_run() -> dict | None:
        runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
        return next((r for r in runs if r["run_type"] == "asset_triggered"), None)

    run = wait_for("the scheduler to start the requested retrain", requested_run, timeout=120)
    assert run["triggered_by"] == "asset"
    # its window runs up to the request, so it trains on the drifted data instead of repeating the last run
    wait_for("route to finish", lambda: task_states(api, run["dag_run_id"]).get("route") in ("success", "failed"))
    assert task_states(api, run["dag_run_id"])["route"] == "success"
    log = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/route/logs/1").text
    assert "Retrain requested by the drift monitor" in log and "price_ratio_28" in log

    # the user clears request_retrain of the monitor run (to look at it again): no second request, no second run
    api.post(
        f"/api/v2/dags/{monitor}/clearTaskInstances",
        json={"dag_run_id": run_id, "task_ids": ["request_retrain"], "dry_run": False, "only_failed": False},
    ).raise_for_status()

    def request_state() -> str | None:
        ti = api.get(f"/api/v2/dags/{monitor}/dagRuns/{run_id}/taskInstances/request_retrain").json()
        return ti["state"] if ti["try_number"] >= 2 and ti["state"] in ("success", "skipped", "failed") else None

    assert wait_for("the cleared request_retrain", request_state, timeout=180) == "skipped"
    log = api.get(f"/api/v2/dags/{monitor}/dagRuns/{run_id}/taskInstances/request_retrain/logs/2").text
    assert "a cleared task repeats none" in log
    runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
    assert [r["dag_run_id"] for r in runs if r["run_type"] == "asset_triggered"] == [run["dag_run_id"]]

    # end the requested run here (what it does next is the lifecycle's, tested above): a task left running in
    # the session's metadata DB would hold a pool slot in the next module's standalone
    api.patch(f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", json={"state": "failed"}).raise_for_status()
    busy = ("running", "queued", "scheduled", "deferred", "up_for_retry", "restarting")
    wait_for(
        "the requested run's tasks to stop",
        lambda: not any(s in busy for s in task_states(api, run["dag_run_id"]).values()),
        timeout=120,
    )
