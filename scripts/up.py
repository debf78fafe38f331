"""`make up`: the Airflow UI (standalone: API server, scheduler, triggerer, DAG processor) on :8080 and the
MLflow UI on :5000, over the same .local/ state as `make demo`. Ctrl-C stops both.

`make down` (``--stop-services``) stops the model services that deployments left running, and their fronts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import devstack  # noqa: E402
from mlops_lifecycle import paths  # noqa: E402
from mlops_lifecycle.adapters.local_service import LocalServiceDeployer  # noqa: E402


def stop_services() -> None:
    """Each line's front (the stable port) and services: every line with a state file or a front."""
    deployer = LocalServiceDeployer(paths.local_home())
    services = paths.local_home() / "services"
    for line in sorted({path.stem for pattern in ("*.json", "*.front") for path in services.glob(pattern)}):
        deployer.stop(line)
        print(f"stopped the {line} service and its front")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def admin_password_file(airflow_home: Path) -> Path:
    """The admin password, made here (owner-only file) so that `airflow standalone` never prints it."""
    import json
    import secrets

    path = airflow_home / "simple_auth_manager_passwords.json.generated"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"admin": secrets.token_urlsafe(18)}, handle)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", "5000")))
    parser.add_argument("--stop-services", action="store_true", help="stop the local model services and exit")
    args = parser.parse_args()
    if args.stop_services:
        stop_services()
        return 0

    api_port = int(os.environ.get("AIRFLOW__API__PORT", "8080"))
    if devstack.port_open(api_port):
        print(
            f"Port {api_port} is already in use (another Airflow?). Stop it, or choose another port: "
            f"AIRFLOW__API__PORT=8081 AIRFLOW__API__BASE_URL=http://127.0.0.1:8081 make up",
            file=sys.stderr,
        )
        return 2
    home = paths.local_home()
    server = devstack.MlflowServer(home / "mlflow", args.mlflow_port)
    env = {**os.environ, **devstack.stack_env(home, server.url)}
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )  # standalone spawns `airflow`
    # loopback only unless asked otherwise: the local stack has an admin account and no TLS
    env.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
    os.environ.update(env)
    devstack.migrate_airflow_db(env)
    airflow_home = Path(env["AIRFLOW_HOME"])
    passwords = admin_password_file(airflow_home)
    server.start()
    print(f"MLflow UI   {server.url}")
    exposed = "" if env["AIRFLOW__API__HOST"] in ("127.0.0.1", "localhost", "::1") else " (ALL INTERFACES)"
    print(f"Airflow UI  http://{env['AIRFLOW__API__HOST']}:{api_port}{exposed}  (user admin; password in {passwords})")
    if not exposed:
        print("            loopback only; to expose it deliberately: AIRFLOW__API__HOST=0.0.0.0 make up")
    print("Approve reviews under Browse > Required Actions. Ctrl-C stops both.", flush=True)
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.Popen([str(airflow), "standalone"], env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both like Ctrl-C does
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
