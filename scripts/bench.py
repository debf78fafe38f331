"""`make bench`: DAG-folder parse time for 1/10/100 model lines, and one local lifecycle's wall time.

Prints tables; nothing here is a pass/fail test. Everything runs in a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from mlops_lifecycle import devstack, paths  # noqa: E402

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

        LocalServiceDeployer(home / "services", paths.include_dir() / "service").stop("demand_forecast")
        shutil.rmtree(home, ignore_errors=True)
    assert result.state == "success", result.task_states
    tasks = result.task_seconds
    train_task = tasks["train"]
    rows = [[t, f"{s:.1f}"] for t, s in sorted(tasks.items(), key=lambda kv: -kv[1]) if s > 0]
    table("One lifecycle run (dag.test, local adapters): task durations", ["task", "seconds"], rows)
    between = wall - sum(tasks.values())
    work = {"train": train_task, "extract": tasks["extract"], "verify_serving": tasks["verify_serving"]}
    orchestration = wall - sum(work.values())
    summary = [
        ["trigger to production alias (wall)", f"{wall:.1f}"],
        ["train task", f"{train_task:.1f}"],
        ["  of which the MLflow run (load, fit, log, score, register)", f"{mlflow_run:.1f}"],
        ["  of which process start + imports before the run", f"{train_task - mlflow_run:.1f}"],
        ["everything else", f"{wall - train_task:.1f}"],
        ["  extract (sample data on first use, DuckDB query, parquet)", f"{tasks['extract']:.1f}"],
        ["  verify_serving (service start-up: import, load model, warm-up)", f"{tasks['verify_serving']:.1f}"],
        ["  orchestration: gate, stage, review, merge, deploy, promote tasks", f"{orchestration - between:.1f}"],
        ["  orchestration: Airflow between tasks (wall - sum of tasks)", f"{between:.1f}"],
        ["orchestration overhead < train task", "yes" if orchestration < train_task else "NO"],
    ]
    if fit is not None:
        summary.insert(3, ["  of which fit", f"{fit:.1f}"])
    table("Where the time goes", ["part", "seconds"], summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["parse", "lifecycle"])
    args = parser.parse_args()
    if args.only in (None, "parse"):
        bench_parse(args.repeats)
    if args.only in (None, "lifecycle"):
        bench_lifecycle()
    return 0


if __name__ == "__main__":
    sys.exit(main())
