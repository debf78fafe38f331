"""Production only moves forward, through the real scheduler: overlapping runs, backfills and cleared runs.

One `airflow standalone` (API server, scheduler, DAG processor, triggerer, LocalExecutor) serves every
scenario; runs are created the way users create them, through the REST API. The invariants:
- runs of one line never overlap (the single writer of its aliases and deployment repository);
- production's data window only ever moves forward, whatever order the runs start in;
- a backfill run is a backtest: it trains each window once (not a registered version), evaluates it on
  the horizon after it, judges it against the champion of its time and reports; it never moves an alias,
  touches the deployment repository or the service;
- clearing an old run after a newer promotion ends skipped ("superseded") and changes nothing.
"""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

import devstack
from conftest import MODEL_LINES
from mlops_lifecycle import paths
from mlops_lifecycle.audit import events
from mlops_lifecycle.window import last_complete_interval, run_key_interval
from standalone import start_standalone

LINE = "e2e_safety"
DAG_ID = f"{LINE}__lifecycle"
CRON = "0 3 * * 1"
WEEK = timedelta(days=7)


@pytest.fixture(scope="module")
def line(stack):  # noqa: ANN001, ANN201
    """The line's YAML, a running `airflow standalone` and its REST client."""
    data = copy.deepcopy(yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text()))
    port = devstack.free_port()
    # one retry: on this 2-core machine under load the scheduler can fail a task whose deferral just resumed
    # ("TI was not in the running state"): an Airflow race outside what these tests are about
    data.update(model_line=LINE, retries=1, retry_delay_seconds=1)
    data["schedule"].update(cron=CRON, timezone="UTC", catchup=False)
    data["registry"].update(model_name=LINE, experiment=f"/e2e/{LINE}")
    data["train"]["parameters"].update(max_iter=40)
    data["review"].update(auto_approve=True, reviewers=[])
    data["deploy"].update(port=port, verify_timeout_seconds=120, poll_interval_seconds=0.5)
    # five weeks of horizon: the newest backfilled window's reaches past today (weeks ending before the
    # lifecycle runs' windows, so a backfill never meets a lifecycle run of the same week)
    data["backtest"] = {
        "horizon_days": 35,
        "variants": {"shallow": {"description": "fewer trees", "parameters": {"max_iter": 10}}},
    }
    (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))
    try:
        with start_standalone("standalone_safety.log") as standalone:
            api = standalone.api
            deadline = time.monotonic() + 120
            while api.get(f"/api/v2/dags/{DAG_ID}").status_code != 200:
                assert time.monotonic() < deadline, "the DAG was not parsed in 120 s"
                time.sleep(1)
            yield api, port
    finally:
        (MODEL_LINES / f"{LINE}.yaml").unlink()


def registry():  # noqa: ANN201
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    return MlflowRegistryHook()


def registry_state() -> dict:
    reg = registry()
    versions = reg.client.search_model_versions(f"name='{LINE}'")
    return {
        "aliases": reg.aliases(LINE) if versions else {},
        "versions": {v.version: reg.version_tags(LINE, v.version) for v in versions},
    }


def repo_commits() -> list[str]:
    from mlops_lifecycle.deployment_repository.local_git import LocalGitRepository

    return LocalGitRepository(paths.local_home() / "deploy-repo").log_subjects(limit=500)


def runs(api) -> list[dict]:  # noqa: ANN001
    response = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100, "order_by": "run_after"})
    response.raise_for_status()
    return response.json()["dag_runs"]


def task_states(api, run_id: str) -> dict[str, str | None]:  # noqa: ANN001
    response = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return {t["task_id"]: t["state"] for t in response.json()["task_instances"]}


def wait_until_finished(api, run_ids: list[str], timeout: float = 600) -> dict[str, str]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {r["dag_run_id"]: r["state"] for r in runs(api) if r["dag_run_id"] in run_ids}
        if len(states) == len(run_ids) and all(s in ("success", "failed") for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"runs did not finish in {timeout:.0f} s: {states}")


class OverlapWatch:
    """Samples the line's runs in the background: the most that were ever running at once."""

    def __init__(self, api) -> None:  # noqa: ANN001
        self.api, self.most, self.seen = api, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                running = [r for r in runs(self.api) if r["state"] == "running"]
            except Exception:  # noqa: BLE001 - a sample lost to a busy API server is just skipped
                running = []
            self.most, self.seen = max(self.most, len(running)), self.seen + 1
            time.sleep(0.3)

    def __enter__(self) -> OverlapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def window_end(run_key: str) -> datetime:
    return run_key_interval(run_key)[1]


def latest_interval() -> tuple[datetime, datetime]:
    return last_complete_interval(CRON, "UTC", datetime.now(UTC))


def trigger(api, end: datetime, run_id: str) -> str:  # noqa: ANN001
    """A manual run of the week ending ``end``, due when that week ended (the scheduler starts due runs first)."""
    body = {
        "dag_run_id": run_id,
        "logical_date": (end - WEEK).isoformat(),
        "data_interval_start": (end - WEEK).isoformat(),
        "data_interval_end": end.isoformat(),
        "run_after": end.isoformat(),
    }
    api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json=body).raise_for_status()
    return run_id


def test_overlapping_runs_never_interleave_and_production_only_moves_forward(line):
    api, port = line
    _, latest = latest_interval()
    # two manual runs of older windows queued while the DAG is paused; unpausing adds the scheduled run of
    # the latest window: three runs of one line at once. The older ones are due first, so each window in
    # turn is promoted over the one before; the assertions hold in whatever order they start
    older = [trigger(api, latest - 2 * WEEK, "manual__older"), trigger(api, latest - WEEK, "manual__newer")]
    with OverlapWatch(api) as watch:
        api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        deadline = time.monotonic() + 60
        while not [r for r in runs(api) if r["run_type"] == "scheduled"]:
            assert time.monotonic() < deadline, "unpausing created no scheduled run"
            time.sleep(1)
        [scheduled] = [r["dag_run_id"] for r in runs(api) if r["run_type"] == "scheduled"]
        final = wait_until_finished(api, [*older, scheduled])

    assert set(final.values()) == {"success"}, {r: task_states(api, r) for r in final}
    assert watch.seen > 20 and watch.most == 1, f"{watch.most} runs of one line ran at once"
    state = registry_state()
    production = state["aliases"]["production"]
    assert window_end(state["versions"][production]["audit.run_key"]) == latest, "production serves the newest window"
    promotions = sorted(
        (e["at"], window_end(tags["audit.run_key"]))
        for tags in state["versions"].values()
        for e in events(tags)
        if e["event"] == "promoted"
    )
    ends = [end for _, end in promotions]
    assert ends == sorted(ends) and len(set(ends)) == len(ends), f"production moved back: {promotions}"
    print(f"\npromotions (time, window end): {promotions}; most runs at once: {watch.most}")
    for run_id in older:  # a run that started after a newer promotion was skipped before training
        states = task_states(api, run_id)
        assert states["route"] in ("success", "skipped")
        if states["route"] == "skipped":
            assert set(states.values()) == {"skipped"}, states
    served = devstack.service_version(f"http://127.0.0.1:{port}")
    assert served and str(served["model_version"]) == production


def backfill(api, first_end: datetime, last_end: datetime, **options) -> list[dict]:  # noqa: ANN001, ANN003
    """Backfill the weeks ending ``first_end``..``last_end`` through the REST API; its runs once all finished."""
    before = {r["dag_run_id"]: r.get("end_date") for r in runs(api) if r["run_type"] == "backfill"}
    body = {
        "dag_id": DAG_ID,
        "from_date": (first_end - WEEK).isoformat(),
        "to_date": (last_end - WEEK).isoformat(),
        "max_active_runs": 2,
        **options,
    }
    created = api.post("/api/v2/backfills", json=body)
    assert created.status_code in (200, 201), created.text
    expected = round((last_end - first_end) / WEEK) + 1
    deadline = time.monotonic() + 600
    while True:
        mine = [
            r
            for r in runs(api)
            if r["run_type"] == "backfill"
            and first_end <= datetime.fromisoformat(r["data_interval_end"]).astimezone(UTC) <= last_end
        ]
        fresh = [r for r in mine if r["dag_run_id"] not in before or r.get("end_date") != before[r["dag_run_id"]]]
        done = api.get(f"/api/v2/backfills/{created.json()['id']}").json().get("completed_at")
        if done and len(fresh) >= expected and all(r["state"] in ("success", "failed") for r in mine):
            return mine
        assert time.monotonic() < deadline, f"backfill {created.json()} did not finish: {mine}"
        time.sleep(1)


def backtest_runs(variant: str | None = None) -> list:
    reg = registry()
    experiment = reg.client.get_experiment_by_name(f"/e2e/{LINE}-backtests")
    if experiment is None:
        return []
    query = "attributes.status = 'FINISHED' and tags.`backtest.window_end` != ''"
    if variant:
        query += f" and tags.`backtest.variant` = '{variant}'"
    return reg.client.search_runs([experiment.experiment_id], query, max_results=1000)


def report_of(api, backfill_runs: list[dict]) -> tuple[dict, str]:  # noqa: ANN001
    """The report JSON of the backtest these runs made, and the link the reporting task shows."""
    import json

    built = [
        r["dag_run_id"] for r in backfill_runs if task_states(api, r["dag_run_id"])["backtest_report"] == "success"
    ]
    assert built, "no run built the report"
    links = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{built[-1]}/taskInstances/backtest_report/links").json()
    xcom = api.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{built[-1]}/taskInstances/backtest_report/xcomEntries/return_value"
    ).json()
    result = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    reg = registry()
    experiment = reg.client.get_experiment_by_name(f"/e2e/{LINE}-backtests")
    reports = reg.client.search_runs(
        [experiment.experiment_id], f"tags.`backtest.report` = '{result['backtest_id']}'", max_results=10
    )
    assert [r.info.run_id for r in reports] == [result["report_run_id"]], "one report run per backtest"
    folder = reg.client.download_artifacts(result["report_run_id"], "")
    return json.loads((Path(folder) / "report.json").read_text()) | {
        "_files": sorted(p.name for p in Path(folder).iterdir())
    }, links["extra_links"].get("Backtest report", "")


def test_a_backfill_is_a_backtest_that_changes_nothing_and_reports(line):
    api, port = line
    _, latest = latest_interval()
    state, commits = registry_state(), repo_commits()
    served = devstack.service_version(f"http://127.0.0.1:{port}")

    backfill_runs = backfill(api, latest - 7 * WEEK, latest - 4 * WEEK, reprocess_behavior="none")

    assert len(backfill_runs) == 4 and {r["state"] for r in backfill_runs} == {"success"}, backfill_runs
    for run in backfill_runs:
        states = task_states(api, run["dag_run_id"])
        assert states["route"] == "success" and states["extract"] == "skipped" and states["promote"] == "skipped"
        assert {states[t] for t in ("backtest_extract", "backtest_train")} == {"success"}
        assert states["backtest_report"] in ("success", "skipped"), states
    # nothing of the lifecycle happened: registry, deployment repository and service as they were
    assert registry_state() == state, "a backfill changed the registry"
    assert repo_commits() == commits, "a backfill touched the deployment repository"
    assert devstack.service_version(f"http://127.0.0.1:{port}") == served
    # one model trained per window, in the backtest experiment (the baseline, nothing else)
    trained = backtest_runs()
    assert len(trained) == 4 and {r.data.tags["backtest.variant"] for r in trained} == {"baseline"}
    report, link = report_of(api, backfill_runs)
    assert link.endswith("/artifacts") and "#/experiments/" in link
    assert {"report.html", "report.json", "report.csv", "mape.png", "r2.png"} <= set(report["_files"])
    windows = {w["window_end"]: w for w in report["windows"]}
    assert len(windows) == 4 and report["variant"] == "baseline" and report["champion_mode"] == "chain"
    newest = windows[f"{latest - 4 * WEEK:%Y-%m-%d}"]
    assert newest["horizon"] == "missing" and newest["would_promote"] is None, "its horizon ends in the future"
    judged = [windows[k] for k in sorted(windows)[:3]]
    assert all(w["horizon"] == "complete" and isinstance(w["would_promote"], bool) for w in judged)
    assert judged[0]["champion"] is None, "the first window of the chain has no champion"
    for earlier, later in zip(judged, judged[1:], strict=False):  # the chain: each is judged against the last promoted
        if earlier["would_promote"]:
            assert later["champion"] == f"window to {earlier['window_end']}" and later["champion_metrics"]
    assert all(w["challenger"]["mape"] is not None and w["reasons"] for w in judged)


def test_rerunning_a_backfill_trains_no_window_twice(line):
    api, _ = line
    _, latest = latest_interval()
    before = {r.info.run_id for r in backtest_runs()}

    backfill_runs = backfill(api, latest - 7 * WEEK, latest - 4 * WEEK, reprocess_behavior="completed")

    assert {r["state"] for r in backfill_runs} == {"success"}
    assert {r.info.run_id for r in backtest_runs()} == before, "a window was trained again"


def test_a_variant_is_backtested_against_the_baseline_window_by_window(line):
    api, _ = line
    _, latest = latest_interval()
    baseline = {r.data.tags["backtest.window_end"]: r.info.run_id for r in backtest_runs("baseline")}

    backfill_runs = backfill(
        api, latest - 7 * WEEK, latest - 6 * WEEK, reprocess_behavior="completed", dag_run_conf={"variant": "shallow"}
    )

    assert {r["state"] for r in backfill_runs} == {"success"}, backfill_runs
    variant_runs = backtest_runs("shallow")
    assert len(variant_runs) == 2 and all(r.data.params["max_iter"] == "10" for r in variant_runs)
    assert {r.data.tags["backtest.window_end"]: r.info.run_id for r in backtest_runs("baseline")} == baseline
    report, _ = report_of(api, backfill_runs)
    assert report["variant"] == "shallow" and len(report["windows"]) == 2
    for window in report["windows"]:
        assert window["baseline"]["mape"] is not None and window["challenger"]["mape"] != window["baseline"]["mape"]
    # the same report from the command line
    import json
    import os
    import subprocess
    import sys

    tracking = json.loads(os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"])["extra"]["tracking_uri"]
    printed = subprocess.run(
        [
            sys.executable,
            str(paths.REPO_ROOT / "scripts" / "backtest_report.py"),
            LINE,
            "--variant",
            "shallow",
            "--tracking-uri",
            tracking,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert f"of {LINE}, variant shallow" in printed.stdout
    assert sum(line.startswith(w["window_end"]) for line in printed.stdout.splitlines() for w in report["windows"]) == 2


def test_an_unknown_variant_fails_the_backfill_naming_the_known_ones(line):
    api, _ = line
    _, latest = latest_interval()
    trained = len(backtest_runs())

    backfill_runs = backfill(
        api, latest - 8 * WEEK, latest - 8 * WEEK, reprocess_behavior="completed", dag_run_conf={"variant": "deep"}
    )

    [run] = backfill_runs
    assert run["state"] == "failed"
    route = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/route").json()
    log = api.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/route/logs/{route['try_number']}",
        params={"full_content": True},
    )
    assert "variant 'deep' is not declared" in log.text and "['baseline', 'shallow']" in log.text, log.text[-1500:]
    assert route["try_number"] == 1 and route["state"] == "failed", "a bad request is not retried"
    assert len(backtest_runs()) == trained


def test_clearing_an_old_run_after_a_newer_promotion_is_superseded(line):
    api, port = line
    state, commits = registry_state(), repo_commits()
    served = devstack.service_version(f"http://127.0.0.1:{port}")
    production = state["aliases"]["production"]
    promoted_runs = {
        e["by"].rpartition("/")[2]
        for tags in state["versions"].values()
        for e in events(tags)
        if e["event"] == "promoted"
    }
    old = [r["dag_run_id"] for r in runs(api) if r["dag_run_id"] in promoted_runs and r["run_type"] != "scheduled"]
    assert old, f"no older run promoted before the newest (the scheduler started them newest first): {promoted_runs}"
    target = old[0]  # it promoted its window once; production has moved past it since

    started = time.monotonic()
    cleared = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns/{target}/clear", json={"dry_run": False})
    cleared.raise_for_status()
    time.sleep(2)  # the run is queued again
    assert wait_until_finished(api, [target]) == {target: "success"}
    seconds = time.monotonic() - started

    states = task_states(api, target)
    assert states["route"] == "skipped" and set(states.values()) == {"skipped"}, states
    assert registry_state()["aliases"] == state["aliases"] and registry_state()["aliases"]["production"] == production
    assert repo_commits() == commits
    assert devstack.service_version(f"http://127.0.0.1:{port}") == served
    route = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{target}/taskInstances/route").json()
    log = api.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{target}/taskInstances/route/logs/{route['try_number']}",
        params={"full_content": True},
    )
    assert log.status_code == 200, log.text
    assert f"superseded by v{production}" in log.text and "nothing deployed" in log.text, log.text[-2000:]
    print(
        f"\ncleared old run {target}: superseded in {seconds:.1f} s from the clear request to the run's end "
        f"(route task {route['duration']:.2f} s), through the scheduler"
    )
