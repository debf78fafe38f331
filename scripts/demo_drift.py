"""`make demo-drift`: a drift breach, its alert and the retrain it requests, under `airflow standalone`.

Over the same .local/ state as `make demo` (whose lifecycle it runs first when production serves nothing):
ordinary traffic to the line's service, then traffic with one feature shifted (``price`` x1.8); a manual
run of the drift monitor over that stretch, triggered through the REST API; its breach, the owners' alert
and the retrain request; and the lifecycle run the scheduler starts from that request, which trains on data
up to the request and goes to production (demand_forecast approves automatically). Exit code 0 only if the
breach is in ``price``, the alert was recorded and the requested run put a new version in production.

It runs `airflow standalone` (output in .local/airflow/demo-drift-standalone.log) and the MLflow server
while it works and stops both on the way out, also on Ctrl-C or SIGTERM; the DAGs it unpaused are paused
again. The model service stays up, as after `make demo` (`make down` stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import httpx  # noqa: E402

import demo  # noqa: E402
import devstack  # noqa: E402
from up import _interrupt, admin_password_file  # noqa: E402

SHIFTED, FACTOR = "price", 1.8
FINISHED = ("success", "failed")
MONITOR_TIMEOUT, REQUEST_TIMEOUT, LIFECYCLE_TIMEOUT = 600, 300, 1200  # seconds; a 2-core laptop, busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo.add_stack_arguments(parser)
    parser.add_argument("--rows", type=int, default=500, help="rows of each kind of traffic (default 500)")
    args = parser.parse_args()
    for signum in (signal.SIGINT, signal.SIGTERM):  # `kill` stops what it started, as Ctrl-C does (even where
        signal.signal(signum, _interrupt)  # SIGINT came ignored: `make demo-drift &` in a script)
    began = time.monotonic()
    server, config = demo.prepare(args.model_line, args.mlflow_port)
    log = Path(os.environ["AIRFLOW_HOME"]) / "demo-drift-standalone.log"
    proc, api, unpaused, runs = None, None, [], []  # runs: (dag_id, run_id) the demo made or waits for
    try:
        server.start()
        before = serving(config)
        if before is None:
            print("==> production serves nothing yet: its lifecycle first, as `make demo` runs it", flush=True)
            ran = demo.lifecycle(config, server.url, log.with_name("demo-drift-lifecycle.log"))
            if ran != 0 or (before := serving(config)) is None:
                print("The lifecycle did not put a version in production: no drift to demo", file=sys.stderr)
                return 1
        service = f"http://127.0.0.1:{config.deploy.port}"
        print(f"==> production serves {config.registry.model_name} v{before} on {service}")
        print(f"==> airflow standalone (its output: {log})", flush=True)
        port = os.environ.get("AIRFLOW__API__PORT")
        env = {"AIRFLOW__API__HOST": "127.0.0.1", **os.environ}  # loopback only, as `make up`
        passwords = admin_password_file(Path(os.environ["AIRFLOW_HOME"]))  # made here: never printed
        proc, url = devstack.launch_standalone(env, log, api_port=int(port) if port else None)
        api = login(url, json.loads(passwords.read_text())["admin"])
        print(f"    healthy at {url}, {time.monotonic() - began:.0f} s in (user admin, password in {passwords})")
        lifecycle, monitor = config.lifecycle_dag_id, config.monitor_dag_id
        for dag_id in (lifecycle, monitor):
            wait("the DAG processor to parse " + dag_id, lambda d=dag_id: api.get(f"/api/v2/dags/{d}").is_success, 120)
        unpaused_at = datetime.now(UTC)
        for dag_id in (lifecycle, monitor):
            if get(api, f"/api/v2/dags/{dag_id}")["is_paused"]:
                unpause = lambda d=dag_id: check(api.patch(f"/api/v2/dags/{d}", json={"is_paused": False}))  # noqa: E731
                wait(f"{dag_id} to be unpaused", unpause, timeout=60)
                unpaused.append(dag_id)
        print(
            f"==> unpaused {', '.join(unpaused) or 'nothing (both were unpaused already)'}: the scheduler queues each "
            "one's latest scheduled interval if it has not run yet"
        )

        since = datetime.now(UTC) - timedelta(seconds=1)
        ordinary = traffic(config, before, args.rows, seed=1)
        send(service, ordinary)
        send(service, [row | {SHIFTED: row[SHIFTED] * FACTOR} for row in traffic(config, before, args.rows, seed=2)])
        time.sleep(1.5)  # the service writes its prediction log every 0.5 s
        until = datetime.now(UTC)
        print(
            f"==> sent {args.rows} ordinary rows, then {args.rows} with {SHIFTED} x{FACTOR} (from v{before}'s "
            f"training snapshot) to {service}/predict, {since:%H:%M:%S}..{until:%H:%M:%S} UTC"
        )

        conf = {"since": since.isoformat(), "until": until.isoformat()}
        made = check(api.post(f"/api/v2/dags/{monitor}/dagRuns", json={"logical_date": None, "conf": conf}))
        check_run = made["dag_run_id"]
        runs.append((monitor, check_run))
        print(f"==> triggered {monitor} {check_run} with conf {json.dumps(conf)}", flush=True)
        checked = wait_run(api, monitor, check_run, MONITOR_TIMEOUT, began)
        tasks = task_states(api, monitor, check_run)
        findings = xcom(api, monitor, check_run, "check_drift")
        request = None
        if tasks.get("request_retrain") == "success":
            request = wait(
                "the scheduler to start the requested lifecycle run",
                lambda: requested_run(api, monitor, check_run, lifecycle),
                REQUEST_TIMEOUT,
            )
            print(f"==> the retrain request started {lifecycle} {request[1]['dag_run_id']}", flush=True)
            runs.append((lifecycle, request[1]["dag_run_id"]))
            request = (request[0], wait_run(api, lifecycle, request[1]["dag_run_id"], LIFECYCLE_TIMEOUT, began))
        # the scheduled runs the unpausing queued: finished before Airflow is stopped, and reported
        others = settle(
            api,
            (lifecycle, monitor),
            unpaused_at,
            exclude={check_run, request[1]["dag_run_id"]} if request else {check_run},
            began=began,
        )
        return summarize(config, api, checked, tasks, findings, request, others, before, server.url, began, log)
    except (ApiError, TimeoutError) as exc:
        print(f"\ndemo-drift stopped: {exc}\nAirflow's output: {log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted: stopping what the demo started", file=sys.stderr)
        for dag_id, run_id in runs if api is not None else ():
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                if (state := check(api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))["state"]) not in FINISHED:
                    print(
                        f"  left {state} in Airflow: {dag_id} {run_id} (it goes on when the DAG is next unpaused)",
                        file=sys.stderr,
                    )
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not interrupted half-way
            signal.signal(signum, signal.SIG_IGN)
        if api is not None:
            for dag_id in unpaused:  # as they were: paused, as `make up` finds them
                try:
                    pause = lambda d=dag_id: check(api.patch(f"/api/v2/dags/{d}", json={"is_paused": True}))  # noqa: E731
                    wait(f"{dag_id} to be paused again", pause, timeout=30)
                except (ApiError, TimeoutError) as exc:
                    print(f"could not pause {dag_id} again: {exc}", file=sys.stderr)
            api.close()
        if proc is not None:
            devstack.stop_standalone(proc)
        server.stop()


# --- the stack --------------------------------------------------------------------------------------------
def serving(config) -> str | None:  # noqa: ANN001
    """The production version, if the line's local service answers as it."""
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    version = MlflowRegistryHook().alias_version(config.registry.model_name, config.registry.production_alias)
    served = devstack.service_version(f"http://127.0.0.1:{config.deploy.port}") or {}
    return version if version is not None and str(served.get("model_version")) == version else None


def login(url: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    token = check(client.post("/auth/token", json={"username": "admin", "password": password}))
    client.headers["Authorization"] = f"Bearer {token['access_token']}"
    return client


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        request = response.request
        super().__init__(f"{request.method} {request.url}: {response.status_code} {response.text[:500]}")


def check(response: httpx.Response) -> Any:
    if not response.is_success:
        raise ApiError(response)
    return response.json()


def get(api: httpx.Client, path: str, params: dict | None = None) -> Any:
    """GET from the REST API, asked again for a minute while it fails (see ``wait``)."""
    return wait(f"GET {path}", lambda: check(api.get(path, params=params)), timeout=60, every=2)


def wait(what: str, probe, timeout: float, every: float = 1.0):  # noqa: ANN001, ANN201
    """``probe()`` until it returns something; the API failing meanwhile (SQLite locked by the scheduler, a
    dropped connection) is said and asked again, until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := probe():
                return value
        except (ApiError, httpx.TransportError) as exc:
            if isinstance(exc, ApiError) and exc.status < 500:
                raise
            print(f"    (the API failed while waiting for {what}: {exc}; asking again)", flush=True)
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --- traffic ----------------------------------------------------------------------------------------------
def traffic(config, version: str, rows: int, seed: int) -> list[dict]:  # noqa: ANN001
    """Rows like the version's training data: a random draw from its training snapshot (its features only)."""
    import pandas as pd

    from mlops_lifecycle.config import declared_features
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    snapshot = MlflowRegistryHook().version_tags(config.registry.model_name, version)["lifecycle.snapshot"]
    features = list(declared_features(config.entrypoint_path) or ())
    frame = pd.read_parquet(snapshot, columns=features).dropna()
    return json.loads(frame.sample(rows, random_state=seed).to_json(orient="records"))


def send(service: str, rows: list[dict], batch: int = 100) -> None:
    with httpx.Client(base_url=service, timeout=30) as client:
        for first in range(0, len(rows), batch):
            check(client.post("/predict", json={"rows": rows[first : first + batch]}))


# --- runs -------------------------------------------------------------------------------------------------
def task_states(api: httpx.Client, dag_id: str, run_id: str) -> dict[str, str | None]:
    tis = get(api, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    far = "9999"
    return {t["task_id"]: t["state"] for t in sorted(tis, key=lambda t: (t["start_date"] or far, t["task_id"]))}


def wait_run(api: httpx.Client, dag_id: str, run_id: str, timeout: float, began: float) -> dict:
    """Wait for a run to finish, printing a line whenever its state or its active tasks change."""
    shown = None

    def finished() -> dict | None:
        nonlocal shown
        run = get(api, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        active = [
            f"{t} {s}"
            for t, s in task_states(api, dag_id, run_id).items()
            if s not in (*FINISHED, "skipped", "upstream_failed", "removed", None)
        ]
        line = run["state"] + (f": {', '.join(active)}" if active else "")
        if run["state"] == "queued":
            ahead = [r["dag_run_id"] for r in active_runs(api, dag_id) if r["dag_run_id"] != run_id]
            line += f" (behind {', '.join(ahead)}: one run at a time)" if ahead else ""
        if line != shown:
            print(f"    [{time.monotonic() - began:4.0f} s] {run_id}: {line}", flush=True)
            shown = line
        return run if run["state"] in FINISHED else None

    return wait(f"{dag_id} {run_id} to finish", finished, timeout, every=2)


def active_runs(api: httpx.Client, dag_id: str) -> list[dict]:
    runs = get(api, f"/api/v2/dags/{dag_id}/dagRuns", params={"state": ["queued", "running"]})
    return list(runs["dag_runs"])


def xcom(api: httpx.Client, dag_id: str, run_id: str, task_id: str) -> Any:
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"

    def read() -> tuple[Any]:
        response = api.get(path)
        return (None,) if response.status_code == 404 else (check(response)["value"],)

    return wait(f"GET {path}", read, timeout=60, every=2)[0]


def requested_run(api: httpx.Client, monitor: str, check_run: str, lifecycle: str) -> tuple[dict, dict] | None:
    """(the retrain request: the asset event the monitor run emitted, the lifecycle run it created) once created."""
    events = get(api, "/api/v2/assets/events", params={"source_dag_id": monitor, "source_run_id": check_run})
    for event in events["asset_events"]:
        for created in event["created_dagruns"]:
            if created["dag_id"] == lifecycle:
                return event, get(api, f"/api/v2/dags/{lifecycle}/dagRuns/{created['run_id']}")
    return None


def settle(api: httpx.Client, dag_ids: tuple[str, ...], since: datetime, exclude: set[str], began: float) -> list[dict]:
    """The other runs of these DAGs queued since ``since`` (the scheduled intervals unpausing queued), finished."""
    found = []
    for dag_id in dag_ids:
        runs = get(api, f"/api/v2/dags/{dag_id}/dagRuns", params={"updated_at_gte": since.isoformat()})
        for run in runs["dag_runs"]:
            queued = run["queued_at"] and datetime.fromisoformat(run["queued_at"]) >= since
            if queued and run["dag_run_id"] not in exclude:
                found.append(
                    wait_run(api, dag_id, run["dag_run_id"], LIFECYCLE_TIMEOUT, began)
                    if run["state"] not in FINISHED
                    else run
                )
    return found


# --- the summary ------------------------------------------------------------------------------------------
def summarize(  # noqa: PLR0913
    config,  # noqa: ANN001
    api: httpx.Client,
    checked: dict,
    tasks: dict[str, str | None],
    findings: dict | None,
    request: tuple[dict, dict] | None,
    others: list[dict],
    before: str,
    tracking_uri: str,
    began: float,
    log: Path,
) -> int:
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook
    from mlops_lifecycle.notify import local_alerts_file
    from mlops_lifecycle.window import resolve_window

    reg = MlflowRegistryHook()
    out = [
        f"Drift check      {checked['dag_id']}  run {checked['dag_run_id']}: {checked['state']}",
        "  tasks: " + ", ".join(f"{t}={s}" for t, s in tasks.items()),
    ]
    drifted: set[str] = set()
    if findings is None:
        out.append("Findings         none (check_drift returned nothing)")
    else:
        out.append(
            f"Checked          {findings['interval_start']} .. {findings['interval_end']}, "
            f"bad log lines {findings['bad_log_lines']}"
        )
        for version, found in findings["versions"].items():
            drifted |= set(found["drifted"])
            out.append(
                f"  v{version}  {found['verdict']} ({found['rows']} rows)  drifted: "
                f"{', '.join(found['drifted']) or 'nothing'}"
            )
            out += [f"      {reason}" for reason in found["breaches"]]
            if found.get("report_url"):
                out.append(f"      report {found['report_url']}")
    target = local_alerts_file(config.model_line)
    records = [json.loads(line) for line in target.read_text().splitlines()] if target.exists() else []
    alerts = [a for a in records if a["kind"] == "drift_breach" and a["run_id"] == checked["dag_run_id"]]
    for alert in alerts:
        out.append(f"Alert            {alert['at']} to {', '.join(alert['to'])} ({alert['channel']}, {target}):")
        out.append(f"  {alert['subject']}: {alert['summary']}")
    if not alerts:
        out.append(f"Alert            none recorded for this run in {target}")
    ok_lifecycle, after = False, None
    if request is None:
        why = [
            reg.get_run(f["run_id"]).data.tags.get("monitor.retrain_because")
            for f in (findings or {}).get("versions", {}).values()
            if f["breaches"]
        ]
        out.append(
            f"Retrain request  none: request_retrain {tasks.get('request_retrain')}"
            + (f" ({next(filter(None, why), '')})" if any(why) else "")
        )
    else:
        event, run = request
        out.append(f"Retrain request  asset event {event['id']} {event['name']} at {event['timestamp']}")
        out.append(f"  {event['extra'].get('summary', '')}")
        window = resolve_window(config, None, None, datetime.fromisoformat(run["run_after"]), requested=True)
        result = devstack.LifecycleResult(
            run["dag_id"],
            run["dag_run_id"],
            run["state"],
            task_states(api, run["dag_id"], run["dag_run_id"]),
            float(run["duration"] or 0.0),
        )
        lines, ok_lifecycle, after, _ = demo.lifecycle_report(config, window, result, tracking_uri)
        out += [f"Requested run    {run['run_type']}, triggered by {run['triggered_by']}", *lines]
    for run in others:  # what each did, in a few words: its route, its version, or what failed and why
        states = task_states(api, run["dag_id"], run["dag_run_id"])
        said = {"skipped": "route skipped it (superseded)"}.get(str(states.get("route")), "")
        if states.get("route") == "success" and (candidate := xcom(api, run["dag_id"], run["dag_run_id"], "train")):
            said = f"its window's version v{candidate['model_version']} (run key {candidate['run_key']})"
        failed = [t for t, state in states.items() if state == "failed"]
        errors = {
            r["task_id"]: r["error"] for r in records if r["kind"] == "task_failed" and r["run_id"] == run["dag_run_id"]
        }
        out.append(
            f"Also ran         {run['dag_id']} {run['dag_run_id']} ({run['run_type']}): {run['state']}"
            + (f", {said}" if said else "")
        )
        out += [f"  {task} failed: {errors.get(task, 'see its log')[:300]}" for task in failed]
    moved = ok_lifecycle and after is not None and after != before
    ok = SHIFTED in drifted and bool(alerts) and moved
    out.append(f"Took             {time.monotonic() - began:.0f} s; Airflow's output in {log}")
    if ok:
        verdict = (
            f"breach in {SHIFTED} found, alert recorded, retrain requested: production now serves v{after} "
            f"(was v{before})"
        )
    else:
        retrain = (
            (
                f"the requested run put v{after} in production"
                if moved
                else "the requested run did NOT put a new version in production"
            )
            if request
            else "no retrain requested (see Retrain request)"
        )
        verdict = (
            f"NOT shown end to end: breach in {SHIFTED} {'found' if SHIFTED in drifted else 'NOT found'}, alert "
            f"{'recorded' if alerts else 'NOT recorded'}, {retrain}"
        )
    out.append(f"RESULT           {verdict}")
    print("\n".join([f"\n{'=' * 72}", *out, "=" * 72]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
