"""route: the first task of every lifecycle run decides what the run may do.

- A **backfill** run is a backtest: it branches to ``backtest_extract``, which trains and evaluates the
  window out of time and never stages, reviews, deploys or promotes (whatever its window). The variant it
  backtests comes from the run conf (``{"variant": NAME}``), checked here against the line's YAML.
- A run whose window ends **before** the window of the version production serves is superseded (a
  scheduled catch-up run, or an old run someone cleared): skipped, nothing trained, nothing deployed.
- Every other run branches to the lifecycle (``extract``).
A skipped run is green, since nothing went wrong; the log says why. The check against production is
repeated before each deploy step and at promotion (``LifecycleOperator.ensure_not_superseded``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.branch import BranchMixIn
from airflow.sdk.exceptions import AirflowSkipException

from mlops_lifecycle.exceptions import BacktestRequestInvalid
from mlops_lifecycle.operators.base import ASSET_TRIGGERED, BACKFILL, LifecycleOperator, run_type

if TYPE_CHECKING:
    from airflow.sdk import Context

LIFECYCLE_START, BACKTEST_START = "extract", "backtest_extract"


def requested_by(context: Context) -> str:
    """What the drift monitor said when it requested this run (its asset events' extra)."""
    events = context.get("triggering_asset_events") or {}
    said = [
        f"{event.extra.get('monitor_run', '?')}: {event.extra.get('summary', 'no summary')}"
        for asset_events in events.values()
        for event in asset_events
    ]
    return "; ".join(said) or "no asset event found"


class RouteRunOperator(LifecycleOperator, BranchMixIn):
    """Branch to the lifecycle or to the backtest, or skip the run (superseded) saying why."""

    ui_color = "#f0f0f0"

    def execute(self, context: Context) -> Any:
        from mlops_lifecycle.backtest import BacktestConfError, variant_from_conf

        window = self.window(context)
        dag_run = context["dag_run"]
        kind = run_type(context)
        if kind == BACKFILL:
            try:
                variant = variant_from_conf(self.config, getattr(dag_run, "conf", None))
            except BacktestConfError as exc:
                raise BacktestRequestInvalid(f"Backfill run for {window.run_key}: {exc}") from None
            self.log.info(
                "Backfill run for %s: a backtest of variant '%s' (stages, reviews, deploys and promotes nothing)",
                window.run_key,
                variant,
            )
            return self.do_branch(context, BACKTEST_START)
        because = self.superseded_because(window.run_key)
        if because:
            raise AirflowSkipException(f"Run for {window.run_key} {because}; nothing trained")
        if kind == ASSET_TRIGGERED:
            self.log.info("Retrain requested by the drift monitor: %s", requested_by(context))
        self.log.info("Run key %s (%s run): on to the lifecycle", window.run_key, kind)
        return self.do_branch(context, LIFECYCLE_START)
