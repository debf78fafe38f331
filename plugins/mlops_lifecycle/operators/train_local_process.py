"""train, ``train.backend: local_process`` (the embedded local adapter): the entrypoint in a local process.

Its output streams into the task log; killing the task stops it (``adapters.local_process``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.exceptions import TrainingFailed, TrainingInputError
from mlops_lifecycle.operators.base import code_revision
from mlops_lifecycle.operators.train import TrainOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.adapters.local_process import LocalProcess
    from mlops_lifecycle.contract import BacktestRun, Candidate
    from mlops_lifecycle.operators.train import TrainingJob
    from mlops_lifecycle.window import DataWindow


class LocalProcessTrainOperator(TrainOperator):
    """Train each job on the snapshot in a local process, unless its run key already has a trained run."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._process: LocalProcess | None = None

    def execute(self, context: Context) -> Candidate | BacktestRun:
        window = self.window(context)
        jobs = self.jobs(context, window)
        for job in jobs:
            if self.trained_run(job) is None:
                self._train(context, window, job)
                self.trained_run(job, required=True)
        return self.result(context, window, jobs)

    def _train(self, context: Context, window: DataWindow, job: TrainingJob) -> None:
        from mlops_lifecycle import paths
        from mlops_lifecycle.adapters.local_process import LocalProcess, ProcessFailed

        cfg = self.config
        entrypoint = paths.include_dir() / job.entrypoint
        argv = [sys.executable, str(entrypoint), *self.entrypoint_args(context, window, job, code_revision())]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(self.registry.process_env())
        self._process = LocalProcess(argv, env, cwd=str(entrypoint.parent))
        self.log.info(
            "Training %s on %s (%d rows) in a local process",
            cfg.model_line,
            self.snapshot["uri"],
            self.snapshot["rows"],
        )
        try:
            self._process.run(timeout_seconds=cfg.train.timeout_minutes * 60)
        except ProcessFailed as exc:
            message = f"Training entrypoint {job.entrypoint} for {job.run_key} failed: {exc}"
            if exc.returncode == 2:  # the entrypoint's code for "bad input": not retried
                raise TrainingInputError(message) from None
            raise TrainingFailed(message) from None

    def on_kill(self) -> None:
        if self._process is not None:
            self._process.terminate()
