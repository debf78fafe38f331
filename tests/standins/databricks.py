"""A local Databricks Jobs API 2.2 stand-in that really runs the submitted Python file.

The real ``apache-airflow-providers-databricks`` hook and operators talk to it over HTTP; behind the API
a run is a subprocess, so "training on Databricks" executes the same entrypoint as a local run:

- ``git_source`` (a local path or ``file://`` URL in tests) is cloned into ``workdir/run-<id>/repo`` and
  ``git_commit`` / ``git_branch`` / ``git_tag`` checked out; the commit used is reported in
  ``git_source.git_snapshot.used_commit`` as Databricks does;
- a ``spark_python_task`` runs as ``<python> <file> <parameters...>`` in its own process group, with the
  environment of this process minus ``AIRFLOW*``, plus ``base_env``, plus the cluster's
  ``spark_env_vars`` where ``{{secrets/<scope>/<key>}}`` references are resolved from ``secrets``;
- stdout and stderr go to ``workdir/run-<id>/driver.log``; ``runs/get-output`` of a task run returns the
  tail as ``logs`` (and ``error``/``error_trace`` when it failed), secret values redacted.

Lifecycle: PENDING for ``pending_seconds``, RUNNING while the process runs, then TERMINATED with
SUCCESS, FAILED (non-zero exit: the message carries the exit code and the last output lines), TIMEDOUT
(``timeout_seconds`` of the run or the task) or CANCELED (``runs/cancel``: the process group is killed
before the run reports TERMINATED); INTERNAL_ERROR when the run cannot start (checkout failed, unknown
secret, a task type the stand-in does not execute).

Idempotency: ``runs/submit`` and ``run-now`` with an ``idempotency_token`` already seen return the
existing run id and start nothing. ``launches`` counts the processes started, ``runs`` holds every run.

Connection the provider needs (``host`` without a scheme, ``schema: http``, the token as password, no
login)::

    monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_TEST", standin.airflow_connection_json())
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Request, Response, StandIn

API = r"/api/2\.2/jobs"
SECRET_REF = re.compile(r"\{\{\s*secrets/([^/{}\s]+)/([^/{}\s]+)\s*\}\}")
DYNAMIC_REF = re.compile(r"\{\{\s*([a-z_]+(?:\.[A-Za-z0-9_\-]+)*)\s*\}\}")
TASK_TYPES = (
    "spark_python_task",
    "python_wheel_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
    "pipeline_task",
    "sql_task",
    "dbt_task",
    "run_job_task",
    "condition_task",
    "for_each_task",
)
ACTIVE_STATES = ("PENDING", "QUEUED", "RUNNING", "TERMINATING", "BLOCKED", "WAITING_FOR_RETRY")
MAX_IDEMPOTENCY_TOKEN = 64  # Databricks: "The token must have at most 64 characters."
STATE_MESSAGE_LINES = 5
LOG_TAIL_BYTES = 1_000_000
KILL_GRACE_SECONDS = 2.0
REDACTED = "[REDACTED]"


class ApiError(Exception):
    """An error answer as Databricks gives it: ``{"error_code": ..., "message": ...}``."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


class _RunFailed(Exception):
    """The run (or a task) cannot start: it ends as INTERNAL_ERROR with this message."""

    def __init__(self, message: str, code: str = "INTERNAL_ERROR", kind: str = "CLIENT_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind


def _now_ms() -> int:
    return int(time.time() * 1000)


def _bad(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def _int(value: Any, name: str) -> int:
    """The provider sends numbers as strings (``normalise_json_content``): accept both, as Databricks does."""
    if isinstance(value, bool):
        raise _bad(f"Invalid value for {name}: {value!r}")
    try:
        return int(value) if isinstance(value, int) else int(float(str(value)))
    except (TypeError, ValueError):
        raise _bad(f"Invalid value for {name}: {value!r}") from None


@dataclass
class TaskRun:
    """One task of a run: its own run id, state and (for a Python task) process."""

    run_id: int
    task_key: str
    spec: dict[str, Any]
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = ""
    termination_code: str | None = None
    termination_type: str | None = None
    start_time: int = 0
    end_time: int = 0
    command: list[str] | None = None
    pid: int | None = None
    exit_code: int | None = None
    log_offset: int = 0
    log_end: int | None = None
    error: str | None = None
    error_trace: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.life_cycle_state in ACTIVE_STATES


@dataclass
class Run:
    """A run (``runs/submit`` or ``run-now``); ``spec`` is the request as sent, never with secret values."""

    run_id: int
    job_id: int
    run_name: str
    run_type: str  # SUBMIT_RUN | JOB_RUN
    spec: dict[str, Any]
    tasks: list[TaskRun]
    directory: Path
    number_in_job: int = 1
    idempotency_token: str | None = None
    timeout_seconds: int = 0
    job_parameters: dict[str, str] = field(default_factory=dict)
    python_params: list[str] | None = None
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = ""
    user_cancelled_or_timedout: bool = False
    termination_code: str | None = None
    termination_type: str | None = None
    created_time: int = field(default_factory=_now_ms)
    start_time: int = 0
    end_time: int = 0
    used_commit: str | None = None
    secret_values: list[str] = field(default_factory=list, repr=False)
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.life_cycle_state in ACTIVE_STATES

    @property
    def git_source(self) -> dict[str, Any] | None:
        return self.spec.get("git_source")

    @property
    def driver_log(self) -> Path:
        return self.directory / "driver.log"


class DatabricksStandIn(StandIn):
    """Databricks Jobs API 2.2 (the subset the provider's hook and operators call), executing runs locally."""

    name = "databricks"

    def __init__(
        self,
        workdir: Path,
        *,
        token: str = "dapi-test-token",
        secrets: Mapping[str, str] | None = None,
        python: str = sys.executable,
        base_env: Mapping[str, str] | None = None,
        pending_seconds: float = 0.2,
    ) -> None:
        super().__init__()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.secrets = dict(secrets or {})
        self.python = python
        self.base_env = dict(base_env or {})
        self.pending_seconds = pending_seconds
        self.launches = 0
        self.runs: dict[int, Run] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self._task_runs: dict[int, tuple[Run, TaskRun]] = {}
        self._tokens: dict[str, int] = {}
        self._next_run_id = 1001
        self._next_job_id = 1
        for method, path, handler in (
            ("POST", "/runs/submit", self._submit),
            ("GET", "/runs/get", self._runs_get),
            ("GET", "/runs/get-output", self._runs_get_output),
            ("GET", "/runs/list", self._runs_list),
            ("POST", "/runs/cancel", self._runs_cancel),
            ("POST", "/runs/cancel-all", self._runs_cancel_all),
            ("POST", "/runs/delete", self._runs_delete),
            ("POST", "/create", self._jobs_create),
            ("GET", "/get", self._jobs_get),
            ("GET", "/list", self._jobs_list),
            ("POST", "/reset", self._jobs_reset),
            ("POST", "/update", self._jobs_update),
            ("POST", "/delete", self._jobs_delete),
            ("POST", "/run-now", self._run_now),
        ):
            self.route(method, API + re.escape(path), self._api(handler))

    # -- helpers for tests and wiring ----------------------------------------------------------
    def airflow_connection(self) -> dict[str, Any]:
        """The Airflow connection (JSON form) the provider's hook needs to reach this stand-in."""
        return {
            "conn_type": "databricks",
            "host": "127.0.0.1",
            "port": self.port,
            "schema": "http",
            "password": self.token,
        }

    def airflow_connection_json(self) -> str:
        return json.dumps(self.airflow_connection())

    def workspace_path(self, path: str) -> Path:
        """Where a ``/Workspace/...`` (or ``/Shared/...``, ``/Users/...``) file lives on this machine."""
        relative = path.strip("/")
        if relative == "Workspace" or relative.startswith("Workspace/"):
            relative = relative[len("Workspace") :].lstrip("/")
        return self.workdir / "workspace" / relative

    def run_state(self, run_id: int) -> dict[str, Any]:
        with self.lock:
            return self._state(self.runs[run_id])

    def wait(self, run_id: int, timeout: float = 15.0) -> dict[str, Any]:
        """Block until the run is terminal; return its ``state``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                run = self.runs[run_id]
                if not run.active:
                    return self._state(run)
            time.sleep(0.02)
        raise TimeoutError(f"run {run_id} still {self.runs[run_id].life_cycle_state} after {timeout}s")

    def stop(self) -> None:
        """Cancel every active run, kill its processes, then stop serving."""
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.cancel_requested.set()
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=KILL_GRACE_SECONDS + 3)
            for task in run.tasks:
                if task.process is not None and task.process.poll() is None:
                    _kill_group(task.process, grace=0)
        super().stop()

    # -- request plumbing ----------------------------------------------------------------------
    def _api(self, handler: Callable[[dict[str, Any]], Any]) -> Callable[..., Response]:
        def wrapped(request: Request, **_: Any) -> Response:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return Response(
                    401,
                    {"error_code": "UNAUTHENTICATED", "message": "Invalid access token: send Authorization: Bearer"},
                )
            try:
                body = handler(self._params(request))
            except ApiError as err:
                return Response(err.status, {"error_code": err.error_code, "message": err.message})
            return Response(200, self._redact_all(body if body is not None else {}))

        return wrapped

    @staticmethod
    def _params(request: Request) -> dict[str, Any]:
        """GET arguments come in the query string (requests) or, from the provider's aiohttp path, as a JSON body."""
        params: dict[str, Any] = {}
        if request.body:
            try:
                decoded = request.json()
            except ValueError:
                raise ApiError(400, "MALFORMED_REQUEST", "Request body is not valid JSON") from None
            if not isinstance(decoded, dict):
                raise ApiError(400, "MALFORMED_REQUEST", "Request body must be a JSON object")
            params.update(decoded)
        params.update({k: v[-1] for k, v in request.query.items()})
        return params

    def _redact_all(self, body: Any) -> Any:
        """No API answer carries a secret value: a last guard on top of per-run redaction."""
        values = [v for v in self.secrets.values() if v]
        if not values:
            return body

        def scrub(obj: Any) -> Any:
            if isinstance(obj, str):
                for value in values:
                    obj = obj.replace(value, REDACTED)
                return obj
            if isinstance(obj, list):
                return [scrub(v) for v in obj]
            if isinstance(obj, dict):
                return {k: scrub(v) for k, v in obj.items()}
            return obj

        return scrub(body)

    def _new_run_id(self) -> int:
        run_id = self._next_run_id
        self._next_run_id += 1
        return run_id

    def _new_job_id(self) -> int:
        job_id = self._next_job_id
        self._next_job_id += 1
        return job_id

    # -- validation ----------------------------------------------------------------------------
    @staticmethod
    def _tasks_of(spec: Mapping[str, Any], default_key: str) -> list[dict[str, Any]]:
        """``tasks``, or the legacy single-task form (task and cluster at top level) the provider still sends."""
        tasks = spec.get("tasks")
        if tasks is None:
            single = {k: spec[k] for k in (*TASK_TYPES, "new_cluster", "existing_cluster_id", "libraries") if k in spec}
            if not any(t in single for t in TASK_TYPES):
                raise _bad("At least one task is required: set 'tasks' (or one task field such as spark_python_task)")
            tasks = [{"task_key": default_key or "task", **single}]
        if not isinstance(tasks, list) or not tasks:
            raise _bad("'tasks' must be a non-empty array")
        keys: set[str] = set()
        for task in tasks:
            if not isinstance(task, dict) or not task.get("task_key"):
                raise _bad("Every task needs a task_key")
            if task["task_key"] in keys:
                raise _bad(f"Duplicate task_key: {task['task_key']}")
            keys.add(task["task_key"])
            kinds = [t for t in TASK_TYPES if t in task]
            if len(kinds) != 1:
                raise _bad(f"Task {task['task_key']} must set exactly one task type, got {kinds or 'none'}")
            if not isinstance(task[kinds[0]], dict):
                raise _bad(f"Task {task['task_key']}: {kinds[0]} must be an object")
            python = task.get("spark_python_task")
            if python is not None and not (isinstance(python, dict) and python.get("python_file")):
                raise _bad(f"Task {task['task_key']}: spark_python_task.python_file is required")
            if python is not None and not isinstance(python.get("parameters", []), list):
                raise _bad(f"Task {task['task_key']}: spark_python_task.parameters must be an array of strings")
            for dep in task.get("depends_on") or []:
                if dep.get("task_key") not in {t.get("task_key") for t in tasks}:
                    raise _bad(f"Task {task['task_key']} depends on unknown task {dep.get('task_key')}")
            if kinds[0] in ("spark_python_task", "notebook_task"):
                source = (task[kinds[0]].get("source") or ("GIT" if spec.get("git_source") else "WORKSPACE")).upper()
                if source == "GIT" and not spec.get("git_source"):
                    raise _bad(f"Task {task['task_key']} has source GIT but no git_source is set")
        git = spec.get("git_source")
        if git is not None:
            if not isinstance(git, dict) or not git.get("git_url"):
                raise _bad("git_source.git_url is required")
            if not any(git.get(k) for k in ("git_commit", "git_branch", "git_tag")):
                raise _bad("git_source needs one of git_commit, git_branch or git_tag")
        return tasks

    def _claim_token(self, token: Any) -> int | None:
        """The run id already holding ``token``; callers hold the lock so check-and-create is atomic."""
        if token is None:
            return None
        if not isinstance(token, str) or not token or len(token) > MAX_IDEMPOTENCY_TOKEN:
            raise _bad(f"idempotency_token must be a string of 1 to {MAX_IDEMPOTENCY_TOKEN} characters: {token!r}")
        run_id = self._tokens.get(token)
        if run_id is not None and run_id not in self.runs:
            raise _bad(f"The run with idempotency_token {token} was deleted")
        return run_id

    # -- runs ----------------------------------------------------------------------------------
    def _submit(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            existing = self._claim_token(params.get("idempotency_token"))
            if existing is not None:
                return {"run_id": existing}
            run_name = str(params.get("run_name") or "Untitled")
            tasks = self._tasks_of(params, run_name)
            spec = {**params, "tasks": tasks}
            run = self._create_run(spec, job_id=self._new_job_id(), run_type="SUBMIT_RUN", run_name=run_name)
            return {"run_id": run.run_id}

    def _run_now(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job_id = _int(params.get("job_id"), "job_id")
            job = self.jobs.get(job_id)
            if job is None:
                raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Job {job_id} does not exist.")
            existing = self._claim_token(params.get("idempotency_token"))
            if existing is not None:
                return {"run_id": existing, "number_in_job": self.runs[existing].number_in_job}
            settings = job["settings"]
            overrides = params.get("job_parameters") or {}
            python_params = params.get("python_params")
            if overrides and python_params is not None:
                raise _bad("job_parameters cannot be combined with python_params")
            if not isinstance(overrides, dict):
                raise _bad("job_parameters must be an object")
            declared = {p["name"]: str(p.get("default", "")) for p in settings.get("parameters") or []}
            unknown = sorted(set(overrides) - set(declared))
            if unknown:
                raise _bad(f"Job {job_id} does not define the job parameters {unknown}")
            if python_params is not None and not isinstance(python_params, list):
                raise _bad("python_params must be an array of strings")
            spec = {
                k: settings[k]
                for k in ("tasks", "git_source", "timeout_seconds", "job_clusters", "parameters")
                if k in settings
            }
            spec.update({k: params[k] for k in ("job_parameters", "python_params", "idempotency_token") if k in params})
            number = 1 + sum(1 for r in self.runs.values() if r.job_id == job_id)
            run = self._create_run(
                spec,
                job_id=job_id,
                run_type="JOB_RUN",
                run_name=settings.get("name", f"job-{job_id}"),
                job_parameters={**declared, **{k: str(v) for k, v in overrides.items()}},
                python_params=[str(p) for p in python_params] if python_params is not None else None,
                number_in_job=number,
            )
            return {"run_id": run.run_id, "number_in_job": run.number_in_job}

    def _create_run(self, spec: dict[str, Any], *, job_id: int, run_type: str, run_name: str, **extra: Any) -> Run:
        run_id = self._new_run_id()
        tasks = [TaskRun(self._new_run_id(), t["task_key"], t) for t in spec["tasks"]]
        token = spec.get("idempotency_token")
        run = Run(
            run_id=run_id,
            job_id=job_id,
            run_name=run_name,
            run_type=run_type,
            spec=spec,
            tasks=tasks,
            directory=self.workdir / f"run-{run_id}",
            idempotency_token=token,
            timeout_seconds=_int(spec.get("timeout_seconds") or 0, "timeout_seconds"),
            **extra,
        )
        self.runs[run_id] = run
        for task in tasks:
            self._task_runs[task.run_id] = (run, task)
        if token is not None:
            self._tokens[token] = run_id
        run.thread = threading.Thread(target=self._execute, args=(run,), name=f"databricks-run-{run_id}", daemon=True)
        run.thread.start()
        return run

    def _lookup(self, params: Mapping[str, Any]) -> tuple[Run, TaskRun | None]:
        run_id = _int(params.get("run_id"), "run_id")
        if run_id in self.runs:
            return self.runs[run_id], None
        if run_id in self._task_runs:
            return self._task_runs[run_id]
        raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")

    def _runs_get(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            run, task = self._lookup(params)
            if task is not None:
                return {
                    **self._task_json(run, task),
                    "job_id": run.job_id,
                    "run_name": task.task_key,
                    "run_type": run.run_type,
                    "tasks": [self._task_json(run, task)],
                }
            return self._run_json(run)

    def _runs_get_output(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            run, task = self._lookup(params)
            if task is None:
                raise _bad(
                    "Retrieving the output of runs with multiple tasks is not supported. "
                    "Please retrieve the output of each individual task run instead."
                )
            out: dict[str, Any] = {"metadata": {**self._task_json(run, task), "job_id": run.job_id}}
            logs, truncated = self._log_slice(run, task)
            if task.command is not None:
                out["logs"] = logs
                out["logs_truncated"] = truncated
            if task.error is not None:
                out["error"] = self._redact(run, task.error)
            if task.error_trace is not None:
                out["error_trace"] = self._redact(run, task.error_trace)
            return out

    def _runs_list(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            runs = sorted(self.runs.values(), key=lambda r: r.run_id, reverse=True)
            if params.get("job_id") is not None:
                runs = [r for r in runs if r.job_id == _int(params["job_id"], "job_id")]
            if str(params.get("active_only", "")).lower() == "true":
                runs = [r for r in runs if r.active]
            if str(params.get("completed_only", "")).lower() == "true":
                runs = [r for r in runs if not r.active]
            if params.get("run_type"):
                runs = [r for r in runs if r.run_type == params["run_type"]]
            offset = _int(params.get("page_token") or params.get("offset") or 0, "page_token")
            limit = _int(params.get("limit") or 25, "limit")
            page = runs[offset : offset + limit]
            body: dict[str, Any] = {"runs": [self._run_json(r) for r in page], "has_more": offset + limit < len(runs)}
            if body["has_more"]:
                body["next_page_token"] = str(offset + limit)
            return body

    def _runs_cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            run, _ = self._lookup(params)
            self._request_cancel(run)
        return {}

    def _runs_cancel_all(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job_id = _int(params.get("job_id"), "job_id")
            for run in self.runs.values():
                if run.job_id == job_id:
                    self._request_cancel(run)
        return {}

    def _request_cancel(self, run: Run) -> None:
        """Asynchronous, like Databricks: the run reports TERMINATING until its processes are gone."""
        if not run.active:
            return
        run.cancel_requested.set()
        if run.life_cycle_state == "RUNNING":
            run.life_cycle_state = "TERMINATING"

    def _runs_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            run, task = self._lookup(params)
            if task is not None:
                raise _bad("Only top-level runs can be deleted")
            if run.active:
                raise _bad(f"Run {run.run_id} is active; cancel it before deleting it")
            del self.runs[run.run_id]
            for t in run.tasks:
                self._task_runs.pop(t.run_id, None)
        return {}

    # -- jobs ----------------------------------------------------------------------------------
    def _jobs_create(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            settings = {k: v for k, v in params.items() if k != "access_control_list"}
            settings["tasks"] = self._tasks_of(settings, settings.get("name", ""))
            self._check_parameters(settings)
            job_id = self._new_job_id()
            self.jobs[job_id] = {"job_id": job_id, "created_time": _now_ms(), "settings": settings}
            return {"job_id": job_id}

    @staticmethod
    def _check_parameters(settings: Mapping[str, Any]) -> None:
        for p in settings.get("parameters") or []:
            if not isinstance(p, dict) or not p.get("name") or "default" not in p:
                raise _bad("Every job parameter needs a name and a default")

    def _job(self, params: Mapping[str, Any]) -> dict[str, Any]:
        job_id = _int(params.get("job_id"), "job_id")
        if job_id not in self.jobs:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Job {job_id} does not exist.")
        return self.jobs[job_id]

    def _jobs_get(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job = self._job(params)
            return {**job, "creator_user_name": "stand-in@example.com", "run_as_user_name": "stand-in@example.com"}

    def _jobs_list(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j["job_id"])
            if params.get("name"):
                jobs = [j for j in jobs if j["settings"].get("name", "").lower() == str(params["name"]).lower()]
            expand = str(params.get("expand_tasks", "")).lower() == "true"
            listed = []
            for job in jobs:
                settings = job["settings"] if expand else {k: v for k, v in job["settings"].items() if k != "tasks"}
                listed.append({"job_id": job["job_id"], "created_time": job["created_time"], "settings": settings})
            return {"jobs": listed, "has_more": False} if listed else {"has_more": False}

    def _jobs_reset(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job = self._job(params)
            settings = dict(params.get("new_settings") or {})
            settings["tasks"] = self._tasks_of(settings, settings.get("name", ""))
            self._check_parameters(settings)
            job["settings"] = settings
        return {}

    def _jobs_update(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job = self._job(params)
            settings = {**job["settings"], **(params.get("new_settings") or {})}
            for name in params.get("fields_to_remove") or []:
                settings.pop(name, None)
            settings["tasks"] = self._tasks_of(settings, settings.get("name", ""))
            self._check_parameters(settings)
            job["settings"] = settings
        return {}

    def _jobs_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            job = self._job(params)
            del self.jobs[job["job_id"]]
        return {}

    # -- JSON views ----------------------------------------------------------------------------
    def _page_url(self, run: Run, run_id: int) -> str:
        return f"{self.url}/#job/{run.job_id}/run/{run_id}"

    @staticmethod
    def _state_of(life: str, result: str | None, message: str, user_flag: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"life_cycle_state": life, "state_message": message}
        if result is not None:
            state["result_state"] = result
        state["user_cancelled_or_timedout"] = user_flag
        return state

    @staticmethod
    def _status_of(life: str, code: str | None, kind: str | None, message: str) -> dict[str, Any]:
        """The newer ``status`` object (the provider reads ``state``; other clients read this)."""
        if life in ("TERMINATED", "INTERNAL_ERROR", "SKIPPED"):
            return {
                "state": "TERMINATED",
                "termination_details": {"code": code or "SUCCESS", "type": kind or "SUCCESS", "message": message},
            }
        return {"state": "TERMINATING" if life == "TERMINATING" else life}

    def _state(self, run: Run) -> dict[str, Any]:
        message = self._redact(run, run.state_message)
        return self._state_of(run.life_cycle_state, run.result_state, message, run.user_cancelled_or_timedout)

    def _run_json(self, run: Run) -> dict[str, Any]:
        message = self._redact(run, run.state_message)
        body: dict[str, Any] = {
            "job_id": run.job_id,
            "run_id": run.run_id,
            "original_attempt_run_id": run.run_id,
            "number_in_job": run.number_in_job,
            "run_name": run.run_name,
            "run_type": run.run_type,
            "trigger": "ONE_TIME",
            "format": "MULTI_TASK",
            "attempt_number": 0,
            "creator_user_name": "stand-in@example.com",
            "run_page_url": self._page_url(run, run.run_id),
            "state": self._state_of(run.life_cycle_state, run.result_state, message, run.user_cancelled_or_timedout),
            "status": self._status_of(run.life_cycle_state, run.termination_code, run.termination_type, message),
            "start_time": run.start_time or run.created_time,
            "end_time": run.end_time,
            "run_duration": (run.end_time - run.start_time) if run.end_time and run.start_time else 0,
            "tasks": [self._task_json(run, t) for t in run.tasks],
        }
        if run.timeout_seconds:
            body["timeout_seconds"] = run.timeout_seconds
        if run.git_source is not None:
            body["git_source"] = dict(run.git_source)
            if run.used_commit:
                body["git_source"]["git_snapshot"] = {"used_commit": run.used_commit}
        if run.run_type == "JOB_RUN":
            declared = {p["name"]: p.get("default", "") for p in run.spec.get("parameters") or []}
            body["job_parameters"] = [
                {"name": name, "default": declared.get(name, ""), "value": value}
                for name, value in run.job_parameters.items()
            ]
            if run.python_params is not None:
                body["overriding_parameters"] = {"python_params": run.python_params}
        if run.idempotency_token is not None:
            body["idempotency_token"] = run.idempotency_token
        return body

    def _task_json(self, run: Run, task: TaskRun) -> dict[str, Any]:
        message = self._redact(run, task.state_message)
        body: dict[str, Any] = {
            **{k: v for k, v in task.spec.items() if k != "task_key"},  # as submitted: secret references only
            "run_id": task.run_id,
            "task_key": task.task_key,
            "attempt_number": 0,
            "run_page_url": self._page_url(run, task.run_id),
            "state": self._state_of(task.life_cycle_state, task.result_state, message, run.user_cancelled_or_timedout),
            "status": self._status_of(task.life_cycle_state, task.termination_code, task.termination_type, message),
            "start_time": task.start_time,
            "end_time": task.end_time,
        }
        if run.git_source is not None:
            body["git_source"] = dict(run.git_source)
        return body

    def _log_slice(self, run: Run, task: TaskRun) -> tuple[str, bool]:
        try:
            with run.driver_log.open("rb") as fh:
                fh.seek(task.log_offset)
                data = fh.read((task.log_end - task.log_offset) if task.log_end is not None else -1)
        except FileNotFoundError:
            return "", False
        truncated = len(data) > LOG_TAIL_BYTES
        text = data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
        return self._redact(run, text), truncated

    def _redact(self, run: Run, text: str) -> str:
        for value in run.secret_values:
            if value:
                text = text.replace(value, REDACTED)
        return text

    # -- execution -----------------------------------------------------------------------------
    def _execute(self, run: Run) -> None:
        """The run's supervisor thread: pending, checkout, tasks in dependency order, final state."""
        try:
            if run.cancel_requested.wait(self.pending_seconds):
                self._finish_cancelled(run, tasks_from=0)
                return
            with self.lock:
                run.life_cycle_state = "RUNNING"
                run.start_time = _now_ms()
            run.directory.mkdir(parents=True, exist_ok=True)
            run.driver_log.touch()
            deadline = time.monotonic() + run.timeout_seconds if run.timeout_seconds > 0 else None
            repo = self._checkout(run) if run.git_source is not None else None
            for index, task in enumerate(self._ordered(run)):
                if run.cancel_requested.is_set():
                    self._finish_cancelled(run, tasks_from=index)
                    return
                upstream = [self._task(run, d["task_key"]) for d in task.spec.get("depends_on") or []]
                if any(u.result_state != "SUCCESS" for u in upstream):
                    with self.lock:
                        task.life_cycle_state, task.result_state = "TERMINATED", "UPSTREAM_FAILED"
                        task.state_message = "Upstream task(s) failed."
                        task.termination_code, task.termination_type = "SKIPPED", "SUCCESS"
                    continue
                self._run_task(run, task, repo, deadline)
            self._finish(run)
        except _RunFailed as failure:
            self._finish_internal_error(run, failure)
        except Exception as exc:  # a stand-in bug: visible in the run state instead of a silent dead thread
            self._finish_internal_error(run, _RunFailed(f"stand-in error: {type(exc).__name__}: {exc}"))

    def _ordered(self, run: Run) -> list[TaskRun]:
        done: list[TaskRun] = []
        pending = list(run.tasks)
        while pending:
            ready = [
                t
                for t in pending
                if all(d["task_key"] in {x.task_key for x in done} for d in t.spec.get("depends_on") or [])
            ]
            if not ready:
                raise _RunFailed("The task dependencies form a cycle", code="INVALID_RUN_CONFIGURATION")
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    @staticmethod
    def _task(run: Run, key: str) -> TaskRun:
        return next(t for t in run.tasks if t.task_key == key)

    def _checkout(self, run: Run) -> Path:
        git = run.git_source or {}
        repo = run.directory / "repo"
        url = str(git["git_url"])
        ref = git.get("git_branch") or git.get("git_tag")
        clone = ["git", "clone", "--quiet", *(["--branch", str(ref)] if ref else []), url, str(repo)]
        self._git(clone, f"Failed to clone {url}")
        if git.get("git_commit"):
            self._git(
                [
                    "git",
                    "-C",
                    str(repo),
                    "-c",
                    "advice.detachedHead=false",
                    "checkout",
                    "--quiet",
                    str(git["git_commit"]),
                ],
                f"Failed to check out commit {git['git_commit']} of {url}",
            )
        used = self._git(["git", "-C", str(repo), "rev-parse", "HEAD"], "Failed to read the checked-out commit")
        with self.lock:
            run.used_commit = used.strip()
        return repo

    @staticmethod
    def _git(argv: list[str], what: str) -> str:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _RunFailed(f"{what}: {exc}", code="REPOSITORY_CHECKOUT_FAILED") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise _RunFailed(
                f"{what}: {detail[-1] if detail else f'git exited with {done.returncode}'}",
                code="REPOSITORY_CHECKOUT_FAILED",
            )
        return done.stdout

    def _command(self, run: Run, task: TaskRun, repo: Path | None) -> tuple[list[str], Path]:
        kind = next(t for t in TASK_TYPES if t in task.spec)
        if kind != "spark_python_task":
            raise _RunFailed(
                f"{kind} is not supported by the Databricks stand-in (only spark_python_task runs)",
                code="INVALID_RUN_CONFIGURATION",
            )
        spec = task.spec[kind]
        python_file = str(spec["python_file"])
        source = (spec.get("source") or ("GIT" if run.git_source else "WORKSPACE")).upper()
        if source == "GIT":
            assert repo is not None
            path = repo / python_file.lstrip("/")
        elif python_file.startswith("dbfs:/"):
            path = self.workdir / "dbfs" / python_file[len("dbfs:/") :].lstrip("/")
        else:
            path = self.workspace_path(python_file)
        parameters = run.python_params if run.python_params is not None else spec.get("parameters") or []
        argv = [self.python, str(path), *(self._dynamic(run, task, str(p)) for p in parameters)]
        return argv, path.parent

    def _dynamic(self, run: Run, task: TaskRun, value: str) -> str:
        """Databricks dynamic value references in task parameters: ``{{job.run_id}}``, ``{{job.parameters.x}}``..."""
        known = {
            "job.id": str(run.job_id),
            "job.run_id": str(run.run_id),
            "job.name": run.run_name,
            "task.run_id": str(task.run_id),
            "task.name": task.task_key,
            "run_id": str(task.run_id),
            "parent_run_id": str(run.run_id),
            "job_id": str(run.job_id),
            "task_key": task.task_key,
        }
        known.update({f"job.parameters.{k}": v for k, v in run.job_parameters.items()})
        return DYNAMIC_REF.sub(lambda m: known.get(m.group(1), m.group(0)), value)

    def _cluster(self, run: Run, task: TaskRun) -> dict[str, Any]:
        if task.spec.get("new_cluster"):
            return task.spec["new_cluster"]
        key = task.spec.get("job_cluster_key")
        for cluster in run.spec.get("job_clusters") or []:
            if key and cluster.get("job_cluster_key") == key:
                return cluster.get("new_cluster") or {}
        return {}

    def _environment(self, run: Run, task: TaskRun) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(self.base_env)
        env["PYTHONUNBUFFERED"] = "1"
        for name, raw in (self._cluster(run, task).get("spark_env_vars") or {}).items():

            def resolve(match: re.Match[str], name: str = name) -> str:
                scope, key = match.group(1), match.group(2)
                value = self.secrets.get(f"{scope}/{key}")
                if value is None:
                    raise _RunFailed(
                        f"Cannot resolve spark_env_vars.{name} of task {task.task_key}: "
                        f"secret does not exist with scope: {scope} and key: {key}",
                        code="RESOURCE_NOT_FOUND",
                    )
                with self.lock:
                    run.secret_values.append(value)
                return value

            env[str(name)] = SECRET_REF.sub(resolve, str(raw))
        return env

    def _run_task(self, run: Run, task: TaskRun, repo: Path | None, run_deadline: float | None) -> None:
        try:
            argv, cwd = self._command(run, task, repo)
            env = self._environment(run, task)
        except _RunFailed as failure:
            with self.lock:
                task.life_cycle_state, task.result_state = "INTERNAL_ERROR", "FAILED"
                task.state_message = task.error = failure.message
                task.termination_code, task.termination_type = failure.code, failure.kind
                task.end_time = _now_ms()
            raise
        task_timeout = _int(task.spec.get("timeout_seconds") or 0, "timeout_seconds")
        deadlines = [d for d in (run_deadline, time.monotonic() + task_timeout if task_timeout else None) if d]
        deadline = min(deadlines) if deadlines else None
        with run.driver_log.open("ab") as log:
            offset = log.tell()
            with self.lock:
                if run.cancel_requested.is_set():
                    return
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd if cwd.is_dir() else run.directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self.launches += 1
                task.process, task.pid, task.command, task.log_offset = proc, proc.pid, argv, offset
                task.life_cycle_state, task.start_time = "RUNNING", _now_ms()
        ended = "EXITED"
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if run.cancel_requested.is_set():
                ended = "CANCELED"
            elif deadline is not None and time.monotonic() > deadline:
                ended = "TIMEDOUT"
            if ended != "EXITED":
                with self.lock:
                    task.life_cycle_state = "TERMINATING"
                _kill_group(proc)
                break
        _kill_group(proc, grace=0)  # like a cluster shutting down: nothing the task started outlives it
        with self.lock:
            task.exit_code = proc.returncode
            task.log_end = run.driver_log.stat().st_size
            task.end_time = _now_ms()
            task.life_cycle_state = "TERMINATED"
            tail = self._tail_lines(run, task)
            if ended == "CANCELED":
                task.result_state, task.state_message = "CANCELED", "Run cancelled."
                task.termination_code, task.termination_type = "USER_CANCELED", "SUCCESS"
                run.user_cancelled_or_timedout = True
            elif ended == "TIMEDOUT":
                limit = (
                    task_timeout
                    if task_timeout and (not run.timeout_seconds or task_timeout < run.timeout_seconds)
                    else run.timeout_seconds
                )
                task.result_state = "TIMEDOUT"
                task.state_message = f"Task {task.task_key} timed out after {limit} seconds."
                task.termination_code, task.termination_type = "CANCELED", "CLIENT_ERROR"
                task.error = task.state_message
                run.user_cancelled_or_timedout = True
            elif proc.returncode == 0:
                task.result_state, task.state_message = "SUCCESS", ""
                task.termination_code, task.termination_type = "SUCCESS", "SUCCESS"
            else:
                last = next((line for line in reversed(tail) if line.strip()), "")
                shown = "\n".join(tail[-STATE_MESSAGE_LINES:])
                task.result_state = "FAILED"
                task.state_message = f"Python process exited with code {proc.returncode}. Last output:\n{shown}"
                task.termination_code, task.termination_type = "RUN_EXECUTION_ERROR", "CLIENT_ERROR"
                task.error = f"{last} (exit code {proc.returncode})" if last else f"Exit code {proc.returncode}"
                task.error_trace = "\n".join(tail)
            task.process = None

    def _tail_lines(self, run: Run, task: TaskRun, lines: int = 50) -> list[str]:
        text, _ = self._log_slice(run, task)
        return text.splitlines()[-lines:]

    def _finish(self, run: Run) -> None:
        with self.lock:
            run.end_time = _now_ms()
            run.life_cycle_state = "TERMINATED"
            results = {t.result_state for t in run.tasks}
            failed = next((t for t in run.tasks if t.result_state in ("FAILED", "TIMEDOUT", "CANCELED")), None)
            if failed is None and results <= {"SUCCESS"}:
                run.result_state, run.state_message = "SUCCESS", ""
                run.termination_code, run.termination_type = "SUCCESS", "SUCCESS"
                return
            if failed is None:  # cancelled before a task started
                self._finish_cancelled(run, tasks_from=0)
                return
            run.result_state = failed.result_state
            run.termination_code, run.termination_type = failed.termination_code, failed.termination_type
            if failed.result_state == "FAILED":
                skipped = any(t.result_state == "UPSTREAM_FAILED" for t in run.tasks)
                run.state_message = f"Task {failed.task_key} failed with message: {failed.state_message}" + (
                    " This caused all downstream tasks to get skipped." if skipped else ""
                )
            else:
                run.state_message = failed.state_message
            for task in run.tasks:
                if task.result_state is None:
                    task.life_cycle_state, task.result_state = "TERMINATED", "CANCELED"

    def _finish_cancelled(self, run: Run, tasks_from: int) -> None:
        with self.lock:
            for task in run.tasks:
                if task.result_state is None:
                    task.life_cycle_state, task.result_state, task.state_message = (
                        "TERMINATED",
                        "CANCELED",
                        "Run cancelled.",
                    )
                    task.termination_code, task.termination_type = "USER_CANCELED", "SUCCESS"
            run.life_cycle_state, run.result_state = "TERMINATED", "CANCELED"
            run.state_message = "Run cancelled."
            run.termination_code, run.termination_type = "USER_CANCELED", "SUCCESS"
            run.user_cancelled_or_timedout = True
            run.end_time = _now_ms()

    def _finish_internal_error(self, run: Run, failure: _RunFailed) -> None:
        with self.lock:
            task_failed = any(t.life_cycle_state == "INTERNAL_ERROR" for t in run.tasks)
            for task in run.tasks:
                if task.process is not None:
                    _kill_group(task.process, grace=0)
                if task.result_state is not None:
                    continue
                if task_failed:  # one task could not start: the others do not run
                    task.life_cycle_state, task.result_state = "TERMINATED", "UPSTREAM_FAILED"
                    task.state_message = "Upstream task(s) failed."
                    task.termination_code, task.termination_type = "SKIPPED", "SUCCESS"
                else:  # the run itself could not start (checkout): every task reports why
                    task.life_cycle_state, task.result_state = "INTERNAL_ERROR", "FAILED"
                    task.state_message = task.error = failure.message
                    task.termination_code, task.termination_type = failure.code, failure.kind
            run.life_cycle_state, run.result_state = "INTERNAL_ERROR", "FAILED"
            run.state_message = failure.message
            run.termination_code, run.termination_type = failure.code, failure.kind
            run.end_time = _now_ms()


def _kill_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the process group, SIGKILL after ``grace``; reap the leader so its pid is really gone."""
    if grace > 0 and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
