"""`make bench`: DAG-folder parse time for 1/10/100 model lines, one local lifecycle's wall time, and
the model service against `mlflow models serve` for the same model version; drift figures (bench_drift.py).

Prints tables; nothing here is a pass/fail test. Everything runs in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import http.client
import importlib.metadata
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import devstack  # noqa: E402
from mlops_lifecycle import paths  # noqa: E402

PARSE = r"""
import sys, time, json
t0 = time.perf_counter()
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
t2 = time.perf_counter()
assert not bag.import_errors, bag.import_errors
heavy = [m for m in ("airflow.providers.google.cloud.hooks.bigquery", "airflow.providers.databricks.hooks.databricks",
                      "google.cloud.bigquery", "gitlab", "mlflow", "pandas", "sklearn") if m in sys.modules]
print(json.dumps({"import_airflow": t1 - t0, "parse": t2 - t1, "dags": len(bag.dags), "heavy": heavy}))
"""

# what a task of the production adapters pays once, on top of Airflow, when it first needs a client
IMPORTS = r"""
import sys, time, json
import airflow.sdk
out = {}
for module in sys.argv[1:]:
    t = time.perf_counter()
    __import__(module)
    out[module] = time.perf_counter() - t
print(json.dumps(out))
"""
TASK_IMPORTS = {
    "extract (BigQuery)": [
        "airflow.providers.google.cloud.hooks.bigquery",
        "airflow.providers.google.cloud.triggers.bigquery",
    ],
    "train (Databricks)": [
        "airflow.providers.databricks.hooks.databricks",
        "airflow.providers.databricks.triggers.databricks",
    ],
    "review, delivery (GitLab)": ["gitlab"],
    "gate, stage, promote (MLflow)": ["mlflow.tracking"],
}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(line)


ADAPTERS = {
    "local": paths.include_dir() / "model_lines" / "demand_forecast.yaml",
    "production": paths.include_dir() / "examples" / "production" / "demand_forecast.yaml",
}


def write_lines(folder: Path, n: int, adapters: str = "local") -> None:
    base = yaml.safe_load(ADAPTERS[adapters].read_text())
    for i in range(n):
        data = copy.deepcopy(base)
        name = f"line_{i:03d}"
        data["model_line"] = name
        data["registry"].update(model_name=name, experiment=f"/bench/{name}")
        if "port" in data["deploy"]:
            data["deploy"]["port"] = 20000 + i
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))


def bench_parse(repeats: int) -> None:
    rows = []
    for adapters in ADAPTERS:
        for n in (1, 10, 100):
            samples = parse_samples(adapters, n, repeats)
            parse = statistics.median(s["parse"] for s in samples)
            base = statistics.median(s["import_airflow"] for s in samples)
            rows.append(
                [
                    adapters,
                    n,
                    samples[0]["dags"],
                    f"{base:.2f}",
                    f"{parse:.3f}",
                    f"{parse / n * 1000:.1f}",
                    "yes" if parse < 1.0 else "NO",
                    ", ".join(samples[0]["heavy"]) or "none",
                ]
            )
    table(
        f"DAG folder parse time, fresh process, median of {repeats} (target: 100 lines < 1 s beyond import airflow)",
        ["adapters", "model lines", "DAGs", "import airflow s", "parse s", "ms per line", "< 1 s", "heavy modules"],
        rows,
    )
    rows = []
    for task, modules in TASK_IMPORTS.items():
        out = subprocess.run([sys.executable, "-c", IMPORTS, *modules], capture_output=True, text=True, check=True)
        seconds = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([task, " + ".join(modules), f"{sum(seconds.values()):.2f}"])
    table(
        "Client imports a task pays once, in its own process, after Airflow (never at parse time)",
        ["task", "modules", "seconds"],
        rows,
    )


def parse_samples(adapters: str, n: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        write_lines(Path(tmp), n, adapters)
        env = {**os.environ, **devstack.stack_env(Path(tmp), "http://127.0.0.1:5000"), "MLOPS_MODEL_LINES_DIR": tmp}
        samples = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", PARSE, str(REPO / "dags")], env=env, capture_output=True, text=True, check=True
            )
            samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return samples


def bench_lifecycle() -> None:
    home = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    server = devstack.MlflowServer(home / "mlflow", devstack.free_port())
    os.environ.update(devstack.stack_env(home, server.url))
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"  # the tables, not the task logs
    (home / "model_lines").mkdir()
    base = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())
    base["deploy"]["port"] = devstack.free_port()
    (home / "model_lines" / "demand_forecast.yaml").write_text(yaml.safe_dump(base))
    os.environ["MLOPS_MODEL_LINES_DIR"] = str(home / "model_lines")
    devstack.migrate_airflow_db(dict(os.environ))
    server.start()
    try:
        started = time.monotonic()
        result = devstack.run_lifecycle("demand_forecast__lifecycle", datetime(2026, 11, 23, 3, tzinfo=UTC))
        wall = time.monotonic() - started
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        reg = MlflowRegistryHook()
        exp = reg.client.get_experiment_by_name(base["registry"]["experiment"])
        [run] = reg.client.search_runs([exp.experiment_id])
        mlflow_run = (run.info.end_time - run.info.start_time) / 1000
        fit = float(run.data.params.get("fit_seconds", "nan")) if "fit_seconds" in run.data.params else None
    finally:
        server.stop()
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

        LocalServiceDeployer(home).stop("demand_forecast")
        shutil.rmtree(home, ignore_errors=True)
    assert result.state == "success", result.task_states
    tasks = result.task_seconds
    train_task = tasks["train"]
    rows = [[t, f"{s:.1f}"] for t, s in sorted(tasks.items(), key=lambda kv: -kv[1]) if s > 0]
    table("One lifecycle run (dag.test, local adapters): task durations", ["task", "seconds"], rows)
    between = wall - sum(tasks.values())
    work = {"train": train_task, "extract": tasks["extract"], "deploy": tasks["deploy"]}
    orchestration = wall - sum(work.values())
    summary = [
        ["trigger to production alias (wall)", f"{wall:.1f}"],
        ["train task", f"{train_task:.1f}"],
        ["  of which the MLflow run (load, fit, log, score, register)", f"{mlflow_run:.1f}"],
        ["  of which process start + imports before the run", f"{train_task - mlflow_run:.1f}"],
        ["everything else", f"{wall - train_task:.1f}"],
        ["  extract (sample data on first use, DuckDB query, parquet)", f"{tasks['extract']:.1f}"],
        ["  deploy (package, new service's start-up: import, load model, warm-up)", f"{tasks['deploy']:.1f}"],
        ["  orchestration: gate, stage, review, merge, verify, promote tasks", f"{orchestration - between:.1f}"],
        ["  orchestration: Airflow between tasks (wall - sum of tasks)", f"{between:.1f}"],
        ["orchestration overhead < train task", "yes" if orchestration < train_task else "NO"],
    ]
    if fit is not None:
        summary.insert(3, ["  of which fit", f"{fit:.1f}"])
    table("Where the time goes", ["part", "seconds"], summary)


# --- backtests: a backfill of many weekly windows through the real scheduler ---------------------------

BACKTEST_WINDOWS = int(os.environ.get("BENCH_BACKTEST_WINDOWS", "52"))
BACKTEST_PARALLEL = tuple(int(n) for n in os.environ.get("BENCH_BACKTEST_PARALLEL", "1,2").split(","))


def api(url: str, method: str = "GET", body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise OSError(f"{method} {url}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from None


def bench_backtest() -> None:
    """Backtest demand_forecast over BACKTEST_WINDOWS weeks, once per max_active_runs; where the time goes."""
    from mlops_lifecycle.window import last_complete_interval

    home = Path(tempfile.mkdtemp(prefix="mlops-bench-backtest-"))
    server = devstack.MlflowServer(home / "mlflow", devstack.free_port())
    # PostgreSQL as production uses (SQLite serialises the scheduler, the API and parallel runs)
    database = f"mlops_bench_{os.getpid()}"
    database_url = devstack.postgres_database(database)
    env = {**os.environ, **devstack.stack_env(home, server.url, database_url=database_url)}
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    (home / "model_lines").mkdir()
    env["MLOPS_MODEL_LINES_DIR"] = str(home / "model_lines")
    devstack.migrate_airflow_db(env)
    server.start()
    # every user an admin: the bench's own throwaway home
    proc, url = devstack.launch_standalone(
        env,
        home / "standalone.log",
        overrides={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"},
        components=("scheduler", "dag_processor"),
        timeout=240,
    )
    rows, summary = [], []
    per_task: dict[tuple[int, str], list[float]] = {}
    try:
        _, latest = last_complete_interval("0 3 * * 1", "UTC", datetime.now(UTC))
        week = timedelta(days=7)
        for parallel in BACKTEST_PARALLEL:
            line = f"bench_bt{parallel}"
            base = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())
            base.update(model_line=line, retries=1, retry_delay_seconds=1)
            base["registry"].update(model_name=line, experiment=f"/bench/{line}")
            base["deploy"]["port"] = devstack.free_port()
            (home / "model_lines" / f"{line}.yaml").write_text(yaml.safe_dump(base))
            dag = f"{line}__lifecycle"
            deadline = time.monotonic() + 120
            while True:
                try:
                    api(f"{url}/api/v2/dags/{dag}")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            api(f"{url}/api/v2/dags/{dag}", "PATCH", {"is_paused": False})
            # unpausing starts the latest week's scheduled lifecycle run: the line gets its production
            # model (as a real line has) before the backtest is timed, not while it runs
            while not (lifecycle := api(f"{url}/api/v2/dags/{dag}/dagRuns")["dag_runs"]) or any(
                r["state"] in ("queued", "running") for r in lifecycle
            ):
                time.sleep(2)
            first_end = latest - week * BACKTEST_WINDOWS
            created = api(
                f"{url}/api/v2/backfills",
                "POST",
                {
                    "dag_id": dag,
                    "from_date": (first_end - week).isoformat(),
                    "to_date": (latest - week * 2).isoformat(),
                    "max_active_runs": parallel,
                    "reprocess_behavior": "none",
                },
            )
            while not api(f"{url}/api/v2/backfills/{created['id']}").get("completed_at"):
                time.sleep(2)
            runs = [
                r for r in api(f"{url}/api/v2/dags/{dag}/dagRuns?limit=500")["dag_runs"] if r["run_type"] == "backfill"
            ]
            # from the backfill's creation to its last window's end (the scheduler marks a backfill completed
            # only every 30 s: that wait is not the backtest's)
            ended = max(datetime.fromisoformat(r["end_date"]) for r in runs)
            wall = (ended - datetime.fromisoformat(created["created_at"])).total_seconds()
            run_seconds = train = report = in_tasks = 0.0
            for run in runs:
                tis = api(f"{url}/api/v2/dags/{dag}/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]
                durations = {t["task_id"]: t["duration"] or 0.0 for t in tis}
                for task_id, seconds in durations.items():
                    if seconds:
                        per_task.setdefault((parallel, task_id), []).append(seconds)
                in_tasks += sum(durations.values())
                train += durations.get("backtest_train", 0.0)
                report += durations.get("backtest_report", 0.0)
                start, end = (datetime.fromisoformat(run[k]) for k in ("start_date", "end_date"))
                run_seconds += (end - start).total_seconds()
            ok = sum(r["state"] == "success" for r in runs)
            rows.append(
                [
                    str(parallel),
                    f"{len(runs)} ({ok} ok)",
                    f"{wall:.0f}",
                    f"{len(runs) / wall * 60:.1f}",
                    f"{train:.0f}",
                    f"{report:.0f}",
                    f"{1 - train / run_seconds:.0%}" if run_seconds else "-",
                    f"{1 - in_tasks / run_seconds:.0%}" if run_seconds else "-",
                    f"{1 - train / (wall * parallel):.0%}",
                ]
            )
            summary.append((parallel, len(runs) / wall))
    finally:
        devstack.stop_standalone(proc)
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

        for parallel in BACKTEST_PARALLEL:  # the services the lifecycle runs deployed
            LocalServiceDeployer(home).stop(f"bench_bt{parallel}")
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
        if database_url:
            devstack.postgres_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    table(
        f"Backtest of demand_forecast over {BACKTEST_WINDOWS} weekly windows (airflow standalone, REST backfill, "
        f"{'PostgreSQL' if database_url else 'SQLite'})",
        [
            "max_active_runs",
            "windows",
            "wall s",
            "windows/min",
            "training task s",
            "report task s",
            "not training (of run time)",
            "between tasks (of run time)",
            "not training (of wall x max_active_runs)",
        ],
        rows,
    )
    table(
        "Backtest: mean seconds in each task that ran (tasks skipped without starting are not counted)",
        ["max_active_runs", "task", "runs", "mean s"],
        [[str(p), t, str(len(v)), f"{sum(v) / len(v):.2f}"] for (p, t), v in sorted(per_task.items())],
    )
    if len(summary) == 2:
        speedup = summary[1][1] / summary[0][1]
        table("Parallel backtest", ["2 runs vs 1: throughput", "target"], [[f"{speedup:.2f}x", ">= 1.6x"]])


# --- the model service against `mlflow models serve` ----------------------------------------------

SERVICE_DURATION = 10.0  # measured seconds per point
SERVICE_WARMUP = 2.0  # seconds of the same load before measuring
SERVICE_POINTS = [(1, 1), (1, 8), (100, 1), (100, 8)]  # (rows per request, connections)
SERVICE_P99_TARGET_MS = 10.0
SERVICE_SPEEDUP_TARGET = 3.0
DEPLOYMENT = paths.include_dir() / "deployment"
LOADGEN = REPO / "scripts" / "loadgen.py"
# The training window of the lifecycle run for the week before 2026-11-23 (bench_lifecycle's run).
SERVICE_INTERVAL = (datetime(2026, 11, 16, 3, tzinfo=UTC), datetime(2026, 11, 23, 3, tzinfo=UTC))


@dataclass
class Server:
    """A model server in its own process group, its output in ``log``."""

    name: str
    proc: subprocess.Popen
    predict_url: str
    log: Path

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the whole group (mlflow serve runs uvicorn as a child), SIGKILL what is left after ``grace``."""
        group = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        while time.monotonic() < deadline and group_alive(group):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def start_server(name: str, argv: list[str], env: dict[str, str], cwd: Path, predict_url: str, log: Path) -> Server:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(name, proc, predict_url, log)


def service_env(home: Path) -> dict[str, str]:
    """Environment of the child processes: the venv's tools on PATH, the bench's own MLflow store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW"))}
    env |= {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # Both servers score with one OpenMP thread (the model service sets this itself): with the
        # default of one thread per core, HistGradientBoosting's per-call thread start-up and
        # spinning roughly halved `mlflow models serve`'s throughput on the 2-core bench machine.
        "OMP_NUM_THREADS": "1",
    }
    if env.pop("PYTHONDONTWRITEBYTECODE", None):  # a venv without .pyc files: compile once for all children
        env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
    return env


def build_model_version(home: Path, env: dict[str, str]) -> tuple[dict[str, str], list[dict]]:
    """Register one real demand_forecast version the way the lifecycle does (local extract, then the
    training entrypoint as a process); return its pin and 100 holdout feature rows."""
    import logging

    from mlops_lifecycle.adapters.warehouse import LocalWarehouse
    from mlops_lifecycle.config import load_model_line
    from mlops_lifecycle.window import resolve_window

    for name in ("mlops_lifecycle", "lifecycle_training"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = load_model_line(ADAPTERS["local"])
    window = resolve_window(cfg, *SERVICE_INTERVAL, None)
    warehouse = LocalWarehouse(home / "warehouse")
    warehouse.ensure_sample_data(through=window.window_end)
    snapshot = warehouse.snapshot(
        cfg.sql_path.read_text(), dict(cfg.extract.tables), window.train_start, window.window_end, "bench"
    )
    args = {
        "--snapshot": snapshot.uri,
        "--run-key": window.run_key,
        "--model-line": cfg.model_line,
        "--experiment": cfg.registry.experiment,
        "--registered-model": cfg.registry.model_name,
        "--production-alias": cfg.registry.production_alias,
        "--holdout-start": window.holdout_start.isoformat(),
        "--window-start": window.train_start.isoformat(),
        "--window-end": window.window_end.isoformat(),
        "--target": cfg.train.target,
        "--params": json.dumps(cfg.train.parameters),
        "--tags": json.dumps({"bench": "service"}),
    }
    argv = [sys.executable, str(cfg.entrypoint_path), *(x for pair in args.items() for x in pair)]
    done = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"training entrypoint failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pin = {
        "model_line": cfg.model_line,
        "model_name": cfg.registry.model_name,
        "model_version": str(result["model_version"]),
        "run_id": result["run_id"],
    }

    # the holdout rows as the entrypoint reads them (its own snapshot reader: same types as the signature)
    sys.path.insert(0, str(cfg.entrypoint_path.parent))
    import lifecycle_training

    line = __import__(cfg.entrypoint_path.stem).LINE
    namespace = argparse.Namespace(
        snapshot=snapshot.uri,
        window_start=window.train_start,
        window_end=window.window_end,
        holdout_start=window.holdout_start,
        horizon_end=None,  # not a backtest
        target=cfg.train.target,
        model_line=cfg.model_line,
    )
    _, holdout = lifecycle_training.split(lifecycle_training.read_snapshot(line, namespace), namespace)
    features = holdout[line.features]
    spread = features.iloc[:: max(1, len(features) // 100)].iloc[:100]  # every market, several days
    rows = spread.to_dict(orient="records")  # Python scalars; json writes floats exactly (repr)
    assert json.loads(json.dumps(rows)) == rows, "holdout rows do not survive JSON unchanged"
    return pin, rows


def post_json(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def run_loadgen(url: str, body_file: Path, connections: int, server: Server) -> dict:
    argv = [
        sys.executable,
        str(LOADGEN),
        "--url",
        url,
        "--body-file",
        str(body_file),
        "--connections",
        str(connections),
        "--duration",
        str(SERVICE_DURATION),
        "--warmup",
        str(SERVICE_WARMUP),
        "--server-pid",
        str(server.proc.pid),
    ]
    timeout = SERVICE_DURATION + SERVICE_WARMUP + 60
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# One model call's steps, timed in a fresh process (no Airflow imported, one thread, like the servers).
MODEL_STEPS = r"""
import json, os, shutil, statistics, sys, tempfile, time
os.environ["OMP_NUM_THREADS"] = "1"
import mlflow.pyfunc, pandas as pd, sklearn

pyfunc = mlflow.pyfunc.load_model(sys.argv[1])
rows = json.loads(open(sys.argv[2]).read())
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from model_service.app import Model
from model_service.package import open_package
from model_service.prediction_log import PredictionLog

pipeline = pyfunc.get_raw_model()
encode, model = pipeline[:-1], pipeline[-1]
service_model = Model(open_package(Path(sys.argv[1]).parent))  # the service's own serving code
assert service_model.compiled is not None, service_model.not_compiled_because

prediction_log = PredictionLog(Path(tempfile.mkdtemp()), model_line="x", model_name="x", model_version="1",
                               flush_seconds=3600)  # drained below, in this thread, to time one request's share

def log_request(part, body):
    prediction_log.record("0" * 32, body, [1.0] * len(part))
    prediction_log._drain()

def median_ms(call, budget=0.4):
    call()
    samples, deadline = [], time.perf_counter() + budget
    while len(samples) < 15 or (time.perf_counter() < deadline and len(samples) < 2000):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000

def fast(frame):
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        return pipeline.predict(frame)

out = {}
for size in map(int, sys.argv[4:]):
    body, part = json.dumps({"rows": rows[:size]}), rows[:size]
    frame = pd.DataFrame.from_records(part)
    encoded = encode.transform(frame)
    steps = {
        "json.loads of the request body": lambda: json.loads(body),
        "pandas DataFrame from the records": lambda: pd.DataFrame.from_records(part),
        "pipeline step 1: one-hot ColumnTransformer": lambda: encode.transform(frame),
        f"pipeline step 2: {type(model).__name__} predict ({model.n_iter_} trees)": lambda: model.predict(encoded),
        "sklearn pipeline predict (1 + 2)": lambda: pipeline.predict(frame),
        "  same, assume_finite + skip_parameter_validation": lambda: fast(frame),
        "mlflow pyfunc predict (schema enforcement + pipeline)": lambda: pyfunc.predict(frame),
        "model service: rows checked against the signature": lambda: service_model.validator.check(part),
        "model service: compiled model (column arrays + numpy trees)": lambda: service_model.predict_compiled(part),
        "model service: prediction log, one request (background thread)": lambda: log_request(part, body.encode()),
    }
    for name, call in steps.items():
        out.setdefault(name, {})[size] = median_ms(call)
prediction_log.close()
shutil.rmtree(prediction_log.directory)
print(json.dumps(out))
"""


def time_model_calls(model_dir: Path, rows_file: Path, sizes: list[int], env: dict[str, str]) -> dict[str, dict]:
    """Median milliseconds of each step of one model call: where a request's model time goes once
    HTTP is taken away. Keys of the inner dicts are the sizes as strings (JSON)."""
    argv = [sys.executable, "-c", MODEL_STEPS, str(model_dir), str(rows_file), str(DEPLOYMENT), *map(str, sizes)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"timing the model steps failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


HOSTILE_CONNECTIONS = 8  # ordinary one-row clients while one more client sends hostile bodies
HOSTILE_PEAK_SAMPLES = 3  # hostile requests sent alone, for the peak RSS each one causes
MAX_BODY_BYTES = 32 * 1024 * 1024  # the service's body limit (model_service.settings)


def hostile_bodies() -> dict[str, bytes]:
    """Bodies a client can send that cost the service the most per byte, all valid JSON within the body
    limit (but the first, the size of the 100k unknown keys that cost 49 MB and 1.4 s before)."""
    room = MAX_BODY_BYTES - 64

    def keys(n: int) -> bytes:
        return b'{"rows": [{' + b", ".join(b'"k%07d": 0' % i for i in range(n)) + b"}]}"

    junk = b'[], {}, "ab", 0.5'
    depth = room // 2
    return {
        "one row, 100k unknown keys": keys(100_000),
        "one row, unknown keys to the limit": keys(room // len(b'"k0000000": 0, ')),
        "one field nested [[[...]]] to the limit": b'{"rows": [{"x": ' + b"[" * depth + b"]" * depth + b"}]}",
        "one field, an array of [], {}, strings, numbers": (
            b'{"rows": [{"x": [' + b", ".join([junk] * (room // (len(junk) + 2))) + b"]}]}"
        ),
    }


def post_raw(url: str, body: bytes) -> tuple[int | str, float]:
    """POST ``body`` on a new connection; the status (or the connection error) and the seconds it took."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    started = time.perf_counter()
    try:
        connection.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        status: int | str = response.status
    except (OSError, http.client.HTTPException) as exc:
        status = type(exc).__name__
    finally:
        connection.close()
    return status, time.perf_counter() - started


def peak_rss_growth(pid: int, send: Callable[[], tuple[int | str, float]]) -> tuple[int | str, float, float]:
    """``send()``'s status and seconds, and how far the process's peak RSS rose above its RSS before
    (MiB): the peak is reset first through /proc/<pid>/clear_refs (Linux)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = proc_status_kib(pid, "VmRSS")
    status, seconds = send()
    return status, seconds, (proc_status_kib(pid, "VmHWM") - before) / 1024


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def bench_hostile(server: Server, small_body: Path) -> list[list[str]]:
    """The table rows of the service under hostile bodies: ordinary one-row requests alone, then beside
    one client that sends a hostile body after another (one row per body)."""
    baseline = run_loadgen(server.predict_url, small_body, HOSTILE_CONNECTIONS, server)
    rows = [["none", "-", "-", "-", "-", *loadgen_cells(baseline), "-"]]
    for name, body in hostile_bodies().items():
        rows.append([name, f"{len(body) / 2**20:.1f}", *hostile_point(server, small_body, body)])
    return rows


def hostile_point(server: Server, small_body: Path, body: bytes) -> list[str]:
    """Peak RSS growth of ``body`` sent alone, then the one-row load while ``body`` is sent again and again."""
    send = functools.partial(post_raw, server.predict_url, body)
    peaks = [peak_rss_growth(server.proc.pid, send) for _ in range(HOSTILE_PEAK_SAMPLES)]
    stop, answers = threading.Event(), []

    def flood() -> None:
        while not stop.is_set():
            answers.append(send())

    flooder = threading.Thread(target=flood, name="hostile-client")
    flooder.start()
    try:
        loaded = run_loadgen(server.predict_url, small_body, HOSTILE_CONNECTIONS, server)
    finally:
        stop.set()
        flooder.join(timeout=180)
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} exited under hostile input:\n{server.tail()}")
    statuses = sorted({str(status) for status, _ in answers} | {str(status) for status, _, _ in peaks})
    return [
        "/".join(statuses),
        f"{statistics.median(seconds for _, seconds in answers) * 1000:.0f}" if answers else "-",
        str(len(answers)),
        *loadgen_cells(loaded),
        f"{max(growth for _, _, growth in peaks):.0f}",
    ]


def loadgen_cells(result: dict) -> list[str]:
    errors = result["errors"] if not result["errors"] else f"{result['errors']}: {result['first_error'][:40]}"
    return [f"{result['rps']:.0f}", f"{result['p50_ms']:.2f}", f"{result['p99_ms']:.2f}", str(errors)]


def bench_service() -> None:
    home = Path(tempfile.mkdtemp(prefix="mlops-bench-service-"))
    env = service_env(home)
    servers: list[Server] = []
    load_before = os.getloadavg()[0]
    try:
        started = time.monotonic()
        pin, rows = build_model_version(home, env)
        trained = time.monotonic() - started
        pin_file = home / "models" / f"{pin['model_line']}.yaml"
        pin_file.parent.mkdir()
        pin_file.write_text(yaml.safe_dump(pin))
        package_dir = home / "build" / pin["model_line"]
        model_uri = f"models:/{pin['model_name']}/{pin['model_version']}"

        mlflow_port, ours_port = devstack.free_port(), devstack.free_port()
        mlflow_serve = start_server(
            "mlflow models serve",
            [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-p", str(mlflow_port), "--host", "127.0.0.1"],
            env,
            home,
            f"http://127.0.0.1:{mlflow_port}/invocations",
            home / "mlflow-serve.log",
        )  # fmt: skip
        servers.append(mlflow_serve)
        packaging = subprocess.run(  # while mlflow serve starts
            [sys.executable, "-m", "model_service.cli", "package", "--pin", str(pin_file), "--out", str(package_dir)],
            env=env,
            cwd=DEPLOYMENT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if packaging.returncode != 0:
            raise RuntimeError(f"model_service.cli package failed:\n{packaging.stderr[-3000:]}")
        ours_env = env | {
            "MODEL_DIR": str(package_dir),
            "MODEL_LINE": pin["model_line"],
            "MODEL_NAME": pin["model_name"],
            "MODEL_VERSION": pin["model_version"],
            "PREDICTION_LOG_DIR": str(home / "prediction-log"),
        }
        ours = start_server(
            "model service",
            [sys.executable, "-m", "uvicorn", "model_service.app:app", "--app-dir", str(DEPLOYMENT),
             "--host", "127.0.0.1", "--port", str(ours_port), "--no-access-log"],
            ours_env,
            home,
            f"http://127.0.0.1:{ours_port}/predict",
            home / "model-service.log",
        )  # fmt: skip
        servers.append(ours)
        for server, ready in (
            (mlflow_serve, f"http://127.0.0.1:{mlflow_port}/ping"),
            (ours, f"http://127.0.0.1:{ours_port}/ready"),
        ):
            try:
                devstack.wait_http(ready, 180, server.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{server.name} did not get ready: {exc}\n{server.tail()}") from None
        ready_after = time.monotonic() - started - trained

        # the same rows, in each server's request format
        bodies: dict[tuple[str, int], Path] = {}
        for size in sorted({size for size, _ in SERVICE_POINTS}):
            for server, key in ((mlflow_serve, "dataframe_records"), (ours, "rows")):
                bodies[server.name, size] = home / f"{key}-{size}.json"
                bodies[server.name, size].write_text(json.dumps({key: rows[:size]}))
        # same model, same rows: the same predictions, or the comparison is void
        for size in sorted({size for size, _ in SERVICE_POINTS}):
            theirs = post_json(mlflow_serve.predict_url, bodies[mlflow_serve.name, size].read_bytes())["predictions"]
            mine = post_json(ours.predict_url, bodies[ours.name, size].read_bytes())["predictions"]
            assert len(theirs) == len(mine) == size, (len(theirs), len(mine), size)
            differ = [
                (i, a, b)
                for i, (a, b) in enumerate(zip(theirs, mine, strict=True))
                if not math.isclose(a, b, rel_tol=1e-9)
            ]
            assert not differ, (
                f"the two servers disagree on {len(differ)} of {size} rows, e.g. (row, mlflow, ours) {differ[:3]}"
            )

        results: dict[tuple[str, int, int], dict] = {}
        for server in (mlflow_serve, ours):
            for size, connections in SERVICE_POINTS:
                results[server.name, size, connections] = run_loadgen(
                    server.predict_url, bodies[server.name, size], connections, server
                )
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited during the load:\n{server.tail()}")
        mlflow_serve.stop()  # the hostile-input points and the in-process timings get the cores to themselves
        hostile = bench_hostile(ours, bodies[ours.name, 1])
        ours.stop()
        (home / "rows.json").write_text(json.dumps(rows))
        sizes = sorted({size for size, _ in SERVICE_POINTS})
        steps = time_model_calls(package_dir / "model", home / "rows.json", sizes, env)
    finally:
        for server in servers:
            server.stop()
        logs = {server.name: server.log.read_text(errors="replace") for server in servers if server.log.exists()}
        shutil.rmtree(home, ignore_errors=True)

    rows_out = []
    for (name, size, connections), r in results.items():
        rows_out.append(
            [
                name,
                size,
                connections,
                f"{r['rps']:.0f}",
                f"{r['rps'] * size:.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['server_cpu_ms_per_request']:.2f}",
                f"{r['server_cpu_s'] / SERVICE_DURATION:.2f}",
                f"{r['cpu_us_per_request']:.0f}",
                r["errors"] if not r["errors"] else f"{r['errors']}: {r['first_error'][:60]}",
            ]
        )
    table(
        f"Model service vs `mlflow models serve`, same model version, same rows ({SERVICE_DURATION:.0f} s per point "
        f"after {SERVICE_WARMUP:.0f} s warm-up, closed loop from a separate load generator process)",
        ["server", "rows/request", "connections", "req/s", "rows/s", "p50 ms", "p99 ms",
         "server CPU ms/req", "server cores busy", "loadgen CPU us/req", "errors"],
        rows_out,
    )  # fmt: skip
    ratios = []
    for size, connections in SERVICE_POINTS:
        theirs, mine = results[mlflow_serve.name, size, connections], results[ours.name, size, connections]
        speedup = mine["rps"] / theirs["rps"] if theirs["rps"] else math.inf
        p99_ok = "yes" if mine["p99_ms"] < SERVICE_P99_TARGET_MS else "NO"
        ratios.append(
            [
                size,
                connections,
                f"{speedup:.1f}x",
                "yes" if speedup >= SERVICE_SPEEDUP_TARGET else "NO",
                f"{theirs['server_cpu_ms_per_request'] / mine['server_cpu_ms_per_request']:.1f}x",
                f"{mine['p99_ms']:.2f}",
                p99_ok if size == 1 else "-",
            ]
        )
    table(
        f"Model service / mlflow models serve (target: >= {SERVICE_SPEEDUP_TARGET:.0f}x the throughput, "
        f"single-row p99 < {SERVICE_P99_TARGET_MS:.0f} ms)",
        ["rows/request", "connections", "req/s ratio", f">= {SERVICE_SPEEDUP_TARGET:.0f}x",
         "CPU/req mlflow/ours", "our p99 ms", f"p99 < {SERVICE_P99_TARGET_MS:.0f} ms"],
        ratios,
    )  # fmt: skip
    breakdown = [[name, *(f"{by_size[str(size)]:.2f}" for size in sizes)] for name, by_size in steps.items()]
    model_calls = {
        mlflow_serve.name: ("mlflow pyfunc predict", steps["mlflow pyfunc predict (schema enforcement + pipeline)"]),
        ours.name: ("compiled model", steps["model service: compiled model (column arrays + numpy trees)"]),
    }
    for server in (mlflow_serve, ours):
        cpu = [results[server.name, size, 1]["server_cpu_ms_per_request"] for size in sizes]
        what, model_call = model_calls[server.name]
        breakdown.append([f"{server.name}: server CPU per request, 1 connection", *(f"{c:.2f}" for c in cpu)])
        breakdown.append(
            [f"  of which outside its model call ({what}): HTTP, framework, input, logs"]
            + [f"{c - model_call[str(size)]:.2f}" for c, size in zip(cpu, sizes, strict=True)]
        )
    table(
        "Where the time goes: one model call's steps in-process (median, 1 thread) vs the servers' CPU per request",
        ["step", *(f"{size} row{'s' if size > 1 else ''} ms" for size in sizes)],
        breakdown,
    )
    table(
        f"Model service under hostile bodies: one-row requests from {HOSTILE_CONNECTIONS} connections "
        f"({SERVICE_DURATION:.0f} s after {SERVICE_WARMUP:.0f} s warm-up) while one more client sends the hostile "
        f"body again and again; peak RSS growth: the most of {HOSTILE_PEAK_SAMPLES} hostile requests sent alone",
        ["hostile body", "MiB", "answer", "hostile ms (median)", "hostile requests",
         "one-row req/s", "p50 ms", "p99 ms", "errors", "peak RSS growth MiB"],
        hostile,
    )  # fmt: skip
    workers = sum("Started server process" in line for line in logs.get(mlflow_serve.name, "").splitlines())
    print(
        f"Model {model_uri} (trained by the {pin['model_line']} entrypoint in {trained:.0f} s); both servers ready "
        f"{ready_after:.0f} s later. {os.cpu_count()} CPU cores; load average {load_before:.1f} before the bench "
        "started (other work on the machine takes cores from the servers and skews every number).\n"
        f"mlflow models serve: MLflow {importlib.metadata.version('mlflow')}, --env-manager local, default workers "
        f"({workers} uvicorn worker process{'es' if workers != 1 else ''}: MLFLOW_MODELS_WORKERS unset), default "
        'access log on; body {"dataframe_records": [...]} to /invocations.\n'
        'model service: 1 uvicorn worker, prediction log on, body {"rows": [...]} to /predict. Both with '
        "OMP_NUM_THREADS=1.\n"
        "Server CPU is user+system time of the server's process tree over the measured window, per answered "
        "request; 'cores busy' is that time / wall time (1.00 = one core saturated)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["parse", "lifecycle", "service", "backtest", "drift"])
    args = parser.parse_args()
    if args.only in (None, "parse"):
        bench_parse(args.repeats)
    if args.only in (None, "lifecycle"):
        bench_lifecycle()
    if args.only in (None, "service"):
        bench_service()
    if args.only in (None, "backtest"):
        bench_backtest()
    if args.only in (None, "drift"):
        import bench_drift  # scripts/bench_drift.py: check_drift against evidently, detection quality

        bench_drift.main(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
