"""The Databricks training operator, through the real provider hook and trigger, against the Jobs 2.2 stand-in.

A tiny git repository stands for this package: ``include/training/fake_train.py`` parses the same
arguments as the real entrypoint and, like it, creates an MLflow run tagged with the run key,
registers a model version and tags the run with it (over MLflow's REST API, so a run costs
milliseconds, not the seconds ``import mlflow`` takes). It fails when ``<control>/fail`` exists and
waits while ``<control>/hold`` exists. The stand-in clones that repository at the commit the
operator pins and runs the file, with an environment that has no MLflow settings but the payload's.

Each deferring ``execute`` runs as Airflow runs it: ``TaskDeferred``, the trigger rebuilt from its
serialised form and run to its first event, then ``execute_complete`` on a fresh operator.

What a user relies on: the run trains the committed code with the same arguments as a local run; a
retry (even after a lost answer) or a re-run of the window never trains twice; a failure says where
to look and why; a killed task cancels its run; no secret value ever reaches the Databricks API.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from mlops_lifecycle import paths
from mlops_lifecycle.config import ModelLineConfig, load_model_line
from mlops_lifecycle.exceptions import LifecycleError, TrainingFailed
from mlops_lifecycle.links import DatabricksRunLink, MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import full_code_revision
from mlops_lifecycle.operators.train_databricks import JOB_DEFINED_REVISION, DatabricksTrainOperator, idempotency_token
from mlops_lifecycle.operators.train_local_process import LocalProcessTrainOperator
from standins.base import Fault
from standins.databricks import DatabricksStandIn
from trigger_events import deferral as defers
from trigger_events import event_of as trigger_event_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "production" / "demand_forecast.yaml"
CONN_ID = "databricks_train_test"
SECRET = "s3cr3t-mlflow-token-value"
SECRET_REF = "{{secrets/mlops/mlflow-token}}"
ENTRYPOINT = "training/fake_train.py"
TIMEOUT_MINUTES = 7
SUBMIT = r"/api/2\.2/jobs/runs/submit"
RUN_NOW = r"/api/2\.2/jobs/run-now"
SNAPSHOT = {"uri": "bq://acme-mlops-prod.mlops_snapshots.demand_forecast__20240112_20260112", "rows": 4242}
INTERVAL = (datetime(2026, 1, 5, 3, tzinfo=UTC), datetime(2026, 1, 12, 3, tzinfo=UTC))

FAKE_TRAIN = '''\
"""Stands for include/training/lifecycle_training.py: same CLI, same MLflow footprint, no model."""

METRICS = ("mape", "rmse", "mae", "r2")

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ("--snapshot", "--run-key", "--model-line", "--experiment", "--registered-model",
             "--production-alias", "--holdout-start", "--window-start", "--window-end", "--target"):
    parser.add_argument(flag, required=True)
parser.add_argument("--params", required=True, type=json.loads)
parser.add_argument("--tags", required=True, type=json.loads)
parser.add_argument("--result-file")
parser.add_argument("--backtest-id")
parser.add_argument("--horizon-end")
args = parser.parse_args()

control = Path(os.environ["FAKE_TRAIN_CONTROL"])
uri = os.environ.get("MLFLOW_TRACKING_URI", "")
token = os.environ.get("MLFLOW_TRACKING_TOKEN", "")
(control / (args.run_key.replace("/", "__") + ".json")).write_text(json.dumps({
    "argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(), "tracking_uri": uri, "token": token,
}))
print("fake training started for " + args.run_key, flush=True)
while (control / "hold").exists():  # the test removes it to let training go on
    time.sleep(0.02)
if (control / "fail").exists():
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: fake training failed on purpose", file=sys.stderr)
    sys.exit(1)
if not uri.startswith("http"):
    print(f"RuntimeError: MLFLOW_TRACKING_URI is not an MLflow server: {uri!r}", file=sys.stderr)
    sys.exit(1)


def call(method, path, body=None):
    url = uri.rstrip("/") + "/api/2.0/mlflow/" + path
    data = None
    if method == "GET":
        url += "?" + urllib.parse.urlencode(body or {})
    else:
        data = json.dumps(body or {}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return {"error": json.loads(exc.read() or b"{}")}


found = call("GET", "experiments/get-by-name", {"experiment_name": args.experiment})
if "error" in found:
    experiment_id = call("POST", "experiments/create", {"name": args.experiment})["experiment_id"]
else:
    experiment_id = found["experiment"]["experiment_id"]
tags = {**args.tags, "lifecycle.run_key": args.run_key, "lifecycle.model_line": args.model_line}
if args.backtest_id:  # backtest mode: evaluated on the horizon, nothing registered
    tags |= {"backtest.id": args.backtest_id, "backtest.horizon_end": args.horizon_end, "backtest.horizon": "complete"}
run = call("POST", "runs/create", {
    "experiment_id": experiment_id,
    "start_time": int(time.time() * 1000),
    "tags": [{"key": k, "value": str(v)} for k, v in tags.items()],
})["run"]
run_id = run["info"]["run_id"]
if args.backtest_id:
    call("POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})
    print(json.dumps({"run_id": run_id}), flush=True)
    sys.exit(0)
call("POST", "registered-models/create", {"name": args.registered_model})
version = call("POST", "model-versions/create", {
    "name": args.registered_model, "source": run["info"]["artifact_uri"] + "/model", "run_id": run_id,
})["model_version"]["version"]
call("POST", "runs/set-tag", {"run_id": run_id, "key": "lifecycle.production_version", "value": "none"})
call("POST", "runs/set-tag", {"run_id": run_id, "key": "lifecycle.registered_version", "value": str(version)})
call("POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})
print(json.dumps({"run_id": run_id, "model_version": str(version)}), flush=True)
'''


# -- helpers -------------------------------------------------------------------------------------
def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip()


@dataclass
class CodeRepo:
    path: Path
    commit: str

    @property
    def include(self) -> Path:
        return self.path / "include"

    @property
    def url(self) -> str:
        return f"file://{self.path}"


@dataclass
class Setup:
    repo: CodeRepo
    standin: DatabricksStandIn
    control: Path
    lines: Path
    mlflow_url: str

    def config(self, edit: Any = None) -> ModelLineConfig:
        """The production example pointed at the fake entrypoint, the stand-in and an MLflow experiment of its own."""
        raw = yaml.safe_load(EXAMPLE.read_text())
        train = raw["train"]
        train.update(
            entrypoint=ENTRYPOINT,
            databricks_conn_id=CONN_ID,
            poll_interval_seconds=0.05,
            timeout_minutes=TIMEOUT_MINUTES,
        )
        train["source"].update(git_url=self.repo.url, include_path="include")
        train.pop("mlflow_token_secret")
        tag = uuid.uuid4().hex[:10]
        raw["registry"].update(experiment=f"/tests/databricks_train/{tag}", model_name=f"dbx_train_{tag}")
        if edit is not None:
            edit(raw)
        path = self.lines / f"{raw['model_line']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_model_line(path)

    def record(self, run_key: str) -> dict[str, Any]:
        """What the fake entrypoint saw (argv, pid, MLflow settings), once it has started."""
        path = self.control / (run_key.replace("/", "__") + ".json")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if path.exists() and path.read_text():
                return json.loads(path.read_text())
            time.sleep(0.02)
        raise AssertionError(f"the entrypoint did not start for {run_key}")

    def request_bodies(self, pattern: str) -> list[dict[str, Any]]:
        return [r.json() for r in self.standin.requests_matching("POST", pattern)]


@pytest.fixture
def code_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CodeRepo:
    """This package as a git repository: include/ with the fake entrypoint and the line's SQL, committed."""
    path = tmp_path / "code"
    (path / "include" / "training").mkdir(parents=True)
    (path / "include" / "sql").mkdir()
    (path / "include" / ENTRYPOINT).write_text(FAKE_TRAIN)
    shutil.copy(REPO / "include" / "sql" / "demand_forecast_features.sql", path / "include" / "sql")
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "training code")
    repo = CodeRepo(path, git(path, "rev-parse", "HEAD"))
    monkeypatch.setenv("MLOPS_INCLUDE_DIR", str(repo.include))
    monkeypatch.setenv("MLOPS_CODE_REVISION", repo.commit)
    return repo


@pytest.fixture(autouse=True)
def _keep_mlflow_token_out_of_os_environ():
    """The registry hook exports a connection's token to ``os.environ``: do not let it leak into other tests."""
    before = os.environ.get("MLFLOW_TRACKING_TOKEN")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    else:
        os.environ["MLFLOW_TRACKING_TOKEN"] = before


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code_repo: CodeRepo, mlflow_server) -> Setup:
    control = tmp_path / "control"
    control.mkdir()
    lines = tmp_path / "model_lines"
    lines.mkdir()
    standin = DatabricksStandIn(
        tmp_path / "databricks",
        secrets={"mlops/mlflow-token": SECRET},
        # the run gets MLflow settings from the payload or not at all
        base_env={"FAKE_TRAIN_CONTROL": str(control), "MLFLOW_TRACKING_URI": "", "MLFLOW_TRACKING_TOKEN": ""},
        pending_seconds=0.05,
    ).start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", standin.airflow_connection_json())
    yield Setup(code_repo, standin, control, lines, mlflow_server.url)
    standin.stop()


def context() -> dict[str, Any]:
    """What the operators read from the Airflow context: ti ids, the data interval, the dag run."""
    return {
        "ti": SimpleNamespace(dag_id="demand_forecast__lifecycle", run_id="scheduled__2026-01-12T03:00:00+00:00"),
        "data_interval_start": INTERVAL[0],
        "data_interval_end": INTERVAL[1],
        "dag_run": SimpleNamespace(run_after=INTERVAL[1]),
    }


def operator(config: ModelLineConfig, **kwargs: Any) -> DatabricksTrainOperator:
    return DatabricksTrainOperator(task_id="train", config=config, snapshot=SNAPSHOT, **kwargs)


def deferral(op: DatabricksTrainOperator) -> TaskDeferred:
    """``execute`` must defer to ``execute_complete``."""
    return defers(lambda: op.execute(context()))


def event_of(deferred: TaskDeferred) -> dict[str, Any]:
    return trigger_event_of(deferred, timeout=20)


def defer(op: DatabricksTrainOperator) -> tuple[TaskDeferred, dict[str, Any]]:
    deferred = deferral(op)
    return deferred, event_of(deferred)


def run_state(event: dict[str, Any]) -> dict[str, Any]:
    return json.loads(event["run_state"])


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def only_run(standin: DatabricksStandIn) -> Any:
    runs = list(standin.runs.values())
    assert len(runs) == 1, f"expected one Databricks run, got {[r.run_id for r in runs]}"
    return runs[0]


# -- the request -----------------------------------------------------------------------------------
def test_idempotency_token_is_short_stable_and_distinct() -> None:
    key = "demand_forecast/20260105T0300-20260112T0300"
    long_key = "a_model_line_with_a_rather_long_name_indeed/" + "20260105T0300-20260112T0300" * 3
    assert idempotency_token(key) == idempotency_token(key)
    assert idempotency_token(key) != idempotency_token(key.replace("0105", "0106"))
    assert all(len(idempotency_token(k)) <= 64 for k in (key, long_key))
    assert idempotency_token(long_key) != idempotency_token(long_key[:-1])


def test_submit_payload_pins_the_commit_and_passes_the_local_arguments(setup, monkeypatch) -> None:
    config = setup.config()
    op = operator(config)
    window = op.window(context())

    with pytest.raises(TaskDeferred):
        op.execute(context())

    [body] = setup.request_bodies(SUBMIT)
    assert body["git_source"] == {"git_url": setup.repo.url, "git_provider": "gitLab", "git_commit": setup.repo.commit}
    assert len(setup.repo.commit) == 40, "a full commit, not an abbreviation"
    [task] = body["tasks"]
    python = task["spark_python_task"]
    assert python["python_file"] == "include/training/fake_train.py"
    assert python["source"] == "GIT"

    # the local adapter's argv for the same context: captured where it would start the process
    captured: list[list[str]] = []

    class Recorder:
        def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
            captured.append(argv)

        def run(self, timeout_seconds: float) -> None:
            pass

    monkeypatch.setattr("mlops_lifecycle.adapters.local_process.LocalProcess", Recorder)
    local = LocalProcessTrainOperator(task_id="train", config=config, snapshot=SNAPSHOT)
    [job] = local.jobs(context(), window)
    local._train(context(), window, job)
    [local_argv] = captured
    local_args = local_argv[2:]  # [python, entrypoint, *args]
    remote_args = python["parameters"]
    flags = lambda args: args[::2]  # noqa: E731
    assert flags(remote_args) == flags(local_args)
    tags = remote_args.index("--tags") + 1
    assert remote_args[:tags] == local_args[:tags] and tags == len(remote_args) - 1
    # the one difference: a remote run records the full commit it checked out, a local one the short form
    remote_tags, local_tags = json.loads(remote_args[tags]), json.loads(local_args[tags])
    assert remote_tags == {**local_tags, "lifecycle.code_revision": setup.repo.commit}
    assert local_tags["lifecycle.code_revision"] == setup.repo.commit[:12]
    assert remote_args[remote_args.index("--run-key") + 1] == window.run_key
    assert remote_args[remote_args.index("--snapshot") + 1] == SNAPSHOT["uri"]

    cluster = task["new_cluster"]
    assert cluster["spark_version"] == "15.4.x-cpu-ml-scala2.12" and cluster["num_workers"] == 0
    assert cluster["spark_env_vars"] == {"MLFLOW_TRACKING_URI": setup.mlflow_url}
    assert task["libraries"] == [{"pypi": {"package": "google-cloud-bigquery==3.47.0"}}]
    assert int(body["timeout_seconds"]) == TIMEOUT_MINUTES * 60
    assert body["idempotency_token"] == idempotency_token(window.run_key)
    assert len(body["idempotency_token"]) <= 64
    assert window.run_key in body["run_name"]

    # the run checked out exactly that commit and ran the file with those arguments
    run = only_run(setup.standin)
    seen = setup.record(window.run_key)
    assert seen["argv"] == remote_args
    assert seen["cwd"] == str(run.directory / "repo" / "include" / "training")
    assert seen["tracking_uri"] == setup.mlflow_url and seen["token"] == ""
    setup.standin.wait(run.run_id)
    assert run.used_commit == setup.repo.commit

    # the same run key gives the same token on any operator instance
    another = operator(config)
    payload = another.run_payload(context(), window, another.jobs(context(), window)[0])
    assert payload["idempotency_token"] == body["idempotency_token"]


def test_token_only_as_a_databricks_secret_reference(setup, monkeypatch) -> None:
    conn = {"conn_type": "http", "password": SECRET, "extra": {"tracking_uri": setup.mlflow_url}}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_WITH_TOKEN", json.dumps(conn))
    config = setup.config(lambda raw: raw["train"].update(mlflow_token_secret="mlops/mlflow-token"))
    op = operator(config, mlflow_conn_id="mlflow_with_token")

    deferred, event = defer(op)

    [body] = setup.request_bodies(SUBMIT)
    env = body["tasks"][0]["new_cluster"]["spark_env_vars"]
    assert env == {"MLFLOW_TRACKING_URI": setup.mlflow_url, "MLFLOW_TRACKING_TOKEN": SECRET_REF}
    for request in setup.standin.log:
        sent = request.body.decode() + json.dumps(request.query) + json.dumps(request.headers)
        assert SECRET not in sent, f"the token's value reached Databricks in {request.method} {request.path}"
    assert SECRET not in json.dumps(deferred.trigger.serialize())
    # Databricks resolves the reference for the process: it reaches MLflow with the token
    assert setup.record(op.window(context()).run_key)["token"] == SECRET
    assert run_state(event)["result_state"] == "SUCCESS"
    assert operator(config, mlflow_conn_id="mlflow_with_token").execute_complete(context(), event)["model_version"]


def test_connection_token_without_secret_reference_is_refused_before_any_request(setup, monkeypatch) -> None:
    conn = {"conn_type": "http", "password": SECRET, "extra": {"tracking_uri": setup.mlflow_url}}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_WITH_TOKEN", json.dumps(conn))
    op = operator(setup.config(), mlflow_conn_id="mlflow_with_token")

    with pytest.raises(LifecycleError, match="train.mlflow_token_secret is not set") as info:
        op.execute(context())

    assert "mlflow_with_token" in str(info.value) and SECRET not in str(info.value)
    assert setup.standin.log == [], "nothing may reach Databricks"
    assert setup.standin.launches == 0


# -- success, retries, re-runs ---------------------------------------------------------------------
def test_success_defers_links_the_run_and_returns_the_candidate(setup) -> None:
    config = setup.config()
    op = operator(config, execution_timeout=timedelta(minutes=90))
    window = op.window(context())

    deferred, event = defer(op)

    run = only_run(setup.standin)
    url = f"{setup.standin.url}/#job/{run.job_id}/run/{run.run_id}"
    assert op.recorded_links == {DatabricksRunLink.key: url}
    assert DatabricksRunLink().get_link(op, ti_key=None) == url
    assert deferred.trigger.run_id == run.run_id and deferred.trigger.polling_period_seconds == 0.05
    assert deferred.timeout == timedelta(minutes=90), "the deferred wait ends with the task's execution_timeout"
    assert event["run_id"] == run.run_id and event["run_page_url"] == url
    assert run_state(event)["result_state"] == "SUCCESS" and event["errors"] == []

    fresh = operator(config)  # the task resumes in a new process
    candidate = fresh.execute_complete(context(), event)

    printed = json.loads((run.driver_log.read_text().strip().splitlines())[-1])
    assert candidate["model_version"] == printed["model_version"] == "1"
    assert candidate["run_id"] == printed["run_id"]
    assert candidate["run_key"] == window.run_key
    assert candidate["model_name"] == config.registry.model_name
    assert candidate["code_revision"] == setup.repo.commit
    assert candidate["snapshot"] == SNAPSHOT["uri"] and candidate["production_version"] is None
    assert fresh.recorded_links[DatabricksRunLink.key] == url
    assert candidate["run_id"] in fresh.recorded_links[MlflowRunLink.key]
    assert fresh.recorded_links[MlflowModelVersionLink.key].endswith(f"/versions/{candidate['model_version']}")
    assert setup.standin.launches == 1


def test_retry_after_the_submit_answer_was_lost_attaches_to_the_same_run(setup) -> None:
    config = setup.config()
    (setup.control / "hold").write_text("")  # still training when the retry comes
    # every answer to the first attempt's submits is lost (the hook retries 3 times): the attempt fails
    setup.standin.inject("POST", SUBMIT, Fault.drop_after(), times=3)
    with pytest.raises(AirflowException, match="failed 3 times"):
        operator(config).execute(context())
    assert setup.standin.count("POST", SUBMIT) == 3
    run = only_run(setup.standin)  # Databricks acted on the first one

    retry = operator(config)  # Airflow's retry of the task: the same run key
    deferred = deferral(retry)
    assert deferred.trigger.run_id == run.run_id
    (setup.control / "hold").unlink()
    event = event_of(deferred)

    assert setup.standin.count("POST", SUBMIT) == 4
    assert setup.standin.launches == 1, "one training process for one run key"
    assert operator(config).execute_complete(context(), event)["model_version"] == "1"


def test_a_backtest_window_trains_the_baseline_then_the_variant_one_databricks_run_each(setup) -> None:
    """A backfill of a variant: one task, two Databricks runs in turn (deferring on each), nothing registered."""

    def with_variant(raw: dict[str, Any]) -> None:
        raw["backtest"] = {"variants": {"deeper": {"parameters": {"max_depth": 9}}}}

    config = setup.config(with_variant)
    backfill = {**context(), "dag_run": SimpleNamespace(run_after=INTERVAL[1], conf={"variant": "deeper"})}

    def op() -> DatabricksTrainOperator:
        return operator(config, backtest=True)

    baseline, variant = op().jobs(backfill, op().window(backfill))
    assert (baseline.variant, variant.variant) == ("baseline", "deeper")
    first = defers(lambda: op().execute(backfill))
    assert first.kwargs == {"run_key": baseline.run_key}
    second = defers(lambda: op().execute_complete(backfill, event_of(first), **first.kwargs))
    assert second.kwargs == {"run_key": variant.run_key}, "after the baseline, the variant: in the same task"
    assert len(setup.standin.runs) == 2
    retried = defers(lambda: op().execute(backfill))  # a retry of the task while the variant trains
    assert retried.kwargs == second.kwargs and retried.trigger.run_id == second.trigger.run_id
    assert len(setup.standin.runs) == 2, "the retry attached to the variant's run"
    event_of(second)
    assert setup.standin.launches == 2

    jobs, pending = op().pending(backfill, op().window(backfill))
    assert pending is None, "both trained"
    runs = [op().trained_run(job, required=True) for job in jobs]
    assert [r.data.tags["backtest.id"] for r in runs] == [baseline.backtest_id, variant.backtest_id]
    assert baseline.experiment == variant.experiment == config.backtest_experiment
    assert op().registry.client.search_model_versions(f"name='{config.registry.model_name}'") == [], (
        "nothing registered"
    )

    def params(job: Any) -> dict[str, Any]:
        argv = setup.record(job.run_key)["argv"]
        return json.loads(argv[argv.index("--params") + 1])

    assert params(variant)["max_depth"] == 9 and params(baseline).get("max_depth") != 9


def test_rerun_after_the_run_registered_sends_nothing_to_databricks(setup) -> None:
    config = setup.config()
    _, event = defer(operator(config))
    first = operator(config).execute_complete(context(), event)
    requests = len(setup.standin.log)

    again = operator(config).execute(context())  # a cleared task, or a retry after execute_complete

    assert again == first
    assert len(setup.standin.log) == requests, "the MLflow run of this run key is reused: no request at all"
    assert setup.standin.launches == 1


# -- failure and cancellation ----------------------------------------------------------------------
def test_failed_run_raises_with_the_run_page_and_the_entrypoint_error(setup) -> None:
    (setup.control / "fail").write_text("")
    config = setup.config()
    op = operator(config)
    _, event = defer(op)
    url = op.recorded_links[DatabricksRunLink.key]

    with pytest.raises(TrainingFailed) as info:
        operator(config).execute_complete(context(), event)

    message = str(info.value)
    assert url in message
    assert "ValueError: fake training failed on purpose" in message
    assert "TERMINATED/FAILED" in message and op.window(context()).run_key in message
    assert "Registry unchanged" in message


def test_retry_after_a_failed_run_trains_again(setup) -> None:
    (setup.control / "fail").write_text("")
    config = setup.config()
    _, event = defer(operator(config))
    with pytest.raises(TrainingFailed):
        operator(config).execute_complete(context(), event)
    (setup.control / "fail").unlink()  # e.g. a flaky source, or a fix committed and the task cleared

    _, event = defer(operator(config))  # Airflow's retry (retries: 2 in the example)

    assert setup.standin.launches == 2, "the retry re-attached to the failed run: retries can never succeed"
    assert operator(config).execute_complete(context(), event)["model_version"] == "1"


def test_on_kill_cancels_the_databricks_run(setup) -> None:
    (setup.control / "hold").write_text("")
    op = operator(setup.config())
    with pytest.raises(TaskDeferred):
        op.execute(context())
    run = only_run(setup.standin)
    pid = setup.record(op.window(context()).run_key)["pid"]
    assert setup.standin.run_state(run.run_id)["life_cycle_state"] == "RUNNING"

    op.on_kill()

    state = setup.standin.wait(run.run_id, timeout=10)
    assert (state["life_cycle_state"], state["result_state"]) == ("TERMINATED", "CANCELED")
    assert setup.standin.count("POST", r"/api/2\.2/jobs/runs/cancel") == 1
    assert pid_gone(pid), "a cancelled run must not leave its training process behind"


def test_killed_while_deferred_the_trigger_cancels_the_run(setup) -> None:
    (setup.control / "hold").write_text("")
    op = operator(setup.config())
    classpath, kwargs = deferral(op).trigger.serialize()
    module, _, name = classpath.rpartition(".")
    trigger = getattr(importlib.import_module(module), name)(**kwargs)  # in the triggerer, not the worker
    run = only_run(setup.standin)
    pid = setup.record(op.window(context()).run_key)["pid"]

    asyncio.run(trigger.on_kill())  # the user marks the deferred task failed, or clears it

    state = setup.standin.wait(run.run_id, timeout=10)
    assert (state["life_cycle_state"], state["result_state"]) == ("TERMINATED", "CANCELED")
    assert pid_gone(pid)


def test_on_kill_before_submitting_sends_nothing(setup) -> None:
    operator(setup.config()).on_kill()
    assert setup.standin.log == []


# -- run-now of an existing job --------------------------------------------------------------------
def create_job(setup: Setup, **git: str) -> int:
    from airflow.providers.databricks.hooks.databricks import DatabricksHook

    return DatabricksHook(CONN_ID).create_job(
        {
            "name": "demand_forecast-train",
            "git_source": {"git_url": setup.repo.url, "git_provider": "gitLab", **git},
            "tasks": [
                {
                    "task_key": "train",
                    "spark_python_task": {"python_file": "include/" + ENTRYPOINT, "source": "GIT", "parameters": []},
                    "new_cluster": {
                        "spark_version": "15.4.x-cpu-ml-scala2.12",
                        "num_workers": 0,
                        "spark_env_vars": {"MLFLOW_TRACKING_URI": setup.mlflow_url},
                    },
                }
            ],
        }
    )


def job_config(setup: Setup, job_id: int) -> ModelLineConfig:
    def edit(raw: dict[str, Any]) -> None:
        for key in ("cluster", "source", "libraries", "task"):
            raw["train"].pop(key, None)
        raw["train"]["job_id"] = job_id

    return setup.config(edit)


def test_run_now_passes_the_same_arguments_as_python_params_once(setup) -> None:
    job_id = create_job(setup, git_commit=setup.repo.commit)
    config = job_config(setup, job_id)
    op = operator(config)
    window = op.window(context())

    (setup.control / "hold").write_text("")
    deferred = deferral(op)
    retry = deferral(operator(config))  # a retry of the task while the run is running
    (setup.control / "hold").unlink()
    event = event_of(retry)

    bodies = setup.request_bodies(RUN_NOW)
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    body = bodies[0]
    assert int(body["job_id"]) == job_id
    # the job checks out its own git_source: the revision is read back from the run when it ends
    job = op.jobs(context(), window)[0]
    assert body["python_params"] == op.entrypoint_args(context(), window, job, JOB_DEFINED_REVISION)
    assert body["idempotency_token"] == idempotency_token(window.run_key)
    assert set(body) == {"job_id", "python_params", "idempotency_token"}
    assert setup.request_bodies(SUBMIT) == []
    run = only_run(setup.standin)
    assert deferred.trigger.run_id == retry.trigger.run_id == run.run_id
    assert setup.standin.launches == 1
    assert setup.record(window.run_key)["argv"] == body["python_params"]

    candidate = operator(config).execute_complete(context(), event)
    assert candidate["model_version"] == "1" and candidate["run_key"] == window.run_key
    assert candidate["code_revision"] == setup.repo.commit
    assert op.recorded_links[DatabricksRunLink.key] == f"{setup.standin.url}/#job/{job_id}/run/{run.run_id}"


def test_run_now_audit_revision_is_the_commit_that_trained(setup) -> None:
    (setup.repo.include / "training" / "helper.py").write_text("CHANGED = True\n")
    git(setup.repo.path, "add", ".")
    git(setup.repo.path, "commit", "--quiet", "-m", "a later change on main")
    job_id = create_job(setup, git_branch="main")  # the job follows the branch, as jobs usually do
    config = job_config(setup, job_id)

    _, event = defer(operator(config))
    used = only_run(setup.standin).used_commit
    assert used != setup.repo.commit  # MLOPS_CODE_REVISION still names the first commit

    try:
        candidate = operator(config).execute_complete(context(), event)
    except LifecycleError as exc:  # refusing a run of other code is a fix too, if it says which commit ran
        assert used in str(exc)
    else:
        assert candidate["code_revision"] == used


# -- one-time runs on an existing cluster, and the git path of the entrypoint ------------------------
def test_existing_cluster_run_reaches_the_configured_mlflow_or_is_refused(setup) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["train"].pop("cluster")
        raw["train"]["existing_cluster_id"] = "0105-030000-abcdefgh"

    config = setup.config(edit)
    try:
        _, event = defer(operator(config))
    except LifecycleError as exc:  # refusing before any request is a fix too
        assert "existing_cluster_id" in str(exc) and setup.standin.log == []
        return
    candidate = operator(config).execute_complete(context(), event)
    assert candidate["model_version"] == "1"


def test_python_file_is_relative_when_include_is_the_repository_root(setup) -> None:
    config = setup.config(lambda raw: raw["train"]["source"].update(include_path=""))
    op = operator(config)

    window = op.window(context())
    payload = op.run_payload(context(), window, op.jobs(context(), window)[0])

    assert payload["tasks"][0]["spark_python_task"]["python_file"] == ENTRYPOINT


def test_notebook_and_wheel_tasks_carry_the_same_arguments(setup) -> None:
    """The stand-in runs only Python files; the other task types are checked as the requests we send."""
    notebook = operator(setup.config(lambda raw: raw["train"].update(task="notebook")))
    window = notebook.window(context())
    args = notebook.entrypoint_args(context(), window, notebook.jobs(context(), window)[0], setup.repo.commit)
    task = notebook.run_payload(context(), window, notebook.jobs(context(), window)[0])["tasks"][0]
    assert task["notebook_task"] == {
        "notebook_path": "include/" + ENTRYPOINT.removesuffix(".py"),
        "base_parameters": {"argv": json.dumps(args)},
        "source": "GIT",
    }

    wheel = {"package_name": "mlops_training", "entry_point": "demand_forecast"}
    op = operator(setup.config(lambda raw: raw["train"].update(task="wheel", wheel=wheel)))
    payload = op.run_payload(context(), window, op.jobs(context(), window)[0])
    args = op.entrypoint_args(context(), window, op.jobs(context(), window)[0], setup.repo.commit)
    assert payload["tasks"][0]["python_wheel_task"] == {**wheel, "parameters": args}
    assert payload["git_source"]["git_commit"] == setup.repo.commit and setup.standin.log == []


# -- the code revision a remote run checks out -----------------------------------------------------
def test_full_code_revision_reads_git_and_refuses_a_dirty_checkout(code_repo, monkeypatch) -> None:
    monkeypatch.delenv("MLOPS_CODE_REVISION")
    assert paths.include_dir() == code_repo.include.resolve()
    assert full_code_revision() == code_repo.commit

    entrypoint = code_repo.include / ENTRYPOINT
    entrypoint.write_text(FAKE_TRAIN + "# an uncommitted edit\n")
    with pytest.raises(LifecycleError) as info:
        full_code_revision()
    message = str(info.value)
    assert f"{code_repo.commit}-dirty" in message
    assert "commit (and push)" in message and str(code_repo.include) in message and "MLOPS_CODE_REVISION" in message

    git(code_repo.path, "checkout", "--quiet", "--", ".")
    (code_repo.include / "training" / "new_helper.py").write_text("X = 1\n")  # untracked counts too
    with pytest.raises(LifecycleError, match="-dirty"):
        full_code_revision()

    monkeypatch.setenv("MLOPS_CODE_REVISION", "f" * 40)  # an image built without .git says what it holds
    assert full_code_revision() == "f" * 40


def test_full_code_revision_refuses_a_folder_outside_git(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLOPS_CODE_REVISION", raising=False)
    monkeypatch.setenv("MLOPS_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(LifecycleError, match="not a git checkout"):
        full_code_revision()


def test_dirty_checkout_is_refused_before_any_request(setup, monkeypatch) -> None:
    config = setup.config()
    monkeypatch.delenv("MLOPS_CODE_REVISION")
    (setup.repo.include / ENTRYPOINT).write_text(FAKE_TRAIN + "# an uncommitted edit\n")

    with pytest.raises(LifecycleError, match="-dirty"):
        operator(config).execute(context())

    assert setup.standin.log == []
