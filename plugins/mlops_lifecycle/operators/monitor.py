"""The drift monitor DAG's steps (``<line>__monitor``)::

    snapshot_served >> check_drift >> on_breach   (on_breach's outlet: the line's retrain request asset)

``snapshot_served`` freezes what production served in the run's interval (and, with ground truth, the
earlier interval whose actuals are now complete, and those actuals) as snapshots a retry reuses.
``check_drift`` checks each model version that served against its own training reference and logs one
MLflow run per version and interval with the drift report; a retry finds the runs it made. ``on_breach``
alerts the owners and requests a retrain (an asset event the lifecycle DAG is scheduled on), unless the
line is in its cool-down; without a breach it is skipped, so no event is emitted.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from mlops_lifecycle import paths
from mlops_lifecycle.config import ExtractBigQuery, Monitoring, declared_feature_kinds
from mlops_lifecycle.exceptions import LifecycleError, MonitorRequestInvalid
from mlops_lifecycle.links import DriftReportLink, MlflowRunLink
from mlops_lifecycle.monitoring import (
    MONITOR_KEY_TAG,
    RETRAIN_AT_TAG,
    RETRAIN_TAG,
    cooldown_until,
    interval_label,
    labelled_interval,
    monitor_interval,
    monitor_key,
    performance_breaches,
    plain_utc,
    summary,
)
from mlops_lifecycle.operators.base import BACKFILL, LifecycleOperator, Upstream, run_type

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context

    from mlops_lifecycle.adapters.served_log import ServedSnapshot

FINDINGS_TAG = "monitor.findings"
REQUESTED_BY_TAG = "monitor.retrain_requested_by"  # the monitor run (dag_id/run_id) that made the request
VERDICT_TAG = "monitor.verdict"
REPORT_HTML, REPORT_PNG = "drift_report.html", "drift_report.png"
PREDICTION = "prediction"


class MonitorOperator(LifecycleOperator):
    ui_color = "#eaf7ee"

    @property
    def monitoring(self) -> Monitoring:
        if self.config.monitoring is None:
            raise LifecycleError(f"model line {self.config.model_line} has no monitoring section")
        return self.config.monitoring

    @cached_property
    def experiment_id(self) -> str:
        client, name = self.registry.client, self.config.monitoring_experiment
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(name))
        except Exception:  # noqa: BLE001 - made meanwhile by another line's or run's monitor
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    @cached_property
    def bigquery(self) -> Any:
        from mlops_lifecycle.adapters.bigquery_snapshots import BigQuerySnapshots

        cfg = self.section(self.config.extract, ExtractBigQuery)
        return BigQuerySnapshots(cfg.gcp_conn_id, cfg.project, cfg.location, self.log)

    def interval(self, context: Context) -> tuple[datetime, datetime]:
        """The run's data interval, or what a manual run's conf asks to check (``since``, ``until``)."""
        from mlops_lifecycle.monitoring import IntervalRequestInvalid, requested_check

        try:
            asked = requested_check(getattr(context.get("dag_run"), "conf", None), datetime.now(UTC))
        except IntervalRequestInvalid as exc:
            raise MonitorRequestInvalid(f"{self.config.monitor_dag_id}: {exc}") from None
        if asked is not None:
            return asked
        return monitor_interval(
            self.monitoring,
            context.get("data_interval_start"),
            context.get("data_interval_end"),
            getattr(context.get("dag_run"), "run_after", None),
        )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class ServedSnapshotOperator(MonitorOperator):
    """Freeze what production served in the interval (and the labelled interval, with its actuals)."""

    def execute(self, context: Context) -> dict[str, Any]:
        start, end = self.interval(context)
        kinds = declared_feature_kinds(self.config.entrypoint_path)
        if not kinds:
            raise LifecycleError(
                f"{self.config.train.entrypoint} declares no CATEGORICAL/NUMERIC features: the monitor reads "
                "them to know the columns of a served row"
            )
        line = self.config.model_line
        served_from = self.monitoring.served

        def freeze(first: datetime, last: datetime) -> dict[str, Any]:
            if served_from == "bigquery":
                made = self.bigquery_served(context, first, last, kinds)
            else:
                from mlops_lifecycle.adapters.served_log import snapshot_prediction_log

                name = f"{line}__served__{interval_label(first, last)}.parquet"
                target = paths.local_home() / "warehouse" / "snapshots" / name
                logs = paths.local_home() / "predictions"
                made = snapshot_prediction_log(logs, line, first, last, list(kinds), target)
            self.log.info(
                "Served %s..%s: %d rows of versions %s from %d log lines (%s bad: %s)%s",
                _iso(first), _iso(last), made.rows, made.versions or "none", made.lines,
                sum(made.bad_lines.values()), made.bad_lines or "none", ", snapshot reused" if made.reused else "",
            )
            return {"interval_start": _iso(first), "interval_end": _iso(last), **asdict(made)}

        out: dict[str, Any] = {"interval_start": _iso(start), "interval_end": _iso(end), "served": freeze(start, end)}
        truth = self.monitoring.ground_truth
        if truth is not None:
            first, last = labelled_interval(truth, start, end)
            if first < last:
                labelled = freeze(first, last)
                labelled["actuals_uri"] = self.actuals(context, first, last) if labelled["rows"] else None
                out["labelled"] = labelled
            else:
                self.log.info("No served day completes its actuals in this check (an earlier check scored it)")
        return out

    # --- BigQuery: the shipped logs and the actuals, as snapshot tables beside extract's ------------------
    def bigquery_table(
        self, context: Context, sql: str, name: str, first: datetime, last: datetime
    ) -> tuple[str, str, bool]:
        """(table, job, reused): ``sql``'s result written once into ``<extract dataset>.<line>__<name>``."""
        from mlops_lifecycle.adapters.bigquery_snapshots import expiry_ms, job_id_for

        cfg = self.section(self.config.extract, ExtractBigQuery)
        table = f"{cfg.project}.{cfg.dataset}.{self.config.model_line}__{name}"
        labels = {
            "model-line": self.config.model_line,
            "window": interval_label(first, last),
            "airflow-dag": context["ti"].dag_id,
            "airflow-run": context["ti"].run_id,
        }
        job, reused = self.bigquery.materialise(
            sql,
            table,
            job_id_for(f"{self.config.model_line}/{name}", context["ti"].run_id),
            labels,
            expiry_ms(self.config.retention.snapshot_days),
            self.monitoring.query_timeout_seconds,
        )
        return table, job, reused

    def bigquery_served(
        self, context: Context, first: datetime, last: datetime, kinds: dict[str, str]
    ) -> ServedSnapshot:
        """The served rows of [first, last) from the shipped log table, as a snapshot table."""
        from mlops_lifecycle.adapters.served_log import ServedSnapshot
        from mlops_lifecycle.monitoring import served_sql

        assert self.monitoring.served_table is not None
        sql = served_sql(self.monitoring.served_table, self.config.model_line, first, last, kinds)
        table, job, reused = self.bigquery_table(context, sql, f"served__{interval_label(first, last)}", first, last)
        if not self.bigquery.table_exists(table):  # nothing shipped for the interval (yet): not frozen
            return ServedSnapshot(uri="", rows=0, reused=False, versions={}, lines=0, bad_lines={})
        counted = self.bigquery.client().query(
            f"SELECT model_version, COUNT(*) AS n FROM `{table}` GROUP BY model_version"
        ).result()
        versions = {str(row["model_version"]): int(row["n"]) for row in counted}
        self.log.info("Served rows of %s..%s in %s (query job %s)", _iso(first), _iso(last), table, job)
        # lines the shipper could not parse never reach the table: its own metrics count them
        return ServedSnapshot(
            uri=f"bq://{table}", rows=sum(versions.values()), reused=reused, versions=versions, lines=0, bad_lines={}
        )

    def actuals(self, context: Context, first: datetime, last: datetime) -> str | None:
        """Snapshot of the actuals of the days the labelled rows predicted (None: the warehouse has none yet)."""
        from mlops_lifecycle.adapters.warehouse import LocalWarehouse
        from mlops_lifecycle.exceptions import SnapshotError

        truth = self.monitoring.ground_truth
        assert truth is not None
        offset = timedelta(days=truth.prediction_offset_days)
        days_from, days_to = (first + offset).date(), (last + offset).date() + timedelta(days=1)
        sql_text = (paths.include_dir() / (truth.sql or self.config.extract.sql)).read_text()
        if isinstance(self.config.extract, ExtractBigQuery):
            from mlops_lifecycle.sql import render_sql

            sql = render_sql(sql_text, dict(self.config.extract.tables), days_from, days_to)
            name = f"actuals__{days_from:%Y%m%d}-{days_to:%Y%m%d}"
            table, _, _ = self.bigquery_table(context, sql, name, first, last)
            return f"bq://{table}" if self.bigquery.table_exists(table) else None
        warehouse = LocalWarehouse(paths.local_home() / "warehouse")
        warehouse.ensure_sample_data(through=min(days_to, datetime.now(UTC).date()))
        try:
            made = warehouse.snapshot(
                sql_template=sql_text,
                tables=dict(self.config.extract.tables),
                window_start=days_from,
                window_end=days_to,
                name=f"{self.config.model_line}__actuals__{days_from:%Y%m%d}-{days_to:%Y%m%d}",
            )
        except SnapshotError as exc:
            self.log.warning("No actuals for %s..%s yet: %s", days_from, days_to, exc)
            return None
        self.log.info("Actuals %s..%s: %d rows (%s)", days_from, days_to, made.rows, made.uri)
        return made.uri


class DriftCheckOperator(MonitorOperator):
    """Check each served version against its training reference; one MLflow run per version and interval."""

    operator_extra_links = (DriftReportLink(), MlflowRunLink())

    def __init__(self, *, snapshot: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot

    template_fields = ("snapshot",)

    def execute(self, context: Context) -> dict[str, Any]:
        snap = self.snapshot
        served_info = snap["served"]
        start, end = datetime.fromisoformat(snap["interval_start"]), datetime.fromisoformat(snap["interval_end"])
        served = self.read(served_info["uri"])
        labelled_info = snap.get("labelled")
        labelled = self.labelled_rows(labelled_info)
        versions = sorted(
            set(served_info["versions"]) | set(labelled["model_version"].unique() if labelled is not None else []),
            key=lambda v: (len(v), v),
        )
        findings: dict[str, Any] = {}
        for version in versions:
            findings[version] = self.check_version(
                version,
                start,
                end,
                served[served["model_version"] == version],
                labelled[labelled["model_version"] == version] if labelled is not None else None,
                served_info,
            )
        if not versions:
            self.log.info("Nothing served in %s..%s: no version to check", _iso(start), _iso(end))
        breached = [v for v, found in findings.items() if found["breaches"]]
        shown = breached[0] if breached else (versions[0] if versions else None)
        if shown is not None:
            self.set_link(DriftReportLink.key, findings[shown].get("report_url"))
            self.set_link(MlflowRunLink.key, findings[shown].get("run_url"))
        text = summary(findings)
        self.log.info("Interval %s..%s: %s", _iso(start), _iso(end), text)
        return {
            "interval_start": snap["interval_start"],
            "interval_end": snap["interval_end"],
            "versions": findings,
            "breached": bool(breached),
            "summary": text,
            "bad_log_lines": sum(served_info["bad_lines"].values()),
        }

    # --- inputs --------------------------------------------------------------------------------------
    def read(self, uri: str) -> pd.DataFrame:
        """A snapshot: a parquet file (local) or ``bq://project.dataset.table``."""
        import pandas as pd

        if not uri:  # an empty BigQuery result, not kept
            return pd.DataFrame({"model_version": pd.Series(dtype=str)})
        if uri.startswith("bq://"):
            rows = self.bigquery.client().list_rows(uri.removeprefix("bq://"))
            frame: pd.DataFrame = rows.to_dataframe(create_bqstorage_client=False)
            return frame
        return pd.read_parquet(uri)

    def labelled_rows(self, info: dict[str, Any] | None) -> pd.DataFrame | None:
        """The labelled interval's served rows joined with their actuals (None without ground truth)."""
        import pandas as pd

        from mlops_lifecycle.monitoring import join_actuals

        truth = self.monitoring.ground_truth
        if info is None or truth is None:
            return None
        rows = self.read(info["uri"])
        if not info.get("actuals_uri") or rows.empty:
            return rows.iloc[0:0].assign(actual=pd.Series(dtype=float))
        actual = truth.actual or self.config.train.target
        actuals = self.read(info["actuals_uri"])
        missing = [c for c in (*truth.key, "date", actual) if c not in actuals.columns]
        if missing:
            raise LifecycleError(
                f"monitoring.ground_truth: its SQL ({truth.sql or self.config.extract.sql}) must return "
                f"{[*truth.key, 'date', actual]}; {missing} missing from its columns {list(actuals.columns)}"
            )
        actuals = actuals.rename(columns={actual: "actual"})
        joined = join_actuals(rows, actuals, truth)
        self.log.info("Labelled rows: %d of %d served rows found their actual", len(joined), len(rows))
        return joined

    def training_run(self, version: str) -> str | None:
        """The MLflow run that trained ``version``; None when the registry no longer has it (reported)."""
        from mlflow.exceptions import MlflowException

        try:
            run_id = self.registry.client.get_model_version(self.config.registry.model_name, version).run_id
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a registry error is retried, never recorded as "no reference"
            return None
        return run_id or None

    def reference(self, version: str, run_id: str | None) -> tuple[pd.DataFrame, dict[str, str]] | str:
        """(sample, column kinds) of a version's training reference, or why there is none."""
        import pandas as pd

        if run_id is None:
            return f"v{version} is not in the registry (deleted by hand?), or names no training run"
        names = {a.path for a in self.registry.client.list_artifacts(run_id)}
        if not {"reference_profile.json", "reference_sample.parquet"} <= names:
            return f"v{version} has no reference sample (its training run {run_id} predates drift monitoring)"
        with tempfile.TemporaryDirectory() as folder:
            profile_file = self.registry.client.download_artifacts(run_id, "reference_profile.json", folder)
            sample_file = self.registry.client.download_artifacts(run_id, "reference_sample.parquet", folder)
            profile = json.loads(Path(profile_file).read_text())
            sample = pd.read_parquet(sample_file)
        kinds = dict(profile.get("kinds") or {c: s["kind"] for c, s in profile["columns"].items()})
        return sample, kinds

    def holdout_metrics(self, run_id: str) -> dict[str, float]:
        metrics = self.registry.client.get_run(run_id).data.metrics
        return {name: metrics[name] for name in self.config.gate.metrics if name in metrics}

    # --- one version -----------------------------------------------------------------------------------
    def check_version(
        self,
        version: str,
        start: datetime,
        end: datetime,
        served: pd.DataFrame,
        labelled: pd.DataFrame | None,
        served_info: dict[str, Any],
    ) -> dict[str, Any]:
        key = monitor_key(self.config.model_line, version, start, end)
        client = self.registry.client
        runs = client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{MONITOR_KEY_TAG}` = '{key}'", max_results=10
        )
        for run in runs:
            if run.info.status == "FINISHED" and FINDINGS_TAG in run.data.tags:
                self.log.info("v%s: %s was checked by an earlier try (run %s): reused", version, key, run.info.run_id)
                found: dict[str, Any] = json.loads(run.data.tags[FINDINGS_TAG])
                return found
            client.delete_run(run.info.run_id)  # a try that died while logging: made again, not left half-done
        return self.log_check(version, key, start, end, served, labelled, served_info)

    def log_check(
        self,
        version: str,
        key: str,
        start: datetime,
        end: datetime,
        served: pd.DataFrame,
        labelled: pd.DataFrame | None,
        served_info: dict[str, Any],
    ) -> dict[str, Any]:
        from mlflow.entities import Metric

        from mlops_lifecycle.drift import DriftThresholds, check_drift, reference_from_frame
        from mlops_lifecycle.drift_report import render_html, render_png

        limits = self.monitoring.limits
        thresholds = DriftThresholds(**limits.model_dump())
        training_run = self.training_run(version)
        reference = self.reference(version, training_run)
        breaches: list[str] = []
        metrics: dict[str, float] = {"served_rows": float(len(served))}
        result = None
        if isinstance(reference, str):
            verdict = "no reference"
            self.log.warning("v%s: %s; drift not checked", version, reference)
        else:
            sample, kinds = reference
            if len(served):
                columns = [c for c in kinds if c in sample.columns and c not in self.monitoring.exclude]
                result = check_drift(
                    reference_from_frame(sample[columns], {c: kinds[c] for c in columns}),
                    served,
                    thresholds,
                    prediction_column=PREDICTION if PREDICTION in kinds else None,
                )
                breaches += [f"{column}: {reason}" for column, reason in result.breaches]
                metrics |= _drift_metrics(result)
            verdict = (
                "no rows served"
                if not len(served)
                else "breach"
                if breaches
                else "ok"
                if result is not None and result.judged
                else f"not judged ({len(served)} rows < min_rows {limits.min_rows})"
            )
        truth = self.monitoring.ground_truth
        if labelled is not None:
            missing = int(labelled["actual"].isna().sum())
            labelled = labelled.dropna(subset=["actual"])
            metrics["labelled_rows"], metrics["actuals_missing"] = float(len(labelled)), float(missing)
        live, holdout = self.performance(labelled, training_run)
        metrics |= {f"live.{k}": v for k, v in live.items()} | {f"holdout.{k}": v for k, v in holdout.items()}
        if live and truth is not None and labelled is not None and len(labelled) < truth.min_rows:
            self.log.info(
                "v%s: live metrics on %d labelled rows reported, not judged (ground_truth.min_rows %d)",
                version, len(labelled), truth.min_rows,
            )
        elif live and truth is not None:
            lost = performance_breaches(live, holdout, self.config.gate.metrics, truth.max_regression)
            breaches += lost
            if lost:
                verdict = "breach"
        client = self.registry.client
        run = client.create_run(
            self.experiment_id,
            run_name=f"v{version} {interval_label(start, end)}",
            tags={
                MONITOR_KEY_TAG: key,
                "lifecycle.model_line": self.config.model_line,
                "lifecycle.model_version": version,
                "monitor.interval_start": _iso(start),
                "monitor.interval_end": _iso(end),
                "monitor.training_run": training_run or "",
                VERDICT_TAG: verdict,
            },
        )
        run_id = run.info.run_id
        stamp, step = int(end.timestamp() * 1000), int(end.timestamp() // 3600)  # hours since the epoch
        metrics["bad_log_lines"] = float(sum(served_info["bad_lines"].values()))
        batch = [Metric(_metric_name(k), float(v), stamp, step) for k, v in metrics.items() if v is not None]
        for first in range(0, len(batch), 900):
            client.log_batch(run_id, metrics=batch[first : first + 900])
        url = self.registry.run_url(self.experiment_id, run_id)
        report_url = None
        if result is not None:
            title = f"{self.config.model_line} v{version}, served {interval_label(start, end)}"
            context = {
                "model line": self.config.model_line,
                "model version": f"v{version}",
                "interval": f"{_iso(start)} .. {_iso(end)}",
                "served rows": str(len(served)),
                "bad log lines": str(int(metrics["bad_log_lines"])),
                "training run": training_run or "-",
                "verdict": verdict,
            }
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / REPORT_PNG).write_bytes(render_png(result, title))
                (Path(folder) / REPORT_HTML).write_text(render_html(result, title, context, png_name=REPORT_PNG))
                client.log_artifacts(run_id, folder)
            report_url = f"{url}/artifacts/{REPORT_HTML}" if url else None
        findings = {
            "run_id": run_id,
            "run_url": url,
            "report_url": report_url,
            "rows": len(served),
            "verdict": verdict,
            "breaches": breaches,
            "drifted": sorted({b.split(":", 1)[0] for b in breaches if result is not None and ":" in b}),
            "live": live,
            "holdout": holdout,
            "labelled_rows": 0 if labelled is None else len(labelled),
        }
        client.set_tag(run_id, FINDINGS_TAG, _bounded_json(findings))
        client.set_terminated(run_id)
        self.log.info("v%s: %s (%d rows); %s", version, verdict, len(served), "; ".join(breaches) or "no breach")
        return findings

    def performance(
        self, labelled: pd.DataFrame | None, training_run: str | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(live gate metrics on the labelled rows, the served version's holdout metrics)."""
        if labelled is None or labelled.empty or training_run is None:
            return {}, {}
        from mlops_lifecycle.entrypoint import load_entrypoint

        line = load_entrypoint(self.config).LINE
        computed = line.metrics(labelled["actual"].to_numpy(dtype=float), labelled[PREDICTION].to_numpy(dtype=float))
        live = {name: float(value) for name, value in computed.items() if name in self.config.gate.metrics}
        return live, self.holdout_metrics(training_run)


class _OnBreach(MonitorOperator):
    """What runs after ``check_drift`` on a breach; skipped (saying why) when nothing breached."""

    def __init__(self, *, findings: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.findings = findings

    template_fields = ("findings",)

    def breached(self) -> tuple[str, dict[str, Any]]:
        """(the interval, the breached versions' findings); skip the task when nothing breached."""
        found = self.findings
        interval = f"{found['interval_start']} .. {found['interval_end']}"
        if not found["breached"]:
            raise AirflowSkipException(f"No breach in {interval}: nothing to alert, no retrain request")
        return interval, {v: f for v, f in found["versions"].items() if f["breaches"]}


class AlertOwnersOperator(_OnBreach):
    """Tell the line's owners about a breach (the line's notifier), once per interval; record it on the runs."""

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.notify import LineAlert

        interval, breached = self.breached()
        if run_type(context) == BACKFILL:
            raise AirflowSkipException(
                f"Breach in {interval} found by a backfill of the monitor: recorded on its MLflow runs, not mailed"
            )
        runs = [f["run_id"] for f in breached.values()]
        to = ",".join(self.config.alerting.emails) or f"team {self.config.owner.team}"
        tags = [self.registry.client.get_run(r).data.tags for r in runs]
        if all("monitor.alerted_at" in t for t in tags):
            self.log.info("Alerted by an earlier try at %s: not sent twice", tags[0]["monitor.alerted_at"])
            return {"alerted": to, "runs": runs}
        ti = context["ti"]
        links = [f.get("report_url") or f.get("run_url") for f in breached.values()]
        links = [link for link in links if link]
        LineAlert(
            self.config,
            kind="drift_breach",
            subject=f"drift breach in production, {interval}",
            body=f"{self.findings['summary']}\n\nDrift reports: {', '.join(links) or '-'}\n"
            f"Airflow: {ti.dag_id} / {ti.run_id}",
            record={
                "dag_id": ti.dag_id,
                "run_id": ti.run_id,
                "interval": interval,
                "summary": self.findings["summary"],
                "reports": links,
                "monitor_runs": runs,
            },
        ).notify(context)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for run_id in runs:
            via = f"smtp:{self.config.alerting.smtp_conn_id}" if self.config.alerting.smtp_conn_id else "local file"
            self.registry.set_run_tags(
                run_id, {"monitor.alerted_to": to, "monitor.alerted_at": now, "monitor.alerted_via": via}
            )
        self.log.info("Alerted %s: %s", to, self.findings["summary"])
        return {"alerted": to, "runs": runs}


class RetrainRequestOperator(_OnBreach):
    """Request a retrain on a breach: this task's outlet (the line's retrain asset) is the request, so the
    task is skipped, saying why, when no request is due (cool-down, backfill, retrain_on_breach off)."""

    def execute(self, context: Context) -> dict[str, Any]:
        interval, breached = self.breached()
        runs = [f["run_id"] for f in breached.values()]
        decision, because = self.decision(context, runs)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        requested = {RETRAIN_AT_TAG: now, REQUESTED_BY_TAG: f"{context['ti'].dag_id}/{context['ti'].run_id}"}
        for run_id in runs:
            tags = {RETRAIN_TAG: decision, "monitor.retrain_because": because}
            if decision == "already requested":
                continue  # the runs keep the record of the request that was made
            self.registry.set_run_tags(run_id, tags | (requested if decision == "requested" else {}))
        if decision != "requested":
            raise AirflowSkipException(f"Retrain not requested for the breach in {interval}: {because}")
        ti = context["ti"]
        for asset in self.outlets:
            context["outlet_events"][asset].extra = {
                "model_line": self.config.model_line,
                "interval": interval,
                "summary": self.findings["summary"][:2000],
                "monitor_run": f"{ti.dag_id}/{ti.run_id}",
                "mlflow_runs": runs,
            }
        self.log.info("Retrain requested (%s): %s", because, self.findings["summary"])
        return {"retrain": decision, "because": because, "monitor_runs": runs}

    def emitted_at(self, context: Context, this_run: str) -> str | None:
        """When this monitor run's retrain request was emitted (this task's inlet: the same asset), if it was."""
        for asset in self.inlets:
            try:
                for event in context["inlet_events"][asset].ascending(False).limit(200):
                    if (event.extra or {}).get("monitor_run") == this_run:
                        return str(event.timestamp)
            except Exception as exc:  # noqa: BLE001 - unknown: emit (at least once) rather than lose a request
                self.log.warning("Could not read the retrain requests already emitted: %s", exc)
        return None

    def last_request(self, context: Context) -> datetime | None:
        """When the line's last retrain request was emitted: the newest event of the retrain asset, which is what
        Airflow acted on (a request tagged on the runs whose task then failed was never emitted, and does not
        start a cool-down). Without the asset's events (unreadable), the newest request tagged on the runs."""
        for asset in self.inlets:
            try:
                newest = list(context["inlet_events"][asset].ascending(False).limit(1))
            except Exception as exc:  # noqa: BLE001 - fall back to the runs' tags below
                self.log.warning("Could not read the retrain asset's events (%s): using the runs' tags", exc)
                break
            return plain_utc(newest[0].timestamp) if newest else None
        earlier = self.registry.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RETRAIN_TAG}` = 'requested' and tags.`lifecycle.model_line` = "
            f"'{self.config.model_line}'",
            order_by=["attributes.start_time DESC"],
            max_results=200,
        )
        stamps = [datetime.fromisoformat(r.data.tags[RETRAIN_AT_TAG]) for r in earlier if RETRAIN_AT_TAG in r.data.tags]
        return max(stamps, default=None)

    def decision(self, context: Context, runs: list[str]) -> tuple[str, str]:
        """('requested' | 'cooldown' | 'off' | 'not requested', why)."""
        if not self.monitoring.retrain_on_breach:
            return "off", "monitoring.retrain_on_breach is false"
        if run_type(context) == BACKFILL:
            return "not requested", "a backfill of the monitor looks at the past; it requests no retrain"
        reg = self.config.registry
        serving = self.registry.alias_version(reg.model_name, reg.production_alias)
        breached = [str(v) for v, f in self.findings["versions"].items() if f["breaches"]]
        if serving not in breached:
            return "not requested", (
                f"production serves v{serving}, which did not breach (the breach was of v{', v'.join(breached)}): "
                "a retrain would not change what serves"
            )
        from mlops_lifecycle.window import requested_interval, run_key_interval

        trained = self.registry.version_tags(reg.model_name, serving).get("audit.run_key")
        _, would_end = requested_interval(self.config.schedule.cron, self.config.schedule.timezone, datetime.now(UTC))
        if trained and run_key_interval(trained)[1].date() >= would_end.date():
            return "not requested", (
                f"production v{serving} was trained on data up to {run_key_interval(trained)[1]:%Y-%m-%d}: a retrain "
                "now would train on the same days"
            )
        client = self.registry.client
        this_run = f"{context['ti'].dag_id}/{context['ti'].run_id}"
        made = {str(client.get_run(r).data.tags.get(REQUESTED_BY_TAG)) for r in runs} - {"None"}
        if this_run in made:
            emitted = self.emitted_at(context, this_run)
            if emitted:  # the task succeeded once and was cleared: its request stands, not made twice
                return "already requested", f"this run's request was emitted at {emitted}; a cleared task repeats none"
            # an earlier try tagged the runs and did not finish, so its event was never emitted: it is due now
            return "requested", "this interval's request, made by an earlier try of this task"
        if made:
            return "already requested", f"this interval's breach was already requested by {', '.join(sorted(made))}"
        last = self.last_request(context)
        until = cooldown_until(last, self.monitoring.cooldown_hours)
        if last is not None and until is not None and datetime.now(UTC) < until:
            return "cooldown", (
                f"cool-down: the last retrain request was at {last:%Y-%m-%d %H:%M} UTC, the next may be made from "
                f"{until:%Y-%m-%d %H:%M} UTC (monitoring.cooldown_hours {self.monitoring.cooldown_hours:g})"
            )
        return "requested", "a breach" + (f"; the last request was at {last:%Y-%m-%d %H:%M} UTC" if last else "")


def _drift_metrics(result: Any) -> dict[str, float]:
    out: dict[str, float] = {"drifted_columns": float(sum(1 for c in result.columns.values() if c.drifted))}
    columns = [*result.columns.values(), *([result.prediction] if result.prediction is not None else [])]
    for column in columns:
        prefix = "prediction" if column is result.prediction else f"drift.{column.name}"
        for name, value in (
            ("psi", column.psi),
            ("statistic", column.statistic),
            ("p_value", column.p_value),
            ("null_rate", column.null_rate),
            ("out_of_range_rate", column.out_of_range_rate),
            ("unseen_rate", column.unseen_rate),
            ("schema_violations", column.schema_violations),
        ):
            if value is not None:
                out[f"{prefix}.{name}"] = float(value)
    return out


def _metric_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def _bounded_json(value: dict[str, Any], limit: int = 7000) -> str:
    """JSON for an MLflow tag (values are capped at 8000 characters): long lists are shortened, never the text
    (a cut JSON text could not be read back by a retry)."""
    text = json.dumps(value, default=str)
    for keep in (20, 5, 0):
        if len(text) <= limit:
            return text
        value = {
            k: (v[:keep] + [f"... {len(v) - keep} more"] if isinstance(v, list) and len(v) > keep else v)
            for k, v in value.items()
        }
        text = json.dumps(value, default=str)
    if len(text) > limit:
        text = json.dumps({k: v for k, v in value.items() if not isinstance(v, (list, dict))}, default=str)
    return text
