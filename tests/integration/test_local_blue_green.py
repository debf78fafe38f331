"""Local deploys are blue/green: the deployer, the line's front on the stable port and real services, for real.

A client hammers the stable port with fresh connections the whole time. v1 serves; a v2 whose package
fails its golden-set check at start-up (a package built with a wrong golden set, checksums updated, so
only the model can tell) is stopped and v1 never stops answering; a pin whose package cannot be built
starts nothing; a good v2 takes over with not one failed request, v1 then v2 and never back.

The registered model and its packages come from test_model_service.py's builder (once per pytest process).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_model_service import (
    CODE_REVISION,
    DEPLOYMENT_DIR,
    MODEL_LINE,
    MODEL_NAME,
    REPO,
    Built,
    built_packages,
    free_port,
    service_env,
    sha256,
)

from hammer import Hammer
from mlops_lifecycle.adapters.local_service import LocalServiceDeployer, PackagingFailed, ServiceFailed

REVISION = "b" * 40


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_packages(tmp_path_factory)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("bluegreen")
    yield home
    LocalServiceDeployer(home).stop(MODEL_LINE)


def pin(built: Built, version: str, run_of: str | None = None) -> dict[str, str]:
    return {
        "model_line": MODEL_LINE,
        "model_name": MODEL_NAME,
        "model_version": version,
        "run_id": built.run_id(run_of or version),
    }


def place_package(built: Built, home: Path, version: str, wrong_golden_set: bool = False) -> Path:
    """Put the built package where the deployer finds it (``packages/<line>-v<N>-<run>``), so it reuses it.

    ``wrong_golden_set``: predictions off by one, the checksum updated: the package opens, the model loads,
    and the service's golden-set check at start-up fails.
    """
    out = home / "packages" / f"{MODEL_LINE}-v{version}-{built.run_id(version)[:12]}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(built.packages[version], out)
    if wrong_golden_set:
        golden = json.loads((out / "golden_set.json").read_text())
        golden["predictions"] = [p + 1.0 for p in golden["predictions"]]
        (out / "golden_set.json").write_text(json.dumps(golden))
        manifest = json.loads((out / "package.json").read_text())
        manifest["files"]["golden_set.json"] = sha256(out / "golden_set.json")
        (out / "package.json").write_text(json.dumps(manifest))
    return out


def test_a_failed_new_version_leaves_the_old_one_serving_and_a_good_one_switches_without_a_failed_request(
    built: Built, home: Path
) -> None:
    deployer = LocalServiceDeployer(home)
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": built.tracking_uri}
    stable = f"http://127.0.0.1:{port}"

    # v1, packaged by the deployer itself (the template's package step), behind the front
    v1 = deployer.deploy(pin(built, "1"), port, env, REVISION, timeout=120)
    front = deployer.front(MODEL_LINE)
    assert front is not None and front.port == port
    assert v1.port != port and v1.url != stable, "a backend never takes the stable port"
    state = deployer.state(MODEL_LINE)
    assert state is not None and state.serving == v1 and state.starting is None

    hammer = Hammer(port)
    hammer.start()
    try:
        time.sleep(0.5)
        # v2 whose start-up fails its golden-set check: stopped, v1 answered throughout
        place_package(built, home, "2", wrong_golden_set=True)
        with pytest.raises(ServiceFailed) as failed:
            deployer.deploy(pin(built, "2"), port, env, REVISION, timeout=120)
        assert "exited during start-up" in str(failed.value)
        assert f"v1 still serving on {stable}" in str(failed.value)
        bad_log = Path(home / "services" / f"{MODEL_LINE}-v2.log").read_text()
        assert '"startup_failed"' in bad_log and "golden row 0" in bad_log
        state = deployer.state(MODEL_LINE)
        assert state is not None and state.serving == v1 and state.starting is None

        # a pin whose package cannot be built (v2 with v1's run): nothing starts, v1 serves
        shutil.rmtree(home / "packages" / f"{MODEL_LINE}-v2-{built.run_id('2')[:12]}")
        with pytest.raises(PackagingFailed, match="not the pinned run"):
            deployer.deploy(pin(built, "2", run_of="1"), port, env, REVISION, timeout=120)
        state = deployer.state(MODEL_LINE)
        assert state is not None and state.serving == v1 and state.starting is None
        assert hammer.errors == [] and set(hammer.versions) == {"1"}, hammer.runs()
        before_switch = len(hammer.versions)

        # a good v2: starts beside v1, the front switches, v1 stops gracefully
        place_package(built, home, "2")
        v2 = deployer.deploy(pin(built, "2"), port, env, REVISION, timeout=120)
        time.sleep(0.5)
    finally:
        hammer.stop()

    assert hammer.errors == [], hammer.errors[:5]
    runs = hammer.runs()
    assert [version for version, _ in runs] == ["1", "2"], runs
    assert runs[0][1] > before_switch and runs[1][1] > 0
    assert not alive(v1.pid), "v1 still running after the switch"
    assert alive(v2.pid) and v2.port not in (port, v1.port)
    assert deployer.front(MODEL_LINE) == front, "the front was restarted"
    state = deployer.state(MODEL_LINE)
    assert state is not None and state.serving == v2 and state.starting is None
    print(f"\n/version on the stable port during the deploys: {runs}, 0 errors")

    # deploying what already serves is a no-op (a retry, a re-run)
    assert deployer.deploy(pin(built, "2"), port, env, REVISION, timeout=120) == v2
    assert deployer.front(MODEL_LINE) == front


def test_the_front_survives_being_started_twice_and_never_takes_a_port_it_does_not_own(home: Path) -> None:
    deployer = LocalServiceDeployer(home)
    front = deployer.front(MODEL_LINE)
    assert front is not None, "runs after the deploy test"
    argv = [sys.executable, "-m", "mlops_lifecycle.adapters.service_front", "--port", str(front.port)]
    argv += [
        "--state",
        str(home / "services" / f"{MODEL_LINE}.json"),
        "--lock",
        str(home / "services" / f"{MODEL_LINE}.front"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert deployer.front(MODEL_LINE) == front
    assert json.loads(_get(front.port, "/version"))["model_version"] == "2"

    # another line's front on a port something else holds: it says so and exits
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        other = [sys.executable, "-m", "mlops_lifecycle.adapters.service_front", "--port", str(taken)]
        other += ["--state", str(home / "services" / "other.json"), "--lock", str(home / "services" / "other.front")]
        refused = subprocess.run(other, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 3 and "in use by something else" in refused.stdout, refused.stdout


def test_stop_ends_the_front_and_the_services(home: Path) -> None:
    deployer = LocalServiceDeployer(home)
    front, state = deployer.front(MODEL_LINE), deployer.state(MODEL_LINE)
    assert front is not None and state is not None and state.serving is not None
    deployer.stop(MODEL_LINE)
    assert not alive(front.pid) and not alive(state.serving.pid)
    assert not listening(front.port) and not listening(state.serving.port)
    assert deployer.state(MODEL_LINE) is None and deployer.front(MODEL_LINE) is None


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_a_service_deployed_in_place_before_blue_green_is_taken_over_by_the_front(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What an earlier version of the deployer left running (the service itself on the stable port, the old
    state file) is replaced once: stopped at the switch, after which the front owns the port."""
    home = tmp_path_factory.mktemp("in_place")
    deployer = LocalServiceDeployer(home)
    port = free_port()
    package = place_package(built, home, "1")
    place_package(built, home, "2")
    (home / "services").mkdir()
    log_file = home / "services" / f"{MODEL_LINE}.log"
    argv = [sys.executable, "-m", "uvicorn", "model_service.app:app", "--app-dir", str(DEPLOYMENT_DIR)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with log_file.open("ab") as out:
        old = subprocess.Popen(
            argv, env=service_env(package, "1"), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    legacy = {
        "model_line": MODEL_LINE,
        "model_version": "1",
        "pid": old.pid,
        "port": port,
        "url": f"http://127.0.0.1:{port}",
        "log_file": str(log_file),
        "started_at": time.time(),
        "revision": CODE_REVISION,
    }
    (home / "services" / f"{MODEL_LINE}.json").write_text(json.dumps(legacy))
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert old.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        state = deployer.state(MODEL_LINE)
        assert state is not None and state.serving is not None and state.serving.pid == old.pid

        v2 = deployer.deploy(pin(built, "2"), port, {}, REVISION, timeout=120)

        assert old.wait(timeout=30) is not None
        front = deployer.front(MODEL_LINE)
        assert front is not None and front.port == port and v2.port != port
        assert json.loads(_get(port, "/version"))["model_version"] == "2"
    finally:
        deployer.stop(MODEL_LINE)
        if old.poll() is None:
            old.kill()
