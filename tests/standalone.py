"""`airflow standalone` for the e2e tests: started over the test session's environment, stopped for good.

``start_standalone`` runs (``devstack.launch_standalone``) the API server, scheduler, DAG processor,
triggerer and LocalExecutor on free ports (log servers included, so a `make up` running beside the tests
does not clash), waits until the scheduler, triggerer and DAG processor report healthy, and logs in to the
REST API as the session's reviewer. On the way out it stops the whole process group, and then anything of
its session still alive (a task runner that left the group).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

import devstack
from conftest import REVIEWER, REVIEWER_PASSWORD

HEALTH_TIMEOUT_SECONDS = 180
session_processes = devstack.session_processes


@dataclass
class Standalone:
    proc: subprocess.Popen
    api: httpx.Client  # authenticated as the session's reviewer
    healthy_after: float  # seconds from launch until healthy and logged in

    @property
    def session_id(self) -> int:
        return self.proc.pid  # started with start_new_session: the session (and group) leader


@contextmanager
def start_standalone(log_name: str, extra_env: dict[str, str] | None = None) -> Iterator[Standalone]:
    """A healthy `airflow standalone`, logged in; its output is appended to ``log_name`` in the Airflow home.

    ``extra_env`` is added to (and overrides) the test session's environment and devstack's settings.
    """
    launched = time.monotonic()
    proc, url = devstack.launch_standalone(
        dict(os.environ),
        Path(os.environ["AIRFLOW_HOME"]) / log_name,
        overrides=extra_env,
        timeout=HEALTH_TIMEOUT_SECONDS,
    )
    client = httpx.Client(base_url=url, timeout=30)
    try:
        token = client.post("/auth/token", json={"username": REVIEWER, "password": REVIEWER_PASSWORD})
        token.raise_for_status()
        client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield Standalone(proc, client, time.monotonic() - launched)
    finally:
        client.close()
        devstack.stop_standalone(proc)
