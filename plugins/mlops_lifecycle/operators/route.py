"""route: the first task of every lifecycle run decides whether this run may change production at all.

- A **backfill** run is a backtest: it never stages, reviews, deploys or promotes (whatever its window).
- A run whose window ends **before** the window of the version production serves is superseded (a
  scheduled catch-up run, or an old run someone cleared): nothing is trained, nothing deployed.
Both end here, skipped, with the reason in the log; the run is green, since nothing went wrong. Every
other run goes on to extract. The check is repeated before each deploy step and at promotion, since
production can move while a run waits (``LifecycleOperator.ensure_not_superseded``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk.exceptions import AirflowSkipException

from mlops_lifecycle.operators.base import LifecycleOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import RunRoute

BACKFILL = "backfill"


class RouteRunOperator(LifecycleOperator):
    """Let the run through to the lifecycle, or skip it (backfill, or superseded) saying why."""

    ui_color = "#f0f0f0"

    def execute(self, context: Context) -> RunRoute:
        window = self.window(context)
        dag_run = context["dag_run"]
        run_type = str(getattr(dag_run.run_type, "value", dag_run.run_type))
        if run_type == BACKFILL:
            raise AirflowSkipException(
                f"Backfill run for {window.run_key}: a backfill is a backtest and never stages, reviews, deploys or "
                "promotes; nothing done (this release does not run backtests yet)."
            )
        because = self.superseded_because(window.run_key)
        if because:
            raise AirflowSkipException(f"Run for {window.run_key} {because}; nothing trained")
        self.log.info("Run key %s (%s run): on to the lifecycle", window.run_key, run_type)
        return {"route": "lifecycle", "run_key": window.run_key, "run_type": run_type}
