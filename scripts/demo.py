"""`make demo`: one complete lifecycle of a model line on the embedded local adapters, then a summary.

State lives under .local/ (Airflow home, MLflow store, warehouse, deployment repository, services).
The window is the last complete schedule period before now, so a second run the same week finds
everything already done and ends as a clean no-op; exit code 0 only if production serves the version
this window produced.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import devstack  # noqa: E402
from mlops_lifecycle import paths  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_arguments(parser)
    args = parser.parse_args()
    server, config = prepare(args.model_line, args.mlflow_port)
    server.start()
    try:
        return lifecycle(config, server.url)
    finally:
        server.stop()


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-line", default="demand_forecast")
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", "5000")))


def prepare(model_line: str, mlflow_port: int):  # noqa: ANN201 - (MlflowServer, ModelLineConfig)
    """The stack over .local/: its environment applied to this process and the metadata DB migrated; returns
    the MLflow server (not started yet) and the line's config."""
    home = paths.local_home()
    server = devstack.MlflowServer(home / "mlflow", mlflow_port)
    env = devstack.stack_env(home, server.url)
    os.environ.update(env)

    from mlops_lifecycle.config import load_model_line

    config = load_model_line(paths.model_lines_dir() / f"{model_line}.yaml")
    print(f"==> Airflow home {env['AIRFLOW_HOME']} (migrating the metadata DB)", flush=True)
    devstack.migrate_airflow_db(env)
    print(f"==> MLflow server {server.url} (store {server.store})", flush=True)
    return server, config


def lifecycle(config, tracking_uri: str, log: Path | None = None) -> int:  # noqa: ANN001
    """One lifecycle of the last complete schedule period, in this process (``dag.test``), and its summary;
    0 only if production then serves the version of that window. Airflow's output goes to ``log`` if given."""
    from mlops_lifecycle.window import last_complete_interval, resolve_window

    start, end = last_complete_interval(config.schedule.cron, config.schedule.timezone, datetime.now(UTC))
    window = resolve_window(config, start, end, None)
    print(f"==> {config.model_line}: data interval {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC", flush=True)
    if log is not None:
        print(f"    Airflow's output: {log}", flush=True)
    with devstack.output_to(log):
        result = devstack.run_lifecycle(config.lifecycle_dag_id, logical_date=end)
    return summarize(config, window, result, tracking_uri)


def summarize(config, window, result, tracking_uri: str) -> int:  # noqa: ANN001
    out, ok, version, merged = lifecycle_report(config, window, result, tracking_uri)
    out.append(
        "RESULT           "
        + (
            f"production serves v{version} (run and merged revision {str(merged)[:12]} confirmed)"
            if ok
            else "production does NOT serve this window's version from the merged revision"
        )
    )
    print("\n".join([f"\n{'=' * 72}", *out, "=" * 72]))
    return 0 if ok else 1


def lifecycle_report(config, window, result, tracking_uri: str):  # noqa: ANN001, ANN201
    """(summary lines of a lifecycle run, whether production serves its version from the merged revision,
    that version, the merge commit)."""
    from mlops_lifecycle.deployment_repository.local_git import LocalGitRepository
    from mlops_lifecycle.gate import evaluate_gate
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    reg = MlflowRegistryHook()
    out = [f"Lifecycle {result.dag_id}  run {result.run_id}: {result.state} in {result.seconds:.0f} s"]
    out.append("  tasks: " + ", ".join(f"{t}={s}" for t, s in result.task_states.items()))
    out.append(f"Data window      {window.label} (holdout from {window.holdout_start}), run key {window.run_key}")
    run = reg.find_run(config.registry.experiment, window.run_key)
    version = None
    if run is None:
        out.append("MLflow run       none finished for this window")
    else:
        version = run.data.tags.get("lifecycle.registered_version")
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("production.")}
        baseline = {
            k.removeprefix("production."): v for k, v in run.data.metrics.items() if k.startswith("production.")
        }
        prod_then = run.data.tags.get("lifecycle.production_version", "none")
        verdict = evaluate_gate(config.gate.metrics, metrics, baseline, None if prod_then == "none" else prod_then)
        out.append(f"MLflow run       {run.info.run_id}  {reg.run_url(run.info.experiment_id, run.info.run_id)}")
        out.append("Gate (as evaluated when this version was trained)")
        for r in verdict.results:
            out.append(f"  gate {'PASS' if r.passed else 'FAIL'}  {r.reason}")
        out.append(f"Model version    {config.registry.model_name} v{version}")
    aliases = reg.aliases(config.registry.model_name) if version else {}
    out.append(f"Aliases          {', '.join(f'{a}=v{v}' for a, v in sorted(aliases.items())) or 'none'}")
    repo = LocalGitRepository(paths.local_home() / config.review.repository)
    out.append(f"Changelog        {repo.path} (main):")
    out += [f"  {line}" for line in repo.log_subjects(limit=6)] if (repo.path / ".git").exists() else ["  none"]
    url = f"http://127.0.0.1:{config.deploy.port}"
    served = devstack.service_version(url) or {}
    branch = f"review/{config.model_line}/v{version}"
    has_repo = (repo.path / ".git").exists()
    merged = repo.merge_commit_of(branch) if version and has_repo and repo.is_merged(branch) else None
    out.append(
        f"Service          {url}/version -> "
        + (
            f"{served.get('model_name')} v{served.get('model_version')}, run {served.get('run_id')}, "
            f"revision {str(served.get('code_revision'))[:12]}"
            if served
            else "no answer"
        )
    )
    out.append(f"MLflow           tracking URI {tracking_uri} (browse it with `make up`)")
    ok = bool(
        version
        and aliases.get(config.registry.production_alias) == version
        and str(served.get("model_version")) == version
        and served.get("run_id") == run.info.run_id
        and served.get("code_revision") == merged
    )
    return out, ok, version, merged


if __name__ == "__main__":
    sys.exit(main())
