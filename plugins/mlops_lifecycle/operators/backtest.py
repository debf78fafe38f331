"""backtest_report: the gate applied window by window, and the report of the whole backtest.

Every backfill run trains its window (``backtest_train``) in parallel with the others; the report needs
all of them, in order (each window is judged against the champion the windows before it leave). So the
training task of each window, once its own result is in MLflow, looks at the backfill's other runs
(``windows_still_training``): while any of them is still training, it skips this task without starting
it; the last one runs it, and it builds the report from every finished window of the backtest in MLflow.
A window counts as finished when its task has ended or its result is in MLflow, and each window records
its result before it looks, so of two windows finishing together at least one sees the other finished
(both may: the second report task then finds the report of the same windows already built). The report
(HTML, a PNG per gate metric, CSV, JSON) is logged to one MLflow run per backtest in
``<experiment>-backtests`` and linked from this task.

Champions are scored on each window's horizon here, in the worker, with the line's own entrypoint code
(``include/training``) loaded as a module: one model load per champion, no extra process per window.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.links import BacktestReportLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.backtest import Judgement, WindowResult
    from mlops_lifecycle.contract import BacktestRun

FINISHED_STATES = {"success", "failed", "skipped", "upstream_failed", "removed"}
TRAINING_TASK, REPORT_TASK = "backtest_train", "backtest_report"


def windows_still_training(context: Context, registry: Any, trained: BacktestRun) -> set[str]:
    """Other backfill runs of this DAG whose window of ``trained``'s backtest is neither ended nor in MLflow."""
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[TRAINING_TASK])
    running = {
        run_id
        for run_id, tasks in states.items()
        if run_id != ti.run_id
        and run_id.startswith("backfill__")
        and any(state not in FINISHED_STATES for state in tasks.values())
    }
    if not running:
        return running
    recorded = registry.client.search_runs(
        [trained["experiment_id"]],
        filter_string=f"tags.`backtest.id` = '{trained['backtest_id']}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    return running - {run.data.tags.get("airflow.run_id") for run in recorded}


def windows_digest(windows: list[WindowResult]) -> str:
    """Which windows a report was built from (so a second report of the same windows is not built again)."""
    import hashlib

    return hashlib.sha256(" ".join(sorted(w.run_id for w in windows)).encode()).hexdigest()[:16]


class BacktestReportOperator(LifecycleOperator):
    """Judge every finished window of the backtest against its champion and log the report (last window only)."""

    template_fields = ("challenger",)
    operator_extra_links = (BacktestReportLink(),)
    ui_color = "#e7f0e0"

    def __init__(self, *, challenger: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.challenger: BacktestRun = challenger

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.backtest import judge, summary_rows

        c = self.challenger
        windows = self.windows(c["backtest_id"])
        digest = windows_digest(windows)
        built = self.report_run(c)
        if built is not None and built.data.tags.get("backtest.report_windows") == digest:
            url = self.link_report(c, built.info.run_id)
            self.log.info(
                "The report of backtest %s over these %d window(s) is built already: %s",
                c["backtest_id"],
                len(windows),
                url,
            )
            return {
                "backtest_id": c["backtest_id"],
                "report_run_id": built.info.run_id,
                "windows": len(windows),
                "url": url,
            }
        same = c["baseline_id"] == c["backtest_id"]  # backtesting the baseline itself
        baseline = {w.window_end: w for w in (windows if same else self.windows(c["baseline_id"]))}
        self.log.info("Backtest %s: %d finished window(s); judging them in order", c["backtest_id"], len(windows))
        judgements = judge(self.config, windows, self.score, self.served)
        judgements = [self.with_baseline(j, baseline.get(j.window.window_end)) for j in judgements]
        rows = summary_rows(judgements)
        run_id = self.log_report(c, rows, built.info.run_id if built is not None else None)
        self.registry.set_run_tags(run_id, {"backtest.report_windows": digest})
        url = self.link_report(c, run_id)
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
        from mlops_lifecycle.entrypoint import load_entrypoint

        module = load_entrypoint(self.config)
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
    def report_run(self, c: BacktestRun) -> Any:
        """The backtest's report run, if one was made."""
        found = self.registry.client.search_runs(
            [c["experiment_id"]], filter_string=f"tags.`backtest.report` = '{c['backtest_id']}'", max_results=1
        )
        return found[0] if found else None

    def link_report(self, c: BacktestRun, run_id: str) -> str | None:
        url = self.registry.run_url(c["experiment_id"], run_id)
        self.set_link(BacktestReportLink.key, f"{url}/artifacts" if url else None)
        return url

    def log_report(self, c: BacktestRun, rows: list[dict[str, Any]], run_id: str | None) -> str:
        """Log HTML, plots, CSV and JSON to the backtest's report run (``run_id``, or a new one); its id."""
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
        if run_id is None:
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
