"""Production only moves forward, through the real scheduler: overlapping runs, backfills and cleared runs.

One `airflow standalone` (API server, scheduler, DAG processor, triggerer, LocalExecutor) serves every
scenario; runs are created the way users create them, through the REST API. The invariants:
- runs of one line never overlap (the single writer of its aliases and deployment repository);
- production's data window only ever moves forward, whatever order the runs start in;
- a backfill run (a backtest) never trains a registered version, moves an alias, touches the deployment
  repository or the service;
- clearing an old run after a newer promotion ends skipped ("superseded") and changes nothing.
"""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime, timedelta

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
    data.update(model_line=LINE, retries=0)
    data["schedule"].update(cron=CRON, timezone="UTC", catchup=False)
    data["registry"].update(model_name=LINE, experiment=f"/e2e/{LINE}")
    data["train"]["parameters"].update(max_iter=40)
    data["review"].update(auto_approve=True, reviewers=[])
    data["deploy"].update(port=port, verify_timeout_seconds=120, poll_interval_seconds=0.5)
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


def test_a_backfill_is_a_backtest_and_changes_nothing(line):
    api, port = line
    _, latest = latest_interval()
    state, commits = registry_state(), repo_commits()
    served = devstack.service_version(f"http://127.0.0.1:{port}")
    created = api.post(
        "/api/v2/backfills",
        json={
            "dag_id": DAG_ID,
            "from_date": (latest - 7 * WEEK).isoformat(),
            "to_date": (latest - 4 * WEEK).isoformat(),
            "reprocess_behavior": "none",
            "max_active_runs": 2,
        },
    )
    created.raise_for_status()
    backfill_id = created.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        backfill_runs = [r for r in runs(api) if r["run_type"] == "backfill"]
        if len(backfill_runs) >= 4 and all(r["state"] in ("success", "failed") for r in backfill_runs):
            break
        assert time.monotonic() < deadline, f"backfill {backfill_id} did not finish: {backfill_runs}"
        time.sleep(1)

    assert len(backfill_runs) == 4 and {r["state"] for r in backfill_runs} == {"success"}
    for run in backfill_runs:
        states = task_states(api, run["dag_run_id"])
        assert states["route"] == "skipped" and set(states.values()) == {"skipped"}, states
    assert registry_state() == state, "a backfill changed the registry"
    assert repo_commits() == commits, "a backfill touched the deployment repository"
    assert devstack.service_version(f"http://127.0.0.1:{port}") == served
    reg = registry()
    experiment = reg.client.get_experiment_by_name(f"/e2e/{LINE}")
    for run in backfill_runs:
        end = datetime.fromisoformat(run["data_interval_end"]).astimezone(UTC)
        key = f"{LINE}/{end - WEEK:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}"
        trained = reg.client.search_runs([experiment.experiment_id], f"tags.`lifecycle.run_key` = '{key}'")
        assert trained == [], f"backfill run {run['dag_run_id']} trained"


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
