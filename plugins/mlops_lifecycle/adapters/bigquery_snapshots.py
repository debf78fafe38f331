"""Immutable BigQuery snapshot tables written by deterministic query jobs: what extract and the drift
monitor share on BigQuery.

A snapshot is written once (WRITE_EMPTY) by a query job whose id is derived from what it snapshots and
the Airflow run, and its description names that job. Before inserting, the job is looked up: a running
job is reattached, a succeeded one reused, and after a failed one the next attempt is
``<id>_attempt<N>``, so a retry never runs a query twice. A table that already holds rows is reused
and never queried again. The provider's hook is imported when a task runs, never at parse time.
"""

from __future__ import annotations

import hashlib
import re
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.exceptions import SnapshotError

if TYPE_CHECKING:
    from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

MAX_ATTEMPTS = 20


def label(value: str) -> str:
    """A BigQuery label value: lowercase letters, digits, ``_`` and ``-``, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def job_id_for(key: str, airflow_run_id: str) -> str:
    """Deterministic job id: the readable key plus a hash of the Airflow run (ids allow [A-Za-z0-9_-])."""
    digest = hashlib.sha256(airflow_run_id.encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"mlops_{key}") + f"_{digest}"


def expiry_ms(days: int) -> int:
    """When a snapshot table written now expires unless housekeeping keeps it (ms since the epoch)."""
    return int((time.time() + days * 86400) * 1000)


class BigQuerySnapshots:
    """Snapshot tables in one project and location, through the Google provider's hook."""

    def __init__(self, gcp_conn_id: str, project: str, location: str, log: Any) -> None:
        self.gcp_conn_id, self.project, self.location, self.log = gcp_conn_id, project, location, log

    @cached_property
    def hook(self) -> BigQueryHook:
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        return BigQueryHook(gcp_conn_id=self.gcp_conn_id, location=self.location)

    def client(self) -> Any:
        """The google-cloud-bigquery client of the project and location."""
        return self.hook.get_client(project_id=self.project, location=self.location)

    @staticmethod
    def configuration(sql: str, table: str, labels: dict[str, str], expires_ms: int) -> dict[str, Any]:
        """A query job writing ``sql``'s result once into ``table`` (project.dataset.table)."""
        project, dataset, table_id = table.split(".")
        return {
            "query": {
                "query": sql,
                "useLegacySql": False,
                "destinationTable": {"projectId": project, "datasetId": dataset, "tableId": table_id},
                "writeDisposition": "WRITE_EMPTY",  # a snapshot is never rewritten
                "createDisposition": "CREATE_IF_NEEDED",
                # its description names the job that wrote it: set per attempt in find_or_submit
                "destinationTableProperties": {"expirationTime": str(expires_ms)},
            },
            "labels": {key: label(value) for key, value in labels.items()},
        }

    def find_or_submit(self, base_id: str, configuration: dict[str, Any], table: str) -> tuple[Any, bool]:
        """(job, reused): the running or succeeded job of ``base_id``, or a newly inserted one."""
        from google.api_core.exceptions import Conflict, NotFound

        for attempt in range(1, MAX_ATTEMPTS + 1):
            job_id = base_id if attempt == 1 else f"{base_id}_attempt{attempt}"
            try:
                job = self.hook.get_job(job_id=job_id, project_id=self.project, location=self.location)
            except NotFound:
                self.log.info("Submitting query job %s", job_id)
                configuration["query"]["destinationTableProperties"]["description"] = (
                    f"mlops-lifecycle snapshot {table}, written by query job {job_id}"
                )
                try:
                    job = self.hook.insert_job(
                        configuration=configuration,
                        project_id=self.project,
                        location=self.location,
                        job_id=job_id,
                        nowait=True,
                    )
                except Conflict:  # inserted by a request whose answer was lost
                    job = self.hook.get_job(job_id=job_id, project_id=self.project, location=self.location)
                return job, False
            if job.state != "DONE":
                self.log.info("Job %s is %s: reattaching instead of running the query again", job_id, job.state)
                return job, False
            if job.error_result:
                self.log.warning("Job %s failed earlier (%s): submitting the next attempt", job_id, job.error_result)
            elif self.table_exists(table):
                self.log.info("Job %s already succeeded: reusing its snapshot, not running the query again", job_id)
                return job, True
            else:
                self.log.warning("Job %s succeeded but its snapshot was dropped (empty): querying again", job_id)
        raise SnapshotError(f"{MAX_ATTEMPTS} query jobs for {base_id} failed; see them in BigQuery")

    def written_by(self, table: str) -> str | None:
        """The job that wrote ``table`` if it exists and holds rows (an empty one may be written again)."""
        from google.api_core.exceptions import NotFound

        try:
            found = self.client().get_table(table)
        except NotFound:
            return None
        if not found.num_rows:
            return None
        match = re.search(r"written by query job (\S+)", found.description or "")
        return match.group(1) if match else "unknown"

    def table_exists(self, table: str) -> bool:
        from google.api_core.exceptions import NotFound

        try:
            self.client().get_table(table)
        except NotFound:
            return False
        return True

    def materialise(
        self, sql: str, table: str, base_id: str, labels: dict[str, str], expires_ms: int, timeout: float
    ) -> tuple[str, bool]:
        """Write ``sql``'s result into ``table`` once, waiting for the job here (for small queries that do
        not need a deferral); (the job that wrote it, reused). An empty result is not kept: rows may still
        arrive (a shipper running late), so the next run queries again."""
        written = self.written_by(table)
        if written is not None:
            self.log.info("Snapshot %s exists (%s): reused, never rewritten", table, written)
            return written, True
        job, reused = self.find_or_submit(base_id, self.configuration(sql, table, labels, expires_ms), table)
        deadline = time.monotonic() + timeout
        while job.state != "DONE":
            if time.monotonic() > deadline:
                self.cancel(job.job_id)
                raise SnapshotError(f"BigQuery job {job.job_id} did not finish in {timeout:.0f} s: cancelled")
            time.sleep(1)
            job = self.hook.get_job(job_id=job.job_id, project_id=self.project, location=self.location)
        if job.error_result:
            winner = self.written_by(table)
            if winner is not None:  # lost a race: the winner's table stands
                return winner, True
            raise SnapshotError(f"BigQuery job {self.project}:{self.location}.{job.job_id} failed: {job.error_result}")
        if not self.client().get_table(table).num_rows:
            self.client().delete_table(table, not_found_ok=True)
            self.log.info("Snapshot %s is empty: dropped, so a later run queries again", table)
        return job.job_id, reused

    def cancel(self, job_id: str) -> None:
        self.hook.cancel_job(job_id=job_id, project_id=self.project, location=self.location)
