"""Deploy, embedded local adapter: the model microservice as a local process, one per model line.

It does what the deployment repository's pipeline does, without Docker or Kubernetes: the ``package``
step of the template (``include/deployment``) downloads the pinned version into a model package (the
image's ``/opt/model``), then the service process starts from the template's code with that package,
so it never calls the registry. The package is reused while the pin is the same. The process keeps
running after the task ends, as a deployment would; its pid, port and version are kept in a state
file so the next deployment replaces it and a retry reuses it. Starting returns at once; whether the
right version answers is the verify step's job (a deferrable wait), exactly as with Kubernetes.

Under the local home: ``services/<line>.json|.log`` (state, service log), ``packages/<line>-v<N>-<run>/``
(model packages), ``predictions/`` (the prediction log that drift monitoring reads).
"""

from __future__ import annotations

import contextlib
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
from datetime import UTC, datetime
from pathlib import Path

from mlops_lifecycle import paths
from mlops_lifecycle.contract import identity_mismatch

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
        """True if ``/version`` answers with this deployment's version and code revision (not just a live pid)."""
        try:
            with urllib.request.urlopen(f"{self.url}/version", timeout=3) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError):
            return False
        expected = {"model_version": self.model_version, "code_revision": self.revision}
        return isinstance(answer, dict) and not identity_mismatch(answer, expected)


def _child_env() -> dict[str, str]:
    """This process's environment without Airflow's and MLflow's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}


def _is_model_service(pid: int) -> bool:
    """The pid runs our service (after a reboot a recorded pid may belong to anything)."""
    try:
        return b"model_service.app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid as before


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


class PackagingFailed(RuntimeError):
    """The template's ``package`` step failed (unknown version, pin and registry disagree, MLflow down)."""


class LocalServiceDeployer:
    def __init__(self, home: Path) -> None:
        self.state_dir = home / "services"
        self.packages_dir = home / "packages"
        self.predictions_dir = home / "predictions"
        self.template_dir = paths.deployment_dir()

    def package(self, pin: dict[str, str], env: dict[str, str], log_file: Path) -> Path:
        """The model package of ``pin`` (built by the template's ``package`` step unless already there)."""
        name = f"{pin['model_line']}-v{pin['model_version']}-{pin['run_id'][:12]}"
        out = self.packages_dir / name
        try:
            manifest = json.loads((out / "package.json").read_text())
        except (OSError, ValueError):
            manifest = {}
        if all(str(manifest.get(key)) == str(value) for key, value in pin.items()):
            log.info("Model package %s already built at %s: reusing it", name, manifest.get("packaged_at"))
            return out
        self.packages_dir.mkdir(parents=True, exist_ok=True)
        pin_file = self.packages_dir / f"{name}.pin.yaml"
        pin_file.write_text("".join(f'{key}: "{value}"\n' for key, value in pin.items()))
        log.info("Packaging %s v%s (run %s) into %s", pin["model_name"], pin["model_version"], pin["run_id"], out)
        argv = [sys.executable, "-m", "model_service.cli", "package", "--pin", str(pin_file), "--out", str(out)]
        result = subprocess.run(
            argv, cwd=self.template_dir, env={**_child_env(), **env}, capture_output=True, text=True, check=False
        )
        with open(log_file, "a") as handle:
            handle.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise PackagingFailed(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output")
        log.info("%s", result.stdout.strip())
        return out

    def _state_file(self, model_line: str) -> Path:
        return self.state_dir / f"{model_line}.json"

    def current(self, model_line: str) -> ServiceState | None:
        path = self._state_file(model_line)
        if not path.exists():
            return None
        state = ServiceState(**json.loads(path.read_text()))
        return state if _alive(state.pid) and _is_model_service(state.pid) else None

    def deploy(self, pin: dict[str, str], port: int, env: dict[str, str], revision: str) -> ServiceState:
        """Replace the line's service with one serving the pinned version; reuse it if already so.

        ``pin``: model_line, model_name, model_version, run_id. ``env`` reaches MLflow for packaging
        only; the service itself gets none of it.
        """
        model_line, model_version = pin["model_line"], pin["model_version"]
        running = self.current(model_line)
        if (
            running
            and (running.model_version, running.port, running.revision) == (model_version, port, revision)
            and running.answers_as_itself()
        ):
            log.info("Service for %s v%s already serving (pid %d): reusing it", model_line, model_version, running.pid)
            return running
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.state_dir / f"{model_line}.log"
        package = self.package(pin, env, log_file)  # before stopping: a failed build leaves the old one serving
        if running:
            self.stop(model_line)
        if _port_in_use(port):
            log.warning(
                "Port %d is already in use by a process this deployer did not start: the new service cannot "
                "bind it, and verification will see whatever answers there",
                port,
            )
        child_env = {
            **_child_env(),
            "MODEL_DIR": str(package),
            "MODEL_LINE": model_line,
            "MODEL_NAME": pin["model_name"],
            "MODEL_VERSION": model_version,
            "CODE_REVISION": revision,
            "IMAGE_BUILT_AT": datetime.now(UTC).isoformat(timespec="seconds"),
            "PREDICTION_LOG_DIR": str(self.predictions_dir),
        }
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "model_service.app:app",
            "--app-dir",
            str(self.template_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            "20",
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

    def stop(self, model_line: str, grace_seconds: float = 25.0) -> None:
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
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.pid, signal.SIGKILL)
        state_file.unlink(missing_ok=True)
