"""backtest_report: the gate applied window by window, and the report of the whole backtest.

Every backfill run trains its window (``backtest_baseline``, ``backtest_train``) in parallel with the
others; the report needs all of them, in order (each window is judged against the champion the windows
before it leave). So each run's report task looks at the backfill's other runs: while any of them is
still training, it leaves the report to the last one (skipped, saying so); the last one builds it from
every finished window of the backtest in MLflow. The report (HTML, a PNG per gate metric, CSV, JSON) is
logged to one MLflow run per backtest in ``<experiment>-backtests`` and linked from this task.

Champions are scored on each window's horizon here, in the worker, with the line's own entrypoint code
(``include/training``) loaded as a module: one model load per champion, no extra process per window.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from mlops_lifecycle.links import BacktestReportLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.backtest import Judgement, WindowResult
    from mlops_lifecycle.contract import BacktestRun

FINISHED_STATES = {"success", "failed", "skipped", "upstream_failed", "removed"}
TRAINING_TASKS = ["backtest_baseline", "backtest_train"]


class BacktestReportOperator(LifecycleOperator):
    """Judge every finished window of the backtest against its champion and log the report (last run only)."""

    template_fields = ("challenger", "baseline")
    operator_extra_links = (BacktestReportLink(),)
    ui_color = "#e7f0e0"

    def __init__(self, *, challenger: Upstream, baseline: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.challenger: BacktestRun = challenger
        self.baseline: BacktestRun = baseline

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.backtest import judge, summary_rows

        c = self.challenger
        pending = self.windows_still_training(context)
        if pending:
            raise AirflowSkipException(
                f"{len(pending)} other window(s) of this backfill still training ({', '.join(sorted(pending)[:3])}"
                f"{'...' if len(pending) > 3 else ''}): the last run to finish builds the report of backtest "
                f"{c['backtest_id']}"
            )
        windows = self.windows(c["backtest_id"])
        same = self.baseline["backtest_id"] == c["backtest_id"]  # backtesting the baseline itself
        baseline = {w.window_end: w for w in (windows if same else self.windows(self.baseline["backtest_id"]))}
        self.log.info("Backtest %s: %d finished window(s); judging them in order", c["backtest_id"], len(windows))
        judgements = judge(self.config, windows, self.score, self.served)
        judgements = [self.with_baseline(j, baseline.get(j.window.window_end)) for j in judgements]
        rows = summary_rows(judgements)
        run_id = self.log_report(c, rows)
        url = self.registry.run_url(c["experiment_id"], run_id)
        self.set_link(BacktestReportLink.key, f"{url}/artifacts" if url else None)
        from mlops_lifecycle.backtest_report import render_table

        evaluated = [r for r in rows if r["would_promote"] is not None]
        self.log.info(
            "Backtest %s of %s, variant %s: %d window(s), %d with their horizon in the data, the gate would have "
            "promoted %d\n%s",
            c["backtest_id"],
            self.config.model_line,
            c["variant"],
            len(rows),
            len(evaluated),
            sum(1 for r in evaluated if r["would_promote"]),
            render_table(rows, list(self.config.gate.metrics)),
        )
        return {"backtest_id": c["backtest_id"], "report_run_id": run_id, "windows": len(rows), "url": url}

    # --- which runs -------------------------------------------------------------------------------
    def windows_still_training(self, context: Context) -> set[str]:
        """Other backfill runs of this DAG whose training tasks have not finished yet."""
        ti = context["ti"]
        states = ti.get_task_states(dag_id=ti.dag_id, task_ids=TRAINING_TASKS)
        return {
            run_id
            for run_id, tasks in states.items()
            if run_id != ti.run_id
            and run_id.startswith("backfill__")
            and any(state not in FINISHED_STATES for state in tasks.values())
        }

    def windows(self, ident: str) -> list[WindowResult]:
        """Every finished window of backtest ``ident`` (the newest run of each window, if one was repeated)."""
        from mlops_lifecycle.backtest import HORIZON_PREFIX, WindowResult

        experiment = self.registry.client.get_experiment_by_name(self.config.backtest_experiment)
        if experiment is None:
            return []
        runs = self.registry.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`backtest.id` = '{ident}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            max_results=5000,
        )
        by_window: dict[str, WindowResult] = {}
        for run in runs:
            tags, metrics = run.data.tags, run.data.metrics
            by_window[tags["backtest.window_end"]] = WindowResult(
                window_end=tags["backtest.window_end"],
                horizon_end=tags["backtest.horizon_end"],
                run_id=run.info.run_id,
                holdout={k: v for k, v in metrics.items() if "." not in k},
                horizon={k.removeprefix(HORIZON_PREFIX): v for k, v in metrics.items() if k.startswith(HORIZON_PREFIX)},
                horizon_status=tags.get("backtest.horizon", "missing"),
                model_uri=tags.get("backtest.model_uri") or f"runs:/{run.info.run_id}/model",
                snapshot=tags.get("lifecycle.snapshot", ""),
            )
        return list(by_window.values())

    def with_baseline(self, judgement: Judgement, baseline: WindowResult | None) -> Judgement:
        if baseline is None or baseline.run_id == judgement.window.run_id:
            return judgement
        from dataclasses import replace

        return replace(judgement, baseline_horizon=dict(baseline.horizon))

    # --- champions ------------------------------------------------------------------------------------
    @cached_property
    def scorer(self) -> Any:
        """The line's own metrics and features, from its training entrypoint loaded as a module."""
        import importlib.util
        import sys

        entrypoint = self.config.entrypoint_path
        sys.path.insert(0, str(entrypoint.parent))  # the entrypoint imports lifecycle_training beside it
        spec = importlib.util.spec_from_file_location(f"mlops_entrypoint_{self.config.model_line}", entrypoint)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {entrypoint}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import lifecycle_training

        self.registry.client  # noqa: B018 - sets the tracking token for mlflow.pyfunc in this process
        import mlflow

        mlflow.set_tracking_uri(self.registry.tracking_uri)
        return lifecycle_training.Scorer(module.LINE, self.config.train.target)

    def score(self, champion_model: str, window: WindowResult) -> dict[str, float]:
        """The champion's metrics on ``window``'s horizon (read from ``window``'s own snapshot)."""
        from datetime import date

        start, end = date.fromisoformat(window.window_end), date.fromisoformat(window.horizon_end)
        result: dict[str, float] = self.scorer.score(champion_model, window.snapshot, start, end)
        return result

    def served(self, window: WindowResult) -> tuple[str, str] | None:
        """The version that served production at the window's end, from the audit events, as (model, label)."""
        from mlops_lifecycle.audit import events

        name = self.config.registry.model_name
        promotions = []
        for found in self.registry.client.search_model_versions(f"name='{name}'"):
            for event in events(self.registry.version_tags(name, str(found.version))):
                if event.get("event") == "promoted" and event.get("at", "")[:10] < window.window_end:
                    promotions.append((event["at"], str(found.version)))
        if not promotions:
            return None
        _, version = max(promotions)
        return f"models:/{name}/{version}", f"production v{version}"

    # --- the report -------------------------------------------------------------------------------
    def log_report(self, c: BacktestRun, rows: list[dict[str, Any]]) -> str:
        """Log HTML, plots, CSV and JSON to the backtest's report run (found by its tag, or made); its id."""
        import tempfile
        from pathlib import Path

        from mlops_lifecycle.backtest_report import (
            REPORT_CSV,
            REPORT_HTML,
            REPORT_JSON,
            plot_file,
            render_csv,
            render_html,
            render_json,
            render_plot,
        )
        from mlops_lifecycle.operators.base import code_revision

        client, metrics = self.registry.client, list(self.config.gate.metrics)
        found = client.search_runs(
            [c["experiment_id"]], filter_string=f"tags.`backtest.report` = '{c['backtest_id']}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(
                c["experiment_id"],
                run_name=f"{self.config.model_line} backtest {c['backtest_id']}",
                tags={
                    "backtest.report": c["backtest_id"],
                    "backtest.id": f"report:{c['backtest_id']}",
                    "backtest.variant": c["variant"],
                    "lifecycle.model_line": self.config.model_line,
                },
            ).info.run_id
            client.set_terminated(run_id)
        header = {
            "model_line": self.config.model_line,
            "variant": c["variant"],
            "backtest_id": c["backtest_id"],
            "champion_mode": self.config.backtest.champion,
            "horizon_days": self.config.backtest.horizon_days or "one period",
            "code_revision": code_revision(),
            "gate": json.loads(self.config.gate.model_dump_json()),
        }
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            (out / REPORT_HTML).write_text(render_html(header, rows, metrics))
            (out / REPORT_JSON).write_text(render_json(header, rows))
            (out / REPORT_CSV).write_text(render_csv(rows, metrics))
            for metric in metrics:
                title = f"{self.config.model_line} {c['variant']}: {metric} on each window's horizon"
                (out / plot_file(metric)).write_bytes(render_plot(rows, metric, title))
            client.log_artifacts(run_id, folder)
        return run_id
