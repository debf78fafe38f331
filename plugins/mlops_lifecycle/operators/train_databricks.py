"""train, ``train.backend: databricks`` (apache-airflow-providers-databricks): the same entrypoint, on Databricks.

A one-time run (``runs/submit``) checks the package out of git at the training code revision
(``git_source``) and runs ``include/<entrypoint>`` as a Python file task with the same arguments the
local adapter passes; or ``run-now`` of an existing job gets those arguments as ``python_params``.
The idempotency token is derived from the run key, so a retry, even after the first submit's
answer was lost, attaches to the same Databricks run. The wait is deferred to the provider's
``DatabricksExecutionTrigger`` (cancelling the run if the task is killed while deferred); a task
killed while running cancels it in ``on_kill``. MLflow settings reach the run as cluster environment
variables; a self-hosted server's token only as a Databricks secret reference, never as a value.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.config import TrainDatabricks
from mlops_lifecycle.exceptions import LifecycleError, TrainingFailed
from mlops_lifecycle.links import DatabricksRunLink, MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import full_code_revision
from mlops_lifecycle.operators.train import TrainOperator

if TYPE_CHECKING:
    from airflow.providers.databricks.hooks.databricks import DatabricksHook
    from airflow.sdk import Context

    from mlops_lifecycle.contract import BacktestRun, Candidate
    from mlops_lifecycle.operators.train import TrainingJob
    from mlops_lifecycle.window import DataWindow


MAX_ATTEMPTS = 10
JOB_DEFINED_REVISION = "defined-by-databricks-job"


def idempotency_token(run_key: str) -> str:
    """Databricks caps tokens at 64 characters; run keys can be longer, so hash them."""
    return "mlops-" + hashlib.sha256(run_key.encode()).hexdigest()[:40]


class DatabricksTrainOperator(TrainOperator):
    """Train in a Databricks run (deferred while it runs), unless this run key already has a trained run."""

    operator_extra_links = (DatabricksRunLink(), MlflowRunLink(), MlflowModelVersionLink())

    @property
    def train_cfg(self) -> TrainDatabricks:
        return self.section(self.config.train, TrainDatabricks)

    @cached_property
    def databricks(self) -> DatabricksHook:
        from airflow.providers.databricks.hooks.databricks import DatabricksHook

        return DatabricksHook(self.train_cfg.databricks_conn_id, caller=type(self).__name__)

    def execute(self, context: Context) -> Candidate | BacktestRun:
        """Submit the first job not trained yet and defer on it; hand on the result once all are trained."""
        window = self.window(context)
        jobs, job = self.pending(context, window)
        if job is None:
            return self.result(context, window, jobs)
        payload = self.run_payload(context, window, job)
        run_id = self._attach_or_submit(payload)
        self._run_id = run_id
        token = payload["idempotency_token"]
        url = self.databricks.get_run_page_url(run_id)
        self.set_link(DatabricksRunLink.key, url)
        self.log.info("Databricks run %s (idempotency token %s) trains %s: %s", run_id, token, job.run_key, url)
        from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger

        self.defer(
            trigger=DatabricksExecutionTrigger(
                run_id=run_id,
                databricks_conn_id=self.train_cfg.databricks_conn_id,
                polling_period_seconds=self.train_cfg.poll_interval_seconds,  # type: ignore[arg-type]  # sleeps a float
                run_page_url=url,
                caller=type(self).__name__,
            ),
            method_name="execute_complete",
            kwargs={"run_key": job.run_key},
            timeout=self.execution_timeout,
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any], run_key: str | None = None
    ) -> Candidate | BacktestRun:
        """One job's Databricks run ended: record it, then on to the next job (``execute``).

        ``run_key`` names the job the run trained (None from a deferral made before tasks trained several
        jobs: the first job not trained yet, else the last).
        """
        from airflow.providers.databricks.hooks.databricks import RunState

        url = event.get("run_page_url")
        self.set_link(DatabricksRunLink.key, url)
        state = RunState.from_json(event["run_state"])
        window = self.window(context)
        jobs, pending = self.pending(context, window, announce=False)
        job = next((j for j in jobs if j.run_key == run_key), pending or jobs[-1])
        if not state.is_successful:
            errors = "; ".join(f"{e.get('task_key')}: {e.get('error')}" for e in event.get("errors") or [])
            raise TrainingFailed(
                f"Databricks run {event.get('run_id')} for {job.run_key} ended {state.life_cycle_state}/"
                f"{state.result_state}: {state.state_message} {errors}".strip()
                + f". Run page: {url}. Registry unchanged."
            )
        self.log.info("Databricks run %s succeeded: %s", event.get("run_id"), url)
        run = self.trained_run(job, required=True)
        if run.data.tags.get("lifecycle.code_revision") == JOB_DEFINED_REVISION:
            # run-now: record the commit the job really checked out, not what this deployment holds
            used = (self.databricks.get_run(event["run_id"]).get("git_source") or {}).get("git_snapshot", {})
            revision = used.get("used_commit") or f"unknown (job {self.train_cfg.job_id} has no git_source)"
            self.registry.set_run_tags(run.info.run_id, {"lifecycle.code_revision": revision})
        return self.execute(context)

    def _attach_or_submit(self, payload: dict[str, Any]) -> int:
        """Submit under the run key's token; after a failed run, under the next token of the chain.

        Databricks answers a known token with the run it started, even a failed one, so a retry
        after a failure would only re-attach to it. The chain ``T``, ``T-2``, ``T-3``... keeps every
        submit idempotent (a lost answer still resolves to one run) while a retry after a failure
        trains again.
        """
        base = payload["idempotency_token"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            payload["idempotency_token"] = base if attempt == 1 else f"{base}-{attempt}"
            if self.train_cfg.job_id is not None:
                run_id = self.databricks.run_now(payload)
            else:
                run_id = self.databricks.submit_run(payload)
            state = self.databricks.get_run_state(run_id)
            if not state.is_terminal or state.is_successful:
                return run_id
            self.log.warning(
                "Databricks run %s (token %s) ended %s: %s; submitting the next attempt",
                run_id,
                payload["idempotency_token"],
                state.result_state,
                state.state_message,
            )
        raise TrainingFailed(f"{MAX_ATTEMPTS} Databricks runs for token {base} failed; see their run pages")

    def run_payload(self, context: Context, window: DataWindow, job: TrainingJob) -> dict[str, Any]:
        """The Jobs 2.2 request: no secret values, only references to Databricks secrets."""
        cfg = self.train_cfg
        # run-now: the job checks out its own git_source; the commit that ran is read back afterwards
        revision = full_code_revision() if cfg.job_id is None else JOB_DEFINED_REVISION
        args = self.entrypoint_args(context, window, job, revision)
        token = idempotency_token(job.run_key)
        timeout = cfg.timeout_minutes * 60
        if cfg.job_id is not None:
            return {"job_id": cfg.job_id, "python_params": args, "idempotency_token": token}
        task: dict[str, Any] = {"task_key": "train", "libraries": list(cfg.libraries)}
        in_repo = "/".join(
            part for part in (cfg.source.include_path.strip("/") if cfg.source else "", job.entrypoint) if part
        )
        if cfg.task == "python_file":
            task["spark_python_task"] = {
                "python_file": in_repo,
                "parameters": args,
                "source": "GIT",
            }
        elif cfg.task == "notebook":
            task["notebook_task"] = {
                "notebook_path": in_repo.removesuffix(".py"),
                "base_parameters": {"argv": json.dumps(args)},
                "source": "GIT",
            }
        else:
            task["python_wheel_task"] = {**(cfg.wheel or {}), "parameters": args}
        if cfg.cluster is not None:
            cluster = dict(cfg.cluster)
            cluster["spark_env_vars"] = {**cluster.get("spark_env_vars", {}), **self.mlflow_env()}
            task["new_cluster"] = cluster
        else:
            if not self.registry.tracks_on_databricks:
                raise LifecycleError(
                    f"train.existing_cluster_id: a run on an existing cluster cannot be given MLFLOW_TRACKING_URI "
                    f"({self.registry.tracking_uri}); use 'cluster' (a job cluster), or track in the Databricks "
                    f"workspace (connection '{self.mlflow_conn_id}' extra tracking_uri: databricks)"
                )
            task["existing_cluster_id"] = cfg.existing_cluster_id
        payload: dict[str, Any] = {
            "run_name": f"{self.config.model_line} training {job.run_key}",
            "tasks": [task],
            "timeout_seconds": timeout,
            "idempotency_token": token,
        }
        if cfg.source is not None:
            payload["git_source"] = {
                "git_url": cfg.source.git_url,
                "git_provider": cfg.source.git_provider,
                "git_commit": revision,
            }
        return payload

    def mlflow_env(self) -> dict[str, str]:
        env = {"MLFLOW_TRACKING_URI": self.registry.tracking_uri}
        if self.train_cfg.mlflow_token_secret:
            env["MLFLOW_TRACKING_TOKEN"] = "{{secrets/" + self.train_cfg.mlflow_token_secret + "}}"
        else:
            carried = self.registry.process_env()  # a token is never set for workspace tracking
            what = "an MLflow token" if carried.get("MLFLOW_TRACKING_TOKEN") else None
            if carried.get("MLFLOW_TRACKING_USERNAME"):
                what = "MLflow credentials (user:password@ in its tracking URI)"
            if what:
                raise LifecycleError(
                    f"Connection '{self.mlflow_conn_id}' carries {what}, but train.mlflow_token_secret is not set: "
                    "store a token in a Databricks secret and name its scope/key there (it is never sent as a value)"
                )
        return env

    def on_kill(self) -> None:
        run_id = getattr(self, "_run_id", None)
        if run_id is not None:
            self.log.warning("Task killed: cancelling Databricks run %s", run_id)
            self.databricks.cancel_run(run_id)
