"""Deploy, embedded local adapter: the model microservice as a local process, one per model line.

The service is started from what was merged (the pin file in the deployment repository) and keeps
running after the task ends, as a deployment would. Its pid, port and version are kept in a state
file so the next deployment replaces it and a retry reuses it. Starting returns at once; whether the
right version answers is the verify step's job (a deferrable wait), exactly as with Kubernetes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceState:
    model_line: str
    model_version: str
    pid: int
    port: int
    url: str
    log_file: str
    started_at: float
    revision: str = ""

    def answers_as_itself(self) -> bool:
        """True if ``/version`` answers with this deployment's version and revision (not just a live pid)."""
        try:
            with urllib.request.urlopen(f"{self.url}/version", timeout=3) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return (
            str(answer.get("model_version")) == self.model_version and answer.get("service_revision") == self.revision
        )


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return status != "Z"
    except OSError:
        return True


class LocalServiceDeployer:
    def __init__(self, state_dir: Path, service_dir: Path) -> None:
        self.state_dir = state_dir
        self.service_dir = service_dir

    def _state_file(self, model_line: str) -> Path:
        return self.state_dir / f"{model_line}.json"

    def current(self, model_line: str) -> ServiceState | None:
        path = self._state_file(model_line)
        if not path.exists():
            return None
        state = ServiceState(**json.loads(path.read_text()))
        return state if _alive(state.pid) else None

    def deploy(
        self,
        model_line: str,
        model_name: str,
        model_version: str,
        port: int,
        env: dict[str, str],
        revision: str,
    ) -> ServiceState:
        """Replace the line's service with one serving ``model_version``; reuse it if already so."""
        running = self.current(model_line)
        if (
            running
            and (running.model_version, running.port, running.revision) == (model_version, port, revision)
            and running.answers_as_itself()
        ):
            log.info("Service for %s v%s already serving (pid %d): reusing it", model_line, model_version, running.pid)
            return running
        if running:
            self.stop(model_line)
        if _port_in_use(port):
            log.warning(
                "Port %d is already in use by a process this deployer did not start: the new service cannot "
                "bind it, and verification will see whatever answers there",
                port,
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.state_dir / f"{model_line}.log"
        child_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))},
            **env,
            "MODEL_LINE": model_line,
            "MODEL_NAME": model_name,
            "MODEL_VERSION": model_version,
            "SERVICE_REVISION": revision,
        }
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--app-dir",
            str(self.service_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        state = ServiceState(
            model_line=model_line,
            model_version=model_version,
            pid=proc.pid,
            port=port,
            url=f"http://127.0.0.1:{port}",
            log_file=str(log_file),
            started_at=time.time(),
            revision=revision,
        )
        self._state_file(model_line).write_text(json.dumps(asdict(state), indent=2))
        log.info(
            "Started service for %s v%s: pid %d at %s (log %s)",
            model_line,
            model_version,
            proc.pid,
            state.url,
            log_file,
        )
        return state

    def stop(self, model_line: str, grace_seconds: float = 15.0) -> None:
        """Stop the line's service (graceful SIGTERM, then SIGKILL) and forget it."""
        state_file = self._state_file(model_line)
        running = self.current(model_line)
        if running:
            log.info("Stopping service for %s v%s (pid %d)", model_line, running.model_version, running.pid)
            try:
                os.killpg(running.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_seconds
            while _alive(running.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
                try:
                    os.waitpid(running.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            if _alive(running.pid):
                os.killpg(running.pid, signal.SIGKILL)
        state_file.unlink(missing_ok=True)
