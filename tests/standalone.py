"""`airflow standalone` for the e2e tests: started over the test session's environment, stopped for good.

``start_standalone`` runs the API server, scheduler, DAG processor, triggerer and LocalExecutor on
free ports (log servers included, so a `make up` running beside the tests does not clash), waits until
the scheduler, triggerer and DAG processor report healthy, and logs in to the REST API as the
session's reviewer. On the way out it stops the whole process group, and then anything of its session
still alive (a task runner that left the group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

import devstack
from conftest import REVIEWER, REVIEWER_PASSWORD

HEALTH_TIMEOUT_SECONDS = 180
COMPONENTS = ("scheduler", "triggerer", "dag_processor")


@dataclass
class Standalone:
    proc: subprocess.Popen
    api: httpx.Client  # authenticated as the session's reviewer
    healthy_after: float  # seconds from launch until healthy and logged in

    @property
    def session_id(self) -> int:
        return self.proc.pid  # started with start_new_session: the session (and group) leader


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


@contextmanager
def start_standalone(log_name: str, extra_env: dict[str, str] | None = None) -> Iterator[Standalone]:
    """A healthy `airflow standalone`, logged in; its output is appended to ``log_name`` in the Airflow home.

    ``extra_env`` is added to (and overrides) the test session's environment and this module's settings.
    """
    api_port = devstack.free_port()
    env = {
        **os.environ,
        **devstack.standalone_env(api_port),
        **(extra_env or {}),
    }
    log_path = Path(os.environ["AIRFLOW_HOME"]) / log_name
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
        launched = time.monotonic()
        try:
            deadline = launched + HEALTH_TIMEOUT_SECONDS
            while True:
                assert proc.poll() is None, f"airflow standalone exited; see {log_path}"
                try:
                    health = client.get("/api/v2/monitor/health").json()
                    if all(health.get(c, {}).get("status") == "healthy" for c in COMPONENTS):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                assert time.monotonic() < deadline, (
                    f"airflow standalone did not become healthy in {HEALTH_TIMEOUT_SECONDS} s; see {log_path}"
                )
                time.sleep(1)
            token = client.post("/auth/token", json={"username": REVIEWER, "password": REVIEWER_PASSWORD})
            token.raise_for_status()
            client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
            yield Standalone(proc, client, time.monotonic() - launched)
        finally:
            client.close()
            try:  # the group may be gone already (standalone exited during start-up): keep that error visible
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # anything of that session still alive (a task runner that left the process group): by pid
            if Path("/proc").is_dir():  # no /proc (macOS): the process group is all we can stop
                for pid in session_processes(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
