"""The production-shaped lifecycle under a real `airflow standalone`: how many worker slots do its waits hold?

`prod_demand__lifecycle` (BigQuery, Databricks, GitLab review and CI: the stand-ins of
``test_production_lifecycle_e2e``) runs under `airflow standalone` (API server, scheduler, DAG
processor, triggerer, LocalExecutor). The stand-ins are HTTP servers on loopback threads of this
process, and their connections are ``AIRFLOW_CONN_*`` variables of this process's environment, which
the standalone's processes inherit. No simulated reviewer: the test leaves the merge request open,
unapproved, for a few seconds, then approves and merges it itself; the CI's steps are slowed down so
the pipeline and deployment waits last long enough to sample.

While the run goes, the test samples, several times a second: the state of every task instance of the
run (and, when deferred, its trigger and triggerer), the ``default_pool``'s running slots, the run's
running task instances, and the LocalExecutor worker processes busy with a workload (read from their
process titles in /proc). It prints a table per task and state (the samples are kept as JSON in the
Airflow home), and asserts that no deferred task held a pool slot or a running task instance, that a
worker still finishing a task that had deferred or succeeded let go within the supervisor's poll
interval and no worker was busy for the rest of the review and pipeline waits, and that the sampler
does see the slot and the worker a running task holds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from test_airflow_standalone import wait_for
from test_production_lifecycle_e2e import DAG_ID, ProductionStack, window

import devstack
from standalone import session_processes, start_standalone

# A registered model of its own, so the MLflow server the session shares with
# test_production_lifecycle_e2e (which counts versions of "prod_demand") is left as that test expects.
MODEL_NAME = "prod_demand_standalone"
LOGICAL_DATE = window(2, 11)  # Monday 2026-11-02 03:00 UTC, on the line's cron: a fixed, real data window
REVIEW_IDLE_SECONDS = 5.0  # the MR stays open and unapproved this long once a triggerer watches it
APPROVED_UNMERGED_SECONDS = 1.5  # then approved but not merged yet
CI_STEP_SECONDS = 2.5  # 5 CI steps (start, test job, dev, staging, production): a pipeline of ~13 s
SAMPLE_EVERY = 0.25
WAITS = ("await_merge", "await_pipeline", "await_deployments")
# after a task defers or succeeds, its LocalExecutor worker may stay busy up to [workers]
# min_heartbeat_interval (5 s) more: the task SDK supervisor can notice its child's exit late, when
# its select() times out
WORKER_RELEASE_SECONDS = 7.0
WORKER_TITLE = "airflow worker -- LocalExecutor:"
PROC_TITLES = sys.platform == "linux"  # worker titles are read from /proc (Airflow skips setproctitle on macOS)


@pytest.fixture
def production(stack, tmp_path_factory):  # noqa: ANN001, ANN201
    """The stand-ins with no simulated reviewer and a slow CI; the line's YAML points at them."""
    monkeypatch = pytest.MonkeyPatch()
    prod = None
    try:
        prod = ProductionStack(tmp_path_factory.mktemp("standalone-production"), monkeypatch)
        prod.gitlab.auto_review = None  # the test plays the reviewer, at a chosen time
        prod.gitlab.ci.step_seconds = CI_STEP_SECONDS
        prod.write(registry={"model_name": MODEL_NAME, "experiment": f"/e2e/{MODEL_NAME}"})
        yield prod
    finally:
        if prod is not None:
            prod.stop()  # also stops the model service the CI started
        monkeypatch.undo()


@pytest.fixture
def standalone(production):  # noqa: ANN001, ANN201
    """`airflow standalone` over this process's environment (stand-in connections included).

    ``standalone.start_standalone``, as ``test_airflow_standalone.api`` uses it, plus
    ``[scheduler] use_job_schedule = False``: unpausing the DAG must not add the latest scheduled
    run beside the manual one under test (catchup=False still creates one).
    """
    with start_standalone(
        "standalone-production.log", extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    ) as started:
        print(f"\nairflow standalone healthy after {started.healthy_after:.0f} s")
        yield started


@dataclass
class Sample:
    at: float  # seconds since the run was triggered
    states: dict[str, str | None]  # task id -> state, read before the slot counts
    states_after: dict[str, str | None]  # ... and after: a sample counts for a state only if both agree
    pool_running: int
    pool_deferred: int
    run_running: int  # task instances of the run in `running`
    busy: list[str]  # task instance ids a LocalExecutor worker is busy with (from its process title)
    ti_ids: dict[str, str]  # task id -> task instance id
    triggerer: dict[str, str]  # deferred task -> "<trigger class> @ <triggerer job>" once a triggerer holds it

    def task_of(self, ti_id: str) -> str:
        return next((task for task, known in self.ti_ids.items() if known == ti_id), ti_id)


def _task_instances(api: httpx.Client, run_id: str) -> list[dict]:
    response = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return response.json()["task_instances"]


def _busy_workers(sid: int) -> list[str]:
    """LocalExecutor workers titled ``airflow worker -- LocalExecutor: <ti id>`` (idle ones say ``<idle>``).

    A worker forks the task process, which keeps the title for a moment: count task instances, not pids.
    """
    titles = session_processes(sid).values()
    return sorted({t.removeprefix(WORKER_TITLE).strip() for t in titles if t.startswith(WORKER_TITLE)} - {"<idle>"})


def _sample(api: httpx.Client, run_id: str, sid: int, started: float) -> Sample:
    before = _task_instances(api, run_id)
    pool = api.get("/api/v2/pools/default_pool").json()
    busy = _busy_workers(sid)
    after = _task_instances(api, run_id)
    triggerer = {
        ti["task_id"]: f"{ti['trigger']['classpath'].rsplit('.', 1)[-1]} @ {job['job_type']} {job['id']}"
        for ti in after
        if ti["state"] == "deferred" and ti.get("trigger") and (job := ti.get("triggerer_job"))
    }
    return Sample(
        at=time.monotonic() - started,
        states={ti["task_id"]: ti["state"] for ti in before},
        states_after={ti["task_id"]: ti["state"] for ti in after},
        pool_running=pool["running_slots"],
        pool_deferred=pool["deferred_slots"],
        run_running=sum(ti["state"] == "running" for ti in after),
        busy=busy,
        ti_ids={ti["task_id"]: ti["id"] for ti in after},
        triggerer=triggerer,
    )


@dataclass
class Row:
    """The samples of one task in one state (one stretch or several: a task runs, defers, resumes)."""

    task: str
    state: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.samples[-1].at - self.samples[0].at

    def most(self, what: str) -> int:
        return max(len(v) if isinstance(v := getattr(s, what), list) else v for s in self.samples)

    def tail(self) -> tuple[float, list[str]]:
        """(seconds into this stretch until the last sample with a busy worker, whose workers those were).

        Deferred: the LocalExecutor workers still finishing after their task reported its state, this
        task's own (it deferred) or the previous task's (it succeeded), before the wait goes quiet.
        """
        busy = [s for s in self.samples if s.busy]
        if not busy:
            return 0.0, []
        whose = {s.task_of(ti_id) for s in busy for ti_id in s.busy}
        return busy[-1].at - self.samples[0].at, sorted(whose)

    def steady(self) -> list[Sample]:
        """The samples after the last one with a busy worker: no worker at all was busy."""
        busy = [i for i, s in enumerate(self.samples) if s.busy]
        return self.samples[busy[-1] + 1 :] if busy else self.samples

    @property
    def trigger(self) -> str:
        return next((s.triggerer[self.task] for s in self.samples if self.task in s.triggerer), "")


def _rows(samples: list[Sample]) -> dict[tuple[str, str], Row]:
    """Samples grouped by (task, state), for the states that hold a slot or are the point: deferred."""
    rows: dict[tuple[str, str], Row] = {}
    for s in samples:
        for task, state in s.states.items():
            if state in ("deferred", "running") and s.states_after.get(task) == state:
                rows.setdefault((task, state), Row(task, state)).samples.append(s)
    return rows


def _table(rows: dict[tuple[str, str], Row], order: list[str]) -> str:
    cols = (
        ("task", 17, "<"),
        ("state", 8, "<"),
        ("samples", 7, ">"),
        ("seconds", 7, ">"),
        ("pool running slots", 18, ">"),
        ("run TIs running", 15, ">"),
        ("busy workers", 12, ">"),
        ("worker tail s", 13, ">"),
        ("then 0 busy", 11, ">"),
        ("trigger @ triggerer / tail of", 0, "<"),
    )
    lines = ["  ".join(f"{name:{align}{width}}" for name, width, align in cols).rstrip()]
    lines.append("-" * len(lines[0]))
    for (task, state), row in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        deferred = state == "deferred"
        tail, whose = row.tail()
        values = (
            task,
            state,
            len(row.samples),
            f"{row.seconds:.1f}",
            row.most("pool_running"),
            row.most("run_running"),
            row.most("busy"),
            f"{tail:.1f}" if deferred else "-",
            len(row.steady()) if deferred else "-",
            f"{row.trigger}" + (f" / {'+'.join(whose)}" if deferred and whose else ""),
        )
        lines.append("  ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(values, cols, strict=True)).rstrip())
    return "\n".join(lines)


def _trigger_log(run_id: str, task: str) -> list[tuple[float, str]]:
    """What the triggerer logged while it held the task's trigger: (seconds since it started, message)."""
    folder = Path(os.environ["AIRFLOW_HOME"]) / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task}"
    events = []
    for path in sorted(folder.glob("attempt=*.log.trigger.*.log")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            events.append((at, str(record.get("event", ""))))
    return [(at - events[0][0], event) for at, event in events] if events else []


def test_production_lifecycle_waits_hold_no_worker_slots_under_standalone(production, standalone):
    prod, api = production, standalone.api
    wait_for("the DAG to be parsed", lambda: api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, timeout=120)
    assert api.get("/api/v2/importErrors").json()["total_entries"] == 0
    api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
    response = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": LOGICAL_DATE.isoformat()})
    response.raise_for_status()
    run = response.json()
    run_id = run["dag_run_id"]
    assert run["data_interval_end"] > run["data_interval_start"], "a real data window"

    samples: list[Sample] = []
    started = time.monotonic()
    deadline = started + 240
    watched_at = approved_at = None  # when a triggerer took the MR wait; when alice approved
    iid = None
    run_state = "queued"
    while True:
        s = _sample(api, run_id, standalone.session_id, started)
        samples.append(s)
        now = time.monotonic()
        # play the reviewer: nobody looks at the MR for a while after the triggerer starts watching it,
        # then alice approves, then (a little later) merges, which starts the pipeline
        if iid is None and "await_merge" in s.triggerer:
            (mr,) = prod.gitlab.merge_requests
            assert mr["state"] == "opened" and mr["author"]["username"] == "mlops-bot", mr
            iid, watched_at = mr["iid"], now
        elif iid is not None and approved_at is None and now - watched_at >= REVIEW_IDLE_SECONDS:
            prod.gitlab.approve(iid, "alice")
            approved_at = now
        elif approved_at is not None and now - approved_at >= APPROVED_UNMERGED_SECONDS:
            if prod.gitlab.merge_requests[0]["state"] == "opened":
                prod.gitlab.merge(iid, "alice")
        run_state = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        if run_state in ("success", "failed"):
            break
        assert now < deadline, f"run still {run_state} after 240 s: {s.states}"
        time.sleep(SAMPLE_EVERY)
    wall = time.monotonic() - started

    final = _task_instances(api, run_id)
    order = [ti["task_id"] for ti in sorted(final, key=lambda ti: (ti["start_date"] or "~", ti["task_id"]))]
    rows = _rows(samples)
    (Path(os.environ["AIRFLOW_HOME"]) / "standalone-production-samples.json").write_text(
        json.dumps([vars(x) for x in samples], indent=1)
    )
    every = wall / len(samples)
    print(f"\n{DAG_ID} run {run_id}: {run_state} in {wall:.0f} s, {len(samples)} samples (one every {every:.2f} s)")
    print(_table(rows, order))
    for task in WAITS:
        seen = [
            f"+{at:.1f} s " + ("event fired" if event == "Trigger fired event" else event.split(": ", 1)[-1])
            for at, event in _trigger_log(run_id, task)
            if ": " in event or event == "Trigger fired event"
        ]
        print(f"triggerer saw, {task}: " + "; ".join(seen))
    assert run_state == "success", {ti["task_id"]: ti["state"] for ti in final}

    # nothing deferred held a pool slot or a running task instance; each wait was sampled deferred
    for (task, state), row in rows.items():
        if state == "deferred":
            assert row.most("pool_running") == 0 and row.most("run_running") == 0, (task, row.samples)
    for task in WAITS:
        if task == "await_deployments" and (task, "deferred") not in rows:
            continue  # the pipeline ends with the last deployment: its first poll may already succeed
        assert (task, "deferred") in rows, f"{task} was never seen deferred"
    unapproved = [at for at, event in _trigger_log(run_id, "await_merge") if "approved by nobody" in event]
    approved = [at for at, event in _trigger_log(run_id, "await_merge") if "approved by alice" in event]
    assert unapproved and approved and approved[0] - unapproved[0] >= REVIEW_IDLE_SECONDS - 1.5
    # ... while the same sampler does see the slot a running task holds
    running = [row for (_, state), row in rows.items() if state == "running"]
    assert max(r.most("pool_running") for r in running) >= 1
    if PROC_TITLES:
        # a worker is busy while its task runs; once the task has deferred (or the previous one has
        # succeeded) the worker lets go within the supervisor's poll interval, and for the rest of the
        # review and pipeline waits no worker at all is busy
        assert max(r.most("busy") for r in running) >= 1
        for task in WAITS:
            if (task, "deferred") in rows:
                row = rows[task, "deferred"]
                assert row.tail()[0] <= WORKER_RELEASE_SECONDS, (task, row.tail())
                for s in row.samples:  # a busy worker here is finishing a task that no longer runs
                    assert all(s.states_after[s.task_of(ti_id)] != "running" for ti_id in s.busy), (task, s)
        for task in ("await_merge", "await_pipeline"):
            assert len(rows[task, "deferred"].steady()) >= 3, (task, rows[task, "deferred"].tail())

    # the review and the CI finished, and production moved
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    reg = MlflowRegistryHook()
    aliases = reg.aliases(MODEL_NAME)
    assert aliases["production"] == aliases["staging"] == "1"
    tags = reg.version_tags(MODEL_NAME, "1")
    assert tags["audit.approved_by"] == "alice"
    assert tags["audit.promoted_by"] == f"airflow:{DAG_ID}/{run_id}"
    (mr,) = prod.gitlab.merge_requests
    assert mr["state"] == "merged" and tags["audit.merge_commit"] == mr["merge_commit_sha"]
    assert [env for env, _ in prod.deployed] == ["dev", "staging", "production"]
    assert devstack.service_version(prod.service_url)["model_version"] == "1"
