"""The local stack for the demo, the tests and the benchmarks: Airflow home, MLflow server, one lifecycle run.

Nothing here runs in Airflow itself. ``stack_env`` must be applied to ``os.environ`` before Airflow
is imported, since Airflow reads its configuration at import time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlops_lifecycle import paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stack_env(
    home: Path, mlflow_url: str, mlflow_ui_url: str | None = None, database_url: str | None = None
) -> dict[str, str]:
    """Environment for Airflow and the local adapters, all state under ``home``."""
    airflow_home = home / "airflow"
    conn = {"conn_type": "http", "extra": {"tracking_uri": mlflow_url, "ui_url": mlflow_ui_url or mlflow_url}}
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(paths.REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(paths.REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url or f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # the in-process execution API narrates every state change; task logs stay at INFO
        "AIRFLOW__LOGGING__NAMESPACE_LEVELS": "airflow.api_fastapi=WARNING",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps(conn),
        "MLOPS_LOCAL_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.REPO_ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
        "GIT_CONFIG_NOSYSTEM": "1",
        # A lifecycle is a chain of short tasks: on PostgreSQL an idle scheduler looks for the next one
        # every 0.25 s, not every 1 s (each hand-over waited ~0.5 s more; a backtest window has four). On
        # SQLite the default stays: a busier scheduler there locks out the API ("Database is locked" on
        # backfill creation).
        **({"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25"} if database_url else {}),
    }


def postgres_admin(*statements: str) -> None:
    """Run CREATE/DROP DATABASE statements as the local postgres superuser (outside a transaction)."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def postgres_database(name: str) -> str | None:
    """A fresh PostgreSQL database ``name`` on 127.0.0.1:5432 (its SQLAlchemy URL), or None without a server."""
    try:
        postgres_admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    except Exception as exc:  # noqa: BLE001 - no server here: a laptop without PostgreSQL
        print(f"No PostgreSQL on 127.0.0.1:5432 ({type(exc).__name__}): SQLite instead")
        return None
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


def standalone_env(api_port: int) -> dict[str, str]:
    """What `airflow standalone` needs beside ``stack_env`` to run next to others: its own ports, quick beats."""
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
    }


STANDALONE_COMPONENTS = ("scheduler", "triggerer", "dag_processor")


def launch_standalone(
    env: dict[str, str],
    log_path: Path,
    overrides: dict[str, str] | None = None,
    api_port: int | None = None,
    components: tuple[str, ...] = STANDALONE_COMPONENTS,
    timeout: float = 180,
) -> tuple[subprocess.Popen, str]:
    """`airflow standalone` over ``env`` and ``standalone_env`` (``overrides`` last), in a session of its own,
    its output appended to ``log_path``; returns it and its API URL once ``components`` report healthy.

    It is stopped again (``stop_standalone``) if it exits or does not become healthy within ``timeout``.
    """
    api_port = api_port or free_port()
    url = f"http://127.0.0.1:{api_port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "standalone"],
            env={**env, **standalone_env(api_port), **(overrides or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited with code {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=3) as response:
                    health = json.loads(response.read())
                if all(health.get(c, {}).get("status") == "healthy" for c in components):
                    return proc, url
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"airflow standalone did not become healthy in {timeout:.0f} s; see {log_path}")
            time.sleep(1)
    except BaseException:
        stop_standalone(proc)
        raise


def session_processes(sid: int) -> dict[int, str]:
    """pid -> process title (cmdline) of every live process in session ``sid`` (read from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        found[pid] = title
    return found


def stop_standalone(proc: subprocess.Popen, grace: float = 60) -> None:
    """Stop `airflow standalone` for good: its process group (SIGTERM, then SIGKILL after ``grace``), then
    anything of its session still alive (a task runner that left the group). Services the tasks started in
    sessions of their own (a deployed model service) are left running."""
    try:  # the group may be gone already (standalone exited during start-up)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if Path("/proc").is_dir():  # no /proc (macOS): the process group is all we can stop
        for pid in session_processes(proc.pid):  # started with start_new_session: its pid is the session id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def migrate_airflow_db(env: dict[str, str]) -> None:
    """``airflow db migrate`` in a child process (idempotent, a few seconds when already migrated)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow = Path(sys.executable).with_name("airflow")
    done = subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"airflow db migrate failed ({env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}):\n{tail}")


@contextmanager
def output_to(path: Path | None) -> Iterator[None]:
    """This process's stdout and stderr appended to ``path`` meanwhile (file descriptors 1 and 2, so what
    child processes write goes there too); with None, nothing changes."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved_fd in enumerate(saved, start=1):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class MlflowServer:
    store: Path
    port: int
    proc: subprocess.Popen | None = None
    auth: dict[str, str] | None = None  # MLflow's basic-auth app: its MLFLOW_AUTH_* environment

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        """Start ``mlflow server`` (SQLite backend, local artifacts) unless one already answers on the port."""
        if port_open(self.port):
            wait_http(f"{self.url}/health", 10)
            print(f"Reusing the MLflow server already on port {self.port} (is it this store, {self.store}?)")
            return self
        self.store.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.store / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.store / "artifacts"),
                *(["--app-name", "basic-auth"] if self.auth else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            # no GenAI job runners: they are a dozen idle processes on a 2-core laptop
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(self.auth or {})},
        )
        wait_http(f"{self.url}/health", timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


@dataclass
class LifecycleResult:
    dag_id: str
    run_id: str
    state: str
    task_states: dict[str, str]
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)


def run_lifecycle(dag_id: str, logical_date: datetime | None, conf: dict[str, Any] | None = None) -> LifecycleResult:
    """Run one DAG run (a lifecycle or a monitor) in this process with ``dag.test`` (real metadata DB,
    triggers inline)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(paths.REPO_ROOT / "dags"))
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise LookupError(f"DAG {dag_id} not found; import errors: {bag.import_errors}")
    started = time.monotonic()
    dr = dag.test(logical_date=logical_date, run_conf=conf)
    seconds = time.monotonic() - started
    far = datetime.max.replace(tzinfo=UTC)
    tis = sorted(dr.get_task_instances(), key=lambda ti: (ti.start_date or far, ti.task_id))  # run order
    return LifecycleResult(
        dag_id=dag_id,
        run_id=dr.run_id,
        state=str(dr.state),
        task_states={ti.task_id: str(ti.state) for ti in tis},
        seconds=seconds,
        task_seconds={ti.task_id: float(ti.duration or 0.0) for ti in tis},
    )


def service_version(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None
