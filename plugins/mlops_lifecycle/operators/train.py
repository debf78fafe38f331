"""train: what both training backends share. XCom: :class:`mlops_lifecycle.contract.Candidate`.

Both run the line's training entrypoint with the same arguments (``entrypoint_args``); it logs params,
metrics, the model and its reference profile to MLflow, scores the current production model on the
same holdout, and registers a version, all tagged with the run key. So a retry, on either backend,
finds the finished run (``trained_run``) instead of training twice.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.exceptions import TrainingFailed
from mlops_lifecycle.links import MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import BaseOperatorLink, Context

    from mlops_lifecycle.contract import Candidate, Snapshot
    from mlops_lifecycle.window import DataWindow


class TrainOperator(LifecycleOperator):
    """Base of the training backends (``train.backend``): find the run key's trained run, or train it."""

    template_fields = ("snapshot",)
    operator_extra_links: tuple[BaseOperatorLink, ...] = (MlflowRunLink(), MlflowModelVersionLink())
    ui_color = "#dff5e3"

    def __init__(self, *, snapshot: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot = snapshot

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
