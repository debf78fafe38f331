"""extract, ``extract.warehouse: bigquery`` (apache-airflow-providers-google): one snapshot table per window.

The line's SQL, rendered for the window, runs as a query job that writes
``<project>.<dataset>.<line>__<interval start>_<interval end>``. Training receives that table's name
(``bq://...``), so no data passes through Airflow.

A snapshot is immutable: a model may have been trained on it, and the audit record names it. Once the
window's table holds rows, every later run of the window (a manual re-run beside the scheduled one, a
cleared run) reuses it and never queries again; the job writes with WRITE_EMPTY, so even two runs racing
for the same window cannot rewrite it. The table's description names the job that wrote it.

Snapshot tables expire ``retention.snapshot_days`` after they are written; the housekeeping task takes
the expiration off every snapshot a kept version or an audit record names, so BigQuery deletes only
what nothing refers to.

The job id is deterministic (line, window, Airflow run): before inserting, the operator looks the job
up; it reattaches while the job runs and reuses it once it succeeded, so a retry never runs the query
twice (the provider's insert-job operator re-runs by default and refuses a job that is already
DONE). After a failed job the next attempt is ``<id>_attempt<N>``. The wait is deferred to the
provider's ``BigQueryInsertJobTrigger``; killing the task cancels the job. The provider's hook and
trigger are imported only when the task runs, so parsing the DAG folder does not pay for them.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.adapters.bigquery_snapshots import BigQuerySnapshots, expiry_ms, job_id_for, label
from mlops_lifecycle.config import ExtractBigQuery
from mlops_lifecycle.exceptions import SnapshotError
from mlops_lifecycle.operators.extract import ExtractOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import Snapshot
    from mlops_lifecycle.window import DataWindow

__all__ = ["BigQueryExtractOperator", "job_id_for", "label", "snapshot_table"]


def snapshot_table(cfg: ExtractBigQuery, window: DataWindow) -> str:
    return (
        f"{cfg.project}.{cfg.dataset}.{window.model_line}__"
        f"{window.interval_start:%Y%m%dT%H%M}_{window.interval_end:%Y%m%dT%H%M}"
    )


class BigQueryExtractOperator(ExtractOperator):
    """Run the window's query job into its snapshot table (deferred while the job runs)."""

    @property
    def extract_cfg(self) -> ExtractBigQuery:
        return self.section(self.config.extract, ExtractBigQuery)

    @cached_property
    def snapshots(self) -> BigQuerySnapshots:
        cfg = self.extract_cfg
        return BigQuerySnapshots(cfg.gcp_conn_id, cfg.project, cfg.location, self.log)

    def client(self) -> Any:
        """The google-cloud-bigquery client of the line's project and location."""
        return self.snapshots.client()

    def execute(self, context: Context) -> Snapshot:
        from mlops_lifecycle.sql import render_sql

        cfg, window = self.extract_cfg, self.window(context)
        self.log_window(window)
        table = snapshot_table(cfg, window) + self.snapshot_suffix(window)
        sql = render_sql(self.config.sql_path.read_text(), dict(cfg.tables), window.train_start, self.data_end(window))
        base_id = job_id_for(window.run_key + self.snapshot_suffix(window), context["ti"].run_id)
        configuration = self.snapshots.configuration(
            sql,
            table,
            {
                "model-line": self.config.model_line,
                "window": f"{window.interval_start:%Y%m%dt%H%M}-{window.interval_end:%Y%m%dt%H%M}",
                "airflow-dag": context["ti"].dag_id,
                "airflow-run": context["ti"].run_id,
            },
            expiry_ms(self.config.retention.snapshot_days),
        )
        written_by = self.snapshots.written_by(table)
        if written_by is not None:
            self.log.info("Snapshot %s already holds this window (%s): reused, never rewritten", table, written_by)
            return self._result(context, written_by, reused=True)
        self.log.info("Run key %s: snapshot %s, query job %s", window.run_key, table, base_id)
        job, reused = self.snapshots.find_or_submit(base_id, configuration, table)
        self._job_id = job.job_id
        if job.state != "DONE":
            from airflow.providers.google.cloud.triggers.bigquery import BigQueryInsertJobTrigger

            self.log.info("Deferring: waiting for job %s (%s)", job.job_id, job.state)
            self.defer(
                trigger=BigQueryInsertJobTrigger(
                    conn_id=cfg.gcp_conn_id,
                    job_id=job.job_id,
                    project_id=cfg.project,
                    location=cfg.location,
                    poll_interval=cfg.poll_interval_seconds,
                    cancel_on_kill=True,
                ),
                method_name="execute_complete",
                kwargs={"reused": reused, "job_id": job.job_id},
            )
        return self._finished(context, job.job_id, job.error_result, reused)

    def execute_complete(
        self, context: Context, event: dict[str, Any], reused: bool = False, job_id: str | None = None
    ) -> Snapshot:
        job_id = event.get("job_id") or job_id
        failed = None if event.get("status") == "success" and job_id else event.get("message", event)
        return self._finished(context, job_id or "", failed, reused)

    def _finished(self, context: Context, job_id: str, error: Any, reused: bool) -> Snapshot:
        """The job ended: its snapshot; or, when it lost a race to another run's job, that run's snapshot."""
        if error:
            cfg, window = self.extract_cfg, self.window(context)
            table = snapshot_table(cfg, window) + self.snapshot_suffix(window)
            written_by = self.snapshots.written_by(table)
            if written_by is None:
                raise SnapshotError(f"BigQuery job {cfg.project}:{cfg.location}.{job_id} failed: {error}")
            self.log.info("Job %s found %s already written (%s): reusing it", job_id, table, written_by)
            return self._result(context, written_by, reused=True)
        return self._result(context, job_id, reused)

    def _result(self, context: Context, job_id: str, reused: bool) -> Snapshot:
        window = self.window(context)
        table = snapshot_table(self.extract_cfg, window) + self.snapshot_suffix(window)
        client = self.client()
        rows = client.get_table(table).num_rows
        if not rows:
            # dropped, so a retry queries again (data may land late) instead of reusing the empty result
            client.delete_table(table, not_found_ok=True)
            raise SnapshotError(
                f"Snapshot {table} (job {job_id}) is empty: the SQL returned no rows for {window.label}"
            )
        self.log.info("Snapshot %s: %s rows (job %s%s)", table, rows, job_id, ", reused" if reused else "")
        return self.snapshot(
            window, f"bq://{table}", rows, reused, table=table, job_id=job_id, **self.backtest_fields(window)
        )

    def on_kill(self) -> None:
        job_id = getattr(self, "_job_id", None)
        if job_id:
            self.log.warning("Task killed: cancelling BigQuery job %s", job_id)
            self.snapshots.cancel(job_id)
