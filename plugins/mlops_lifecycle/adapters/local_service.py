"""Deploy, embedded local adapter: the model microservice as local processes, blue/green behind a stable front.

It does what the deployment repository's pipeline and Kubernetes do, without Docker: the ``package``
step of the template (``include/deployment``) downloads the pinned version into a model package (the
image's ``/opt/model``), then the service process starts from the template's code with that package,
so it never calls the registry. The package is reused while the pin is the same.

Clients use one stable port per line (``deploy.port``), owned by the line's front (``service_front``,
a small TCP proxy standing for the Kubernetes Service). A deployment is blue/green:

- ``start``: the new version's service starts beside the serving one, on a free side port; the old one
  keeps serving while the new one loads and checks its golden set (the service does that before it
  opens its port, and exits if it fails);
- once the new one reports the approved identity on ``/version`` (the caller waits: the operator in the
  triggerer, ``deploy`` here), ``switch`` points the front at it (new connections go there, open ones
  finish where they started) and only then stops the old one gracefully;
- a new service that fails or never reports its identity is stopped by ``abandon``: the old one never
  stopped serving.

Re-deploying what already serves is a no-op (a retry, a re-run). Processes keep running after the task
ends, as a deployment would; ``stop`` (``make down``) ends the line's front and services.

Under the local home: ``services/<line>.json`` (state: the stable port, the serving backend and the one
starting; the front routes by it), ``services/<line>.front`` (the front's lock, pid and port) and
``<line>.front.log``, ``services/<line>-v<N>.log`` (each version's service log),
``packages/<line>-v<N>-<run>/`` (model packages), ``predictions/`` (read by drift monitoring).
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
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlops_lifecycle import paths
from mlops_lifecycle.contract import IDENTITY_FIELDS, identity_mismatch

log = logging.getLogger(__name__)

PLUGINS_DIR = Path(__file__).resolve().parents[2]  # on sys.path of the front's process
FRONT_MODULE = "mlops_lifecycle.adapters.service_front"
SWITCH_DRAIN_SECONDS = 0.3  # after the front routes to the new service: connections just made reach the old one


@dataclass(frozen=True)
class ServiceState:
    """One service process of a line: a backend on a side port, behind the line's front."""

    model_line: str
    model_version: str
    pid: int
    port: int
    url: str
    log_file: str
    started_at: float
    revision: str = ""
    model_name: str = ""
    run_id: str = ""

    def identity(self) -> dict[str, str]:
        """What its ``/version`` must report (``contract.serving_identity``; fields it knows)."""
        known = {
            "model_line": self.model_line,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "run_id": self.run_id,
            "code_revision": self.revision,
        }
        return {field: known[field] for field in IDENTITY_FIELDS if known[field]}

    def answers_as_itself(self) -> bool:
        """True if its ``/version`` answers with this deployment's identity (not just a live pid)."""
        return _answers(self.url, self.identity())


@dataclass(frozen=True)
class LineState:
    """The state file: the stable port (the front's) and both backends, the serving one and the one starting."""

    model_line: str
    port: int
    serving: ServiceState | None = None
    starting: ServiceState | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Rollout:
    """What ``start`` did: the service to wait for (``new``) and what serves meanwhile (``serving``).

    ``reused``: ``new`` already serves the pinned deployment behind the front; nothing to wait for.
    """

    model_line: str
    url: str  # the stable URL (the front)
    new: ServiceState
    serving: ServiceState | None
    reused: bool


@dataclass(frozen=True)
class FrontState:
    pid: int
    port: int


def _child_env() -> dict[str, str]:
    """This process's environment without Airflow's and MLflow's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}


def _cmdline_has(pid: int, *parts: bytes) -> bool:
    """The pid runs a command line holding ``parts`` (after a reboot a recorded pid may belong to anything)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid as before
    return all(part in cmdline for part in parts)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port(avoid: int) -> int:
    """A free loopback port for a backend: never the stable one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port


def _answers(url: str, identity: dict[str, str], timeout: float = 3.0) -> bool:
    """``url``/version answers with every field of ``identity``."""
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=timeout) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return isinstance(answer, dict) and not identity_mismatch(answer, identity)


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child of ours not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return status != "Z"
    except (OSError, IndexError):
        return True


def _terminate(pid: int, grace_seconds: float) -> None:
    """SIGTERM the process group (graceful: uvicorn finishes open requests), SIGKILL after ``grace_seconds``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class PackagingFailed(RuntimeError):
    """The template's ``package`` step failed (unknown version, pin and registry disagree, MLflow down)."""


class ServiceFailed(RuntimeError):
    """The new service did not come up serving its identity: it was stopped, the old one still serves."""


class LocalServiceDeployer:
    def __init__(self, home: Path) -> None:
        self.state_dir = home / "services"
        self.packages_dir = home / "packages"
        self.predictions_dir = home / "predictions"
        self.template_dir = paths.deployment_dir()

    # -- packages ---------------------------------------------------------------------------------
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

    # -- state ------------------------------------------------------------------------------------
    def _state_file(self, model_line: str) -> Path:
        return self.state_dir / f"{model_line}.json"

    def _front_file(self, model_line: str) -> Path:
        return self.state_dir / f"{model_line}.front"

    def state(self, model_line: str) -> LineState | None:
        """The line's state, with backends that are no longer running left out."""
        try:
            data = json.loads(self._state_file(model_line).read_text())
        except (OSError, ValueError):
            return None
        if "pid" in data:  # written before blue/green: the service itself held the stable port
            legacy = ServiceState(**data)
            return LineState(model_line, legacy.port, serving=self._running(asdict(legacy)))
        return LineState(
            model_line, int(data["port"]), self._running(data.get("serving")), self._running(data.get("starting"))
        )

    @staticmethod
    def _running(data: dict[str, Any] | None) -> ServiceState | None:
        if not data:
            return None
        service = ServiceState(**data)
        return service if process_alive(service.pid) and _cmdline_has(service.pid, b"model_service.app") else None

    def _write(self, state: LineState) -> None:
        """Atomically (the front re-reads it on change and must never see half a file)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_file(state.model_line)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(state), indent=2))
        os.replace(partial, path)

    def current(self, model_line: str) -> ServiceState | None:
        """The service the line's front routes to."""
        state = self.state(model_line)
        return state.serving if state else None

    # -- the front --------------------------------------------------------------------------------
    def front(self, model_line: str) -> FrontState | None:
        """The line's front, if it runs and listens."""
        try:
            data = json.loads(self._front_file(model_line).read_text())
            front = FrontState(pid=int(data["pid"]), port=int(data["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        lock = str(self._front_file(model_line)).encode()
        return front if process_alive(front.pid) and _cmdline_has(front.pid, FRONT_MODULE.encode(), lock) else None

    def _ensure_front(self, state: LineState) -> bool:
        """Make the line's front listen on its stable port; False if it cannot (said in the log)."""
        if state.serving is not None and state.serving.port == state.port:
            return False  # a service from before blue/green holds the port itself until the switch
        running = self.front(state.model_line)
        if running and running.port == state.port:
            return True
        if running:
            log.info("%s's stable port is now %d: stopping its front on %d", state.model_line, state.port, running.port)
            _terminate(running.pid, grace_seconds=10)
        if _port_in_use(state.port):
            log.warning(
                "Port %d is in use by a process this deployer did not start: %s's front cannot take it, so "
                "clients and verification on that port reach whatever answers there",
                state.port,
                state.model_line,
            )
            return False
        return self._start_front(state.model_line, state.port)

    def _start_front(self, model_line: str, port: int) -> bool:
        argv = [sys.executable, "-m", FRONT_MODULE, "--port", str(port)]
        argv += ["--state", str(self._state_file(model_line)), "--lock", str(self._front_file(model_line))]
        env = _child_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS_DIR), env.get("PYTHONPATH")]))
        front_log = self.state_dir / f"{model_line}.front.log"
        with open(front_log, "ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            exited = proc.poll() is not None  # 0: another front of the line got there first
            running = self.front(model_line)
            if running and running.port == port:
                log.info(
                    "Front of %s listening on 127.0.0.1:%d (pid %d, log %s)", model_line, port, running.pid, front_log
                )
                return True
            if exited:
                break
            time.sleep(0.05)
        log.warning(
            "The front of %s could not listen on port %d (exit %s): see %s", model_line, port, proc.poll(), front_log
        )
        return False

    # -- deploy -----------------------------------------------------------------------------------
    def start(self, pin: dict[str, str], port: int, env: dict[str, str], revision: str) -> Rollout:
        """Start the pinned version beside the serving one (or find it already serving, or already starting).

        ``pin``: model_line, model_name, model_version, run_id. ``port``: the stable port. ``env`` reaches
        MLflow for packaging only; the service itself gets none of it.
        """
        model_line, model_version = pin["model_line"], pin["model_version"]
        state = self.state(model_line) or LineState(model_line, port)
        state = replace(state, port=port)  # the YAML decides the stable port (a moved one moves the front)
        wanted = {
            "model_line": model_line,
            "model_name": pin["model_name"],
            "model_version": model_version,
            "run_id": pin["run_id"],
            "code_revision": revision,
        }
        serving, starting = state.serving, state.starting
        if starting and starting.identity() != wanted:
            log.info("Stopping %s v%s (pid %d), left starting by an earlier deployment", *_who(starting))
            _terminate(starting.pid, grace_seconds=10)
            state, starting = replace(state, starting=None), None
        if serving and serving.identity() == wanted and serving.answers_as_itself():
            self._write(state)
            self._ensure_front(state)
            log.info("%s v%s already serving (pid %d) behind %s: reusing it", *_who(serving), state.url)
            return Rollout(model_line, state.url, serving, serving, reused=True)
        if starting:  # a retry while the same deployment is still loading: wait for that one
            self._write(state)
            self._ensure_front(state)
            log.info("%s v%s already starting (pid %d) at %s: waiting for it", *_who(starting), starting.url)
            return Rollout(model_line, state.url, starting, serving, reused=False)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_file(model_line, model_version)
        package = self.package(pin, env, log_file)  # a failed build starts nothing: the old one keeps serving
        self._write(state)
        self._ensure_front(state)  # before the new service: the front keeps clients on the serving one
        side_port = _free_port(avoid=port)
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
            str(side_port),
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
        new = ServiceState(
            model_line=model_line,
            model_version=model_version,
            pid=proc.pid,
            port=side_port,
            url=f"http://127.0.0.1:{side_port}",
            log_file=str(log_file),
            started_at=time.time(),
            revision=revision,
            model_name=pin["model_name"],
            run_id=pin["run_id"],
        )
        self._write(replace(state, starting=new))
        log.info("Started %s v%s: pid %d at %s (log %s)", *_who(new), new.url, log_file)
        if serving:
            log.info(
                "v%s keeps serving %s until v%s reports its identity", serving.model_version, state.url, model_version
            )
        return Rollout(model_line, state.url, new, serving, reused=False)

    def switch(self, model_line: str, new: ServiceState) -> ServiceState:
        """Point the front at ``new`` (it reported its identity), then stop the old service gracefully."""
        state = self.state(model_line)
        if state and state.serving and state.serving.pid == new.pid:
            return state.serving  # already switched (a retry)
        if not state or not state.starting or state.starting.pid != new.pid:
            raise ServiceFailed(f"{model_line} v{new.model_version} (pid {new.pid}) is no longer the service starting")
        if not new.answers_as_itself():
            raise ServiceFailed(f"{model_line} v{new.model_version} (pid {new.pid}) no longer answers at {new.url}")
        old = state.serving
        if old and old.port == state.port:  # from before blue/green: it must free the stable port for the front
            log.info(
                "Stopping %s v%s, which holds port %d itself (deployed in place)",
                model_line,
                old.model_version,
                state.port,
            )
            _terminate(old.pid, grace_seconds=25)
            old = None
        switched = replace(state, serving=new, starting=None)
        self._write(switched)
        if self._ensure_front(switched) and not self._front_routes_to(state.url, new):
            log.warning("The front of %s does not answer as v%s yet", model_line, new.model_version)
        if old:
            time.sleep(SWITCH_DRAIN_SECONDS)
            log.info("Stopping %s v%s (pid %d): its open requests finish first", model_line, old.model_version, old.pid)
            _terminate(old.pid, grace_seconds=25)
        log.info("%s now serves %s v%s (pid %d, %s)", state.url, model_line, new.model_version, new.pid, new.url)
        return new

    @staticmethod
    def _front_routes_to(url: str, new: ServiceState, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not _answers(url, new.identity()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def backend(self, model_line: str, url: str) -> ServiceState | None:
        """The line's running service at ``url`` (its side URL): the one starting, or already serving."""
        state = self.state(model_line)
        found = [s for s in (state.starting, state.serving) if s and s.url == url] if state else []
        return found[0] if found else None

    def abandon(self, model_line: str, url: str) -> ServiceState | None:
        """Stop the service starting at ``url`` (it did not come up as itself) and forget it; what still serves."""
        state = self.state(model_line)
        if state is None:
            return None
        starting = state.starting
        if starting and starting.url == url:
            log.info("Stopping %s v%s (pid %d): it did not come up; log %s", *_who(starting), starting.log_file)
            _terminate(starting.pid, grace_seconds=10)
            state = replace(state, starting=None)
        self._write(state)  # without a service that already exited, too
        return state.serving

    def log_file(self, model_line: str, model_version: str) -> Path:
        """The service log of one version of the line."""
        return self.state_dir / f"{model_line}-v{model_version}.log"

    def wait_until_serving(self, new: ServiceState, timeout: float, poll_interval: float = 0.2) -> None:
        """Block until ``new`` reports its identity; ServiceFailed if it exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not new.answers_as_itself():
            if not process_alive(new.pid):
                raise ServiceFailed(
                    f"{new.model_line} v{new.model_version} exited during start-up (log {new.log_file})"
                )
            if time.monotonic() >= deadline:
                raise ServiceFailed(
                    f"{new.model_line} v{new.model_version} did not report its identity at {new.url} within "
                    f"{timeout:.0f} s (log {new.log_file})"
                )
            time.sleep(poll_interval)

    def deploy(
        self, pin: dict[str, str], port: int, env: dict[str, str], revision: str, timeout: float = 180.0
    ) -> ServiceState:
        """``start``, wait (blocking) until the new service answers as itself, ``switch``: what a CI job does.

        The operator does the same with the wait deferred to the triggerer. ServiceFailed if the new one
        does not come up; the old one then still serves.
        """
        rollout = self.start(pin, port, env, revision)
        if rollout.reused:
            return rollout.new
        try:
            self.wait_until_serving(rollout.new, timeout)
        except ServiceFailed as exc:
            still = self.abandon(rollout.model_line, rollout.new.url)
            raise ServiceFailed(f"{exc}; {still_serving(still, rollout.url)}") from None
        return self.switch(rollout.model_line, rollout.new)

    # -- stop -------------------------------------------------------------------------------------
    def stop(self, model_line: str, grace_seconds: float = 25.0) -> None:
        """Stop the line's front and services (graceful SIGTERM, then SIGKILL) and forget them."""
        front = self.front(model_line)
        if front:
            log.info("Stopping the front of %s on port %d (pid %d)", model_line, front.port, front.pid)
            _terminate(front.pid, grace_seconds=10)
        state = self.state(model_line)
        for service in (state.serving, state.starting) if state else ():
            if service:
                log.info("Stopping service for %s v%s (pid %d)", model_line, service.model_version, service.pid)
                _terminate(service.pid, grace_seconds)
        self._state_file(model_line).unlink(missing_ok=True)


def _who(service: ServiceState) -> tuple[str, str, int]:
    return service.model_line, service.model_version, service.pid


def still_serving(serving: ServiceState | None, url: str) -> str:
    """What clients of ``url`` get now, for failure messages."""
    if serving is None:
        return f"nothing was serving {url} before this deployment, and nothing does now"
    return f"v{serving.model_version} still serving on {url}"
