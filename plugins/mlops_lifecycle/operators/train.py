"""train: what both training backends share. XCom: :class:`mlops_lifecycle.contract.Candidate`, or
:class:`mlops_lifecycle.contract.BacktestRun` for the backtest's training.

Both run the line's training entrypoint with the same arguments (``entrypoint_args``); it logs params,
metrics, the model and its reference profile to MLflow, scores the current production model on the
same holdout, and registers a version, all tagged with the run key. So a retry, on either backend,
finds the finished run (``trained_run``) instead of training twice.

In a backtest (``backtest=True``) the same entrypoint trains the same way on the window, then evaluates
on the horizon after it and registers nothing; the run goes to the line's backtest experiment under the
key ``<run key>@<backtest id>``, so a re-run of the backfill finds it too. One task trains what the
window needs: the line's own configuration (the baseline) and, when the backfill asked for another
variant, that variant too. It then hands the report on only if it is the backfill's last window to
finish (``backtest.last_window``): every other run skips ``backtest_report`` without starting it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.branch import BranchMixIn

from mlops_lifecycle.exceptions import TrainingFailed
from mlops_lifecycle.links import MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream, code_revision

if TYPE_CHECKING:
    from airflow.sdk import BaseOperatorLink, Context

    from mlops_lifecycle.contract import BacktestRun, Candidate, Snapshot
    from mlops_lifecycle.window import DataWindow


@dataclass(frozen=True)
class TrainingJob:
    """What one training task trains: where it is recorded, with which entrypoint and parameters."""

    run_key: str  # the MLflow run's lifecycle.run_key: found again by a retry or a re-run
    experiment: str
    entrypoint: str  # relative to include/
    parameters: dict[str, Any]
    backtest_id: str | None = None  # None: the lifecycle
    variant: str | None = None
    horizon_end: str | None = None  # ISO date, exclusive


class TrainOperator(LifecycleOperator, BranchMixIn):
    """Base of the training backends (``train.backend``): find each job's trained run, or train it.

    ``backtest``: False for the lifecycle's training (one job: the candidate); True for a backfill
    window (the baseline, then the variant its run conf asked for if that is another one).
    """

    template_fields = ("snapshot",)
    operator_extra_links: tuple[BaseOperatorLink, ...] = (MlflowRunLink(), MlflowModelVersionLink())
    ui_color = "#dff5e3"
    inherits_from_skipmixin = True  # a backtest window skips the report unless it is the last one

    def __init__(self, *, snapshot: Upstream, backtest: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot = snapshot
        self.backtest = backtest

    def jobs(self, context: Context, window: DataWindow) -> list[TrainingJob]:
        """What this task trains, in order; the last one is what it hands on."""
        cfg = self.config
        if not self.backtest:
            return [
                TrainingJob(window.run_key, cfg.registry.experiment, cfg.train.entrypoint, dict(cfg.train.parameters))
            ]
        from mlops_lifecycle.backtest import variant_from_conf
        from mlops_lifecycle.config import BASELINE_VARIANT

        variant = variant_from_conf(cfg, getattr(context.get("dag_run"), "conf", None))
        # the baseline first: a variant's report compares with it window by window
        return [self.backtest_job(window, v) for v in dict.fromkeys([BASELINE_VARIANT, variant])]

    def backtest_job(self, window: DataWindow, variant: str) -> TrainingJob:
        from mlops_lifecycle.backtest import backtest_id, horizon_days

        cfg = self.config
        entrypoint, parameters = cfg.backtest_variant(variant)
        ident = backtest_id(cfg, variant, code_revision())
        days = horizon_days(cfg, window.interval_start, window.interval_end)
        return TrainingJob(
            run_key=f"{window.run_key}@{ident}",
            experiment=cfg.backtest_experiment,
            entrypoint=entrypoint,
            parameters=parameters,
            backtest_id=ident,
            variant=variant,
            horizon_end=(window.window_end + timedelta(days=days)).isoformat(),
        )

    def trained_run(self, job: TrainingJob, required: bool = False, announce: bool = True) -> Any:
        """The finished MLflow run of this job's run key (registered, for the lifecycle), if it trained already."""
        run = self.registry.find_run(job.experiment, job.run_key)
        if run is not None and (job.backtest_id or run.data.tags.get("lifecycle.registered_version")):
            if not required and announce:
                self.log.info(
                    "Run key %s already trained in MLflow run %s: reusing it, not training again",
                    job.run_key,
                    run.info.run_id,
                )
            return run
        if required:
            raise TrainingFailed(
                f"Training for {job.run_key} ended but no finished{'' if job.backtest_id else ', registered'} "
                f"MLflow run carries that run key in experiment '{job.experiment}'"
            )
        return None

    def pending(
        self, context: Context, window: DataWindow, announce: bool = True
    ) -> tuple[list[TrainingJob], TrainingJob | None]:
        """This task's jobs, and the first of them not trained yet (None: all are)."""
        jobs = self.jobs(context, window)
        return jobs, next((job for job in jobs if self.trained_run(job, announce=announce) is None), None)

    def result(self, context: Context, window: DataWindow, jobs: list[TrainingJob]) -> Candidate | BacktestRun:
        """What the task hands on once every job is trained: the candidate version, or the backtest's run."""
        job = jobs[-1]
        run = self.trained_run(job, required=True)
        if job.backtest_id is None:
            return self.candidate(window, run)
        self.set_link(MlflowRunLink.key, self.registry.run_url(run.info.experiment_id, run.info.run_id))
        status = run.data.tags.get("backtest.horizon", "missing")
        self.log.info(
            "Backtest %s (%s), window to %s: run %s, horizon to %s %s",
            job.backtest_id,
            job.variant,
            window.window_end,
            run.info.run_id,
            job.horizon_end,
            "evaluated" if status == "complete" else "not in the data yet",
        )
        trained: BacktestRun = {
            "backtest_id": job.backtest_id,
            "baseline_id": jobs[0].backtest_id or job.backtest_id,
            "variant": job.variant or "",
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "run_key": job.run_key,
            "window_end": window.window_end.isoformat(),
            "horizon_end": job.horizon_end or "",
            "horizon": status,
            "snapshot": self.snapshot["uri"],
        }
        from mlops_lifecycle.operators.backtest import REPORT_TASK, windows_still_training

        pending = windows_still_training(context, self.registry, trained)
        if pending:
            self.log.info(
                "%d other window(s) of this backfill still training (%s): the last to finish builds the report",
                len(pending),
                ", ".join(sorted(pending)[:3]) + ("..." if len(pending) > 3 else ""),
            )
            self.do_branch(context, None)
        else:
            self.do_branch(context, REPORT_TASK)
        return trained

    def candidate(self, window: DataWindow, run: Any) -> Candidate:
        tags = run.data.tags
        candidate: Candidate = {
            "model_line": self.config.model_line,
            "model_name": self.config.registry.model_name,
            "model_version": tags["lifecycle.registered_version"],
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "run_key": window.run_key,
            "production_version": None
            if tags.get("lifecycle.production_version", "none") == "none"
            else tags["lifecycle.production_version"],
            "code_revision": tags.get("lifecycle.code_revision", "unknown"),
            "snapshot": self.snapshot["uri"],
            "window": window.label,
            "holdout_start": window.holdout_start.isoformat(),
        }
        self.set_link(MlflowRunLink.key, self.registry.run_url(run.info.experiment_id, run.info.run_id))
        self.set_link(MlflowModelVersionLink.key, self.model_version_url(candidate["model_version"]))
        self.log.info(
            "Candidate: %s v%s from run %s (production at training time: %s)",
            candidate["model_name"],
            candidate["model_version"],
            candidate["run_id"],
            candidate["production_version"] or "none",
        )
        return candidate

    def entrypoint_args(self, context: Context, window: DataWindow, job: TrainingJob, revision: str) -> list[str]:
        """The entrypoint's command-line arguments: the same locally and on Databricks. No secrets."""
        cfg = self.config
        tags = {**self.airflow_ids(context), "lifecycle.code_revision": revision}
        if job.backtest_id is not None:
            tags |= {"backtest.variant": job.variant or "", "backtest.window_end": window.window_end.isoformat()}
        backtest = []
        if job.backtest_id is not None:
            backtest = ["--backtest-id", job.backtest_id, "--horizon-end", str(job.horizon_end)]
        return [
            "--snapshot",
            self.snapshot["uri"],
            "--run-key",
            job.run_key,
            "--model-line",
            cfg.model_line,
            "--experiment",
            job.experiment,
            "--registered-model",
            cfg.registry.model_name,
            "--production-alias",
            cfg.registry.production_alias,
            "--holdout-start",
            window.holdout_start.isoformat(),
            "--window-start",
            window.train_start.isoformat(),
            "--window-end",
            window.window_end.isoformat(),
            "--target",
            cfg.train.target,
            "--params",
            json.dumps(job.parameters),
            "--tags",
            json.dumps(tags),
            *backtest,
        ]
