"""The Databricks stand-in, driven through the real apache-airflow-providers-databricks hook and operators.

A tiny git repository stands for the training code: its script records its argv, environment and
working directory, can sleep, fail or print a secret. What a user of the training adapter relies on:
one run per idempotency token, a cancelled run leaves no process behind, a failure says why, secrets
reach the process but never the API, and the deferrable (async) path sees the same states.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException, TaskDeferred
from airflow.providers.databricks.exceptions import DatabricksApiError
from airflow.providers.databricks.hooks.databricks import DatabricksHook
from airflow.providers.databricks.operators.databricks import DatabricksRunNowOperator, DatabricksSubmitRunOperator
from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger

from standins.databricks import DatabricksStandIn
from trigger_events import provider_context

CONN_ID = "databricks_test"
SECRET = "s3cr3t-mlflow-token-value"
SECRET_REF = "{{secrets/mlops/mlflow-token}}"

SCRIPT = """\
import argparse, json, os, sys, time
from pathlib import Path

import helper  # a sibling module: the script's folder is on sys.path, as for the real entrypoints

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0)
parser.add_argument("--print-secret", action="store_true")
parser.add_argument("--window", default="")
args = parser.parse_args()
Path(args.out).write_text(json.dumps({
    "argv": sys.argv[1:],
    "pid": os.getpid(),
    "cwd": os.getcwd(),
    "version": helper.VERSION,
    "mlflow_token": os.environ.get("MLFLOW_TRACKING_TOKEN"),
    "bigquery": os.environ.get("BIGQUERY_EMULATOR_HOST"),
    "airflow_vars": sorted(k for k in os.environ if k.startswith("AIRFLOW")),
}))
print("training started", flush=True)
if args.print_secret:
    print("token is " + os.environ["MLFLOW_TRACKING_TOKEN"], flush=True)
time.sleep(args.sleep)
if args.exit:
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: the data window has no rows", file=sys.stderr)
    sys.exit(args.exit)
print(json.dumps({"status": "ok"}))
"""


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module")
def code_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A git repo with ``training/train.py``; returns (path, first commit). A later commit changes the code."""
    repo = tmp_path_factory.mktemp("code")
    (repo / "training").mkdir()
    (repo / "training" / "train.py").write_text(SCRIPT)
    (repo / "training" / "helper.py").write_text('VERSION = "v1"\n')
    _git(repo, "init", "--quiet", "--initial-branch=main")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "v1")
    first = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "training" / "helper.py").write_text('VERSION = "v2"\n')
    _git(repo, "commit", "--quiet", "-am", "v2")
    return repo, first


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DatabricksStandIn:
    server = DatabricksStandIn(
        tmp_path / "databricks",
        secrets={"mlops/mlflow-token": SECRET},
        base_env={"BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050"},
        pending_seconds=0.1,
    ).start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", server.airflow_connection_json())
    yield server
    server.stop()


@pytest.fixture
def hook(standin: DatabricksStandIn) -> DatabricksHook:
    return DatabricksHook(CONN_ID, retry_limit=2, retry_delay=0.1)


def _payload(repo: tuple[Path, str], out: Path, *args: str, token: str | None = None, **extra: Any) -> dict[str, Any]:
    path, commit = repo
    payload: dict[str, Any] = {
        "run_name": "train demand_forecast",
        "git_source": {"git_url": f"file://{path}", "git_provider": "gitLab", "git_commit": commit},
        "tasks": [
            {
                "task_key": "train",
                "spark_python_task": {
                    "python_file": "training/train.py",
                    "source": "GIT",
                    "parameters": ["--out", str(out), *args],
                },
                "new_cluster": {
                    "spark_version": "15.4.x-cpu-ml-scala2.12",
                    "node_type_id": "i3.xlarge",
                    "num_workers": 0,
                    "spark_env_vars": {"MLFLOW_TRACKING_TOKEN": SECRET_REF},
                },
            }
        ],
        **extra,
    }
    if token:
        payload["idempotency_token"] = token
    return payload


def _wait_terminal(hook: DatabricksHook, run_id: int, timeout: float = 15.0):  # noqa: ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = hook.get_run_state(run_id)
        if state.is_terminal:
            return state
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish: {state}")


def _wait_file(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- hook ------------------------------------------------------------------------------------------
def test_same_idempotency_token_gives_one_run_and_one_process(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    payload = _payload(code_repo, out, "--window", "2024-01-01", token="demand_forecast-20240101-train")

    first = hook.submit_run(payload)
    second = hook.submit_run(payload)  # a retry of the Airflow task: same run key, same token

    assert first == second
    state = _wait_terminal(hook, first)
    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "SUCCESS")
    assert standin.launches == 1
    assert standin.count("POST", r"/api/2\.2/jobs/runs/submit") == 2
    assert hook.submit_run(payload) == first and standin.launches == 1  # also once the run has finished

    seen = _wait_file(out)
    assert seen["argv"] == ["--out", str(out), "--window", "2024-01-01"]
    assert seen["version"] == "v1", "git_commit pins the code, not the branch head"
    assert seen["cwd"] == str(standin.workdir / f"run-{first}" / "repo" / "training")
    assert seen["bigquery"] == "127.0.0.1:9050"
    assert seen["mlflow_token"] == SECRET
    assert seen["airflow_vars"] == [], "the run must not see Airflow's configuration or connections"

    run = hook.get_run(first)
    assert hook.get_run_page_url(first) == f"{standin.url}/#job/{run['job_id']}/run/{first}"
    assert run["git_source"]["git_snapshot"]["used_commit"] == code_repo[1]
    assert [t["task_key"] for t in run["tasks"]] == ["train"]
    output = hook.get_run_output(run["tasks"][0]["run_id"])
    assert '{"status": "ok"}' in output["logs"]
    assert "training started" in (standin.workdir / f"run-{first}" / "driver.log").read_text()


def test_cancel_stops_the_process(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    run_id = hook.submit_run(_payload(code_repo, out, "--sleep", "60"))
    pid = _wait_file(out)["pid"]
    assert hook.get_run_state(run_id).life_cycle_state == "RUNNING"

    hook.cancel_run(run_id)

    state = _wait_terminal(hook, run_id, timeout=5)
    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "CANCELED")
    assert _pid_gone(pid), "a cancelled run must not leave its process running"
    assert hook.get_run(run_id)["state"]["user_cancelled_or_timedout"] is True


def test_timeout_ends_the_run_as_timedout(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    run_id = hook.submit_run(_payload(code_repo, out, "--sleep", "60", timeout_seconds=1))
    pid = _wait_file(out)["pid"]

    state = _wait_terminal(hook, run_id, timeout=8)

    assert (state.life_cycle_state, state.result_state) == ("TERMINATED", "TIMEDOUT")
    assert "timed out after 1 seconds" in state.state_message
    assert _pid_gone(pid)


def test_unusable_code_revision_is_an_internal_error(standin, hook, code_repo, tmp_path) -> None:
    payload = _payload(code_repo, tmp_path / "out.json")
    payload["git_source"]["git_commit"] = "0" * 40

    state = _wait_terminal(hook, hook.submit_run(payload))

    assert state.life_cycle_state == "INTERNAL_ERROR"
    assert f"Failed to check out commit {'0' * 40}" in state.state_message
    assert standin.launches == 0


def test_requests_are_authenticated_and_validated(standin, hook, code_repo, tmp_path, monkeypatch) -> None:
    wrong = {**standin.airflow_connection(), "password": "not-the-token"}
    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_WRONG", json.dumps(wrong))
    with pytest.raises(DatabricksApiError, match="UNAUTHENTICATED") as info:
        DatabricksHook("databricks_wrong").submit_run(_payload(code_repo, tmp_path / "o.json"))
    assert info.value.http_status_code == 401
    assert standin.count("POST", r"/api/2\.2/jobs/runs/submit") == 1, "a 401 is not retried"

    with pytest.raises(DatabricksApiError, match="at most|1 to 64") as info:
        hook.submit_run(_payload(code_repo, tmp_path / "o.json", token="x" * 65))
    assert info.value.http_status_code == 400
    with pytest.raises(DatabricksApiError, match="RESOURCE_DOES_NOT_EXIST"):
        hook.get_run_state(424242)
    assert standin.launches == 0


# -- operators -------------------------------------------------------------------------------------
def _operator(code_repo, out: Path, *args: str, **kwargs: Any) -> DatabricksSubmitRunOperator:
    payload = _payload(code_repo, out, *args)
    return DatabricksSubmitRunOperator(
        task_id="train",
        databricks_conn_id=CONN_ID,
        git_source=payload["git_source"],
        tasks=payload["tasks"],
        run_name=payload["run_name"],
        polling_period_seconds=0.1,
        databricks_retry_delay=0.1,
        **kwargs,
    )


def test_submit_operator_success_resolves_secrets_without_echoing_them(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    context = provider_context()
    op = _operator(code_repo, out, "--print-secret", idempotency_token="demand_forecast-20240102-train")

    op.execute(context)

    run_id = context["ti"].xcom["run_id"]
    assert context["ti"].xcom["run_page_url"].endswith(f"/run/{run_id}")
    assert context["task_state_store"][op.external_id_key] == run_id  # persisted for crash recovery
    assert _wait_file(out)["mlflow_token"] == SECRET
    run = hook.get_run(run_id)
    assert SECRET not in json.dumps(run)
    assert run["tasks"][0]["new_cluster"]["spark_env_vars"]["MLFLOW_TRACKING_TOKEN"] == SECRET_REF
    logs = hook.get_run_output(run["tasks"][0]["run_id"])["logs"]
    assert "token is [REDACTED]" in logs and SECRET not in logs
    assert SECRET in (standin.workdir / f"run-{run_id}" / "driver.log").read_text(), "the driver log is raw"


def test_submit_operator_failure_carries_the_reason(standin, code_repo, tmp_path) -> None:
    op = _operator(code_repo, tmp_path / "out.json", "--exit", "3")

    with pytest.raises(AirflowException) as info:
        op.execute(provider_context())

    message = str(info.value)
    assert "FAILED" in message
    assert "exited with code 3" in message
    assert "ValueError: the data window has no rows" in message


def test_submit_operator_unknown_secret_fails_before_launching(standin, code_repo, tmp_path) -> None:
    op = _operator(code_repo, tmp_path / "out.json")
    op.tasks[0]["new_cluster"]["spark_env_vars"] = {"MLFLOW_TRACKING_TOKEN": "{{secrets/mlops/missing}}"}

    with pytest.raises(AirflowException, match="secret does not exist with scope: mlops and key: missing"):
        op.execute(provider_context())

    assert standin.launches == 0


def test_retried_task_reconnects_to_the_running_run(standin, hook, code_repo, tmp_path) -> None:
    """The provider's crash recovery: a stored run id is polled again, nothing is resubmitted."""
    out = tmp_path / "out.json"
    running = hook.submit_run(_payload(code_repo, out, "--sleep", "0.5"))
    context = provider_context()
    op = _operator(code_repo, out)
    context["task_state_store"].set(op.external_id_key, running)

    op.execute(context)

    assert context["ti"].xcom["run_id"] == running
    assert standin.launches == 1
    assert hook.get_run_state(running).is_successful


def test_deferrable_operator_and_trigger(standin, code_repo, tmp_path) -> None:
    context = provider_context()
    op = _operator(code_repo, tmp_path / "out.json", "--exit", "4", deferrable=True)

    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, DatabricksExecutionTrigger)
    classpath, kwargs = trigger.serialize()
    trigger = DatabricksExecutionTrigger(**{**kwargs, "polling_period_seconds": 0.1})

    async def first_event() -> dict[str, Any]:
        async with trigger.hook:  # the async (aiohttp) path: GET arguments travel as a JSON body
            assert not (await trigger.hook.a_get_run_state(trigger.run_id)).is_terminal
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    event = asyncio.run(first_event())

    assert json.loads(event["run_state"])["result_state"] == "FAILED"
    assert event["errors"][0]["task_key"] == "train"
    assert "ValueError: the data window has no rows (exit code 4)" == event["errors"][0]["error"]
    with pytest.raises(AirflowException, match="exit code 4"):
        op.execute_complete(context, event)


def test_run_now_operator_finds_the_job_by_name_and_passes_job_parameters(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    job = _payload(code_repo, out, "--window", "{{job.parameters.window_start}}")
    job_id = hook.create_job(
        {
            "name": "demand_forecast-train",
            "tasks": job["tasks"],
            "git_source": job["git_source"],
            "parameters": [{"name": "window_start", "default": "1970-01-01"}],
        }
    )
    context = provider_context()
    train = DatabricksRunNowOperator(
        task_id="train",
        databricks_conn_id=CONN_ID,
        job_name="demand_forecast-train",
        job_parameters={"window_start": "2024-01-03"},
        idempotency_token="demand_forecast-20240103-train",
        polling_period_seconds=0.1,
    )

    train.execute(context)
    train.execute(provider_context())  # same token: the same run, not a second one

    assert _wait_file(out)["argv"][-2:] == ["--window", "2024-01-03"]
    assert standin.launches == 1
    run = hook.get_run(context["ti"].xcom["run_id"])
    assert (run["job_id"], run["number_in_job"]) == (job_id, 1)
    assert run["job_parameters"] == [{"name": "window_start", "default": "1970-01-01", "value": "2024-01-03"}]


def test_workspace_files_multi_task_order_and_unsupported_task_types(standin, hook, tmp_path) -> None:
    script = standin.workspace_path("/Workspace/Shared/mlops/prepare.py")
    script.parent.mkdir(parents=True)
    script.write_text("import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\n")
    order = tmp_path / "order.txt"

    def python_task(key: str, *deps: str) -> dict[str, Any]:
        task = {"spark_python_task": {"python_file": "/Workspace/Shared/mlops/prepare.py"}}
        task["spark_python_task"]["parameters"] = [str(order), key]
        return {"task_key": key, **task, "depends_on": [{"task_key": d} for d in deps]}

    # "second" is declared first but depends on "first": dependencies decide the order
    ok = hook.submit_run({"run_name": "prepare", "tasks": [python_task("second", "first"), python_task("first")]})
    assert _wait_terminal(hook, ok).is_successful
    assert order.read_text().split() == ["first", "second"]

    wheel = {"task_key": "wheel", "python_wheel_task": {"package_name": "mlops", "entry_point": "train"}}
    state = _wait_terminal(hook, hook.submit_run({"run_name": "wheel", "tasks": [wheel]}))
    assert state.life_cycle_state == "INTERNAL_ERROR"
    assert "python_wheel_task is not supported by the Databricks stand-in" in state.state_message
    assert standin.launches == 2


def test_stop_kills_running_processes(standin, hook, code_repo, tmp_path) -> None:
    out = tmp_path / "out.json"
    hook.submit_run(_payload(code_repo, out, "--sleep", "60"))
    pid = _wait_file(out)["pid"]

    standin.stop()

    assert _pid_gone(pid)
