"""Extract the window's data and train on it (embedded local adapters: DuckDB and a local process)."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from mlops_lifecycle import paths
from mlops_lifecycle.exceptions import TrainingFailed, TrainingInputError
from mlops_lifecycle.links import MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, code_revision

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.adapters.local_process import LocalProcess
    from mlops_lifecycle.window import DataWindow


class ExtractOperator(LifecycleOperator):
    """Materialise the feature snapshot of the run's window; returns its URI (no data in XCom)."""

    ui_color = "#fff3d6"

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.adapters.warehouse import LocalWarehouse

        window = self.window(context)
        self.log.info(
            "Run key %s; training window %s, holdout from %s", window.run_key, window.label, window.holdout_start
        )
        warehouse = LocalWarehouse(paths.local_home() / "warehouse")
        warehouse.ensure_sample_data(through=window.window_end)
        # history before the window is needed for lag features: the SQL reads it itself
        snapshot = warehouse.snapshot(
            sql_template=self.config.sql_path.read_text(),
            tables=dict(self.config.extract.tables),
            window_start=window.train_start,
            window_end=window.window_end,
            name=window.run_key.replace("/", "__"),
        )
        return {"uri": snapshot.uri, "rows": snapshot.rows, "reused": snapshot.reused, **window.as_dict()}


class TrainOperator(LifecycleOperator):
    """Train on the snapshot with the line's entrypoint, unless this run key already has a trained run.

    The entrypoint logs params, metrics, the model and its reference profile to MLflow, scores the
    current production model on the same holdout, and registers a version. Everything is tagged
    with the run key, so a retry finds the finished run instead of training twice.
    """

    template_fields = ("snapshot",)
    operator_extra_links = (MlflowRunLink(), MlflowModelVersionLink())
    ui_color = "#dff5e3"

    def __init__(self, *, snapshot: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self._process: LocalProcess | None = None

    def execute(self, context: Context) -> dict[str, Any]:
        window = self.window(context)
        run = self.trained_run(window)
        if run is None:
            self._train(context, window)
            run = self.trained_run(window, required=True)
        return self.candidate(window, run)

    def trained_run(self, window: DataWindow, required: bool = False) -> Any:
        """The finished, registered MLflow run of this run key, if training already happened."""
        experiment = self.config.registry.experiment
        run = self.registry.find_run(experiment, window.run_key)
        if run is not None and run.data.tags.get("lifecycle.registered_version"):
            if not required:
                self.log.info(
                    "Run key %s already trained in MLflow run %s: reusing it, not training again",
                    window.run_key,
                    run.info.run_id,
                )
            return run
        if required:
            raise TrainingFailed(
                f"Training for {window.run_key} ended but no finished, registered MLflow run carries "
                f"that run key in experiment '{experiment}'"
            )
        return None

    def candidate(self, window: DataWindow, run: Any) -> dict[str, Any]:
        tags = run.data.tags
        candidate = {
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

    def entrypoint_args(self, context: Context, window: DataWindow, revision: str) -> list[str]:
        """The entrypoint's command-line arguments: the same locally and on Databricks. No secrets."""
        cfg = self.config
        tags = {**self.airflow_ids(context), "lifecycle.code_revision": revision}
        return [
            "--snapshot",
            self.snapshot["uri"],
            "--run-key",
            window.run_key,
            "--model-line",
            cfg.model_line,
            "--experiment",
            cfg.registry.experiment,
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
            json.dumps(cfg.train.parameters),
            "--tags",
            json.dumps(tags),
        ]

    def _train(self, context: Context, window: DataWindow) -> None:
        from mlops_lifecycle.adapters.local_process import LocalProcess, ProcessFailed

        cfg = self.config
        argv = [sys.executable, str(cfg.entrypoint_path), *self.entrypoint_args(context, window, code_revision())]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(self.registry.process_env())
        self._process = LocalProcess(argv, env, cwd=str(cfg.entrypoint_path.parent))
        self.log.info(
            "Training %s on %s (%d rows) in a local process",
            cfg.model_line,
            self.snapshot["uri"],
            self.snapshot["rows"],
        )
        try:
            self._process.run(timeout_seconds=cfg.train.timeout_minutes * 60)
        except ProcessFailed as exc:
            message = f"Training entrypoint {cfg.train.entrypoint} for {window.run_key} failed: {exc}"
            if exc.returncode == 2:  # the entrypoint's code for "bad input": not retried
                raise TrainingInputError(message) from None
            raise TrainingFailed(message) from None

    def on_kill(self) -> None:
        if self._process is not None:
            self._process.terminate()
