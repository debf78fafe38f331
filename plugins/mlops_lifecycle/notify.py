"""Alerts to a model line's owners, through an Airflow notifier.

With ``alerting.smtp_conn_id`` set, an alert is an e-mail to ``alerting.emails`` sent by the SMTP
provider's notifier over that connection (host, port, login and password live in the connection or a
secrets backend, never in the YAML). Without it (the embedded local adapter, as every external system
here has one) the alert is appended to ``.local/alerts/<line>.jsonl``, where the demo and the tests
read it. Either way the alert is one JSON-able record: what happened, to whom, and the link to act on.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from mlops_lifecycle import paths

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.config import ModelLineConfig


def local_alerts_file(model_line: str) -> Any:
    return paths.local_home() / "alerts" / f"{model_line}.jsonl"


class LineAlert(BaseNotifier):
    """One alert to the line's owners: ``subject`` and ``body`` as text, ``record`` the facts (JSON-able)."""

    template_fields = ("subject", "body")

    def __init__(self, config: ModelLineConfig, *, kind: str, subject: str, body: str, record: dict[str, Any]):
        super().__init__()
        self.model_line = config.model_line
        self.team = config.owner.team
        self.emails = list(config.alerting.emails)
        self.smtp_conn_id = config.alerting.smtp_conn_id
        self.kind, self.subject, self.body, self.record = kind, subject, body, record

    def full_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_line": self.model_line,
            "team": self.team,
            "to": self.emails,
            "subject": self.subject,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "channel": "smtp" if self.smtp_conn_id else "local",
            **self.record,
        }

    def notify(self, context: Context) -> None:
        record = self.full_record()
        if self.smtp_conn_id and self.emails:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            SmtpNotifier(
                to=self.emails,
                subject=f"[{self.model_line}] {self.subject}",
                html_content=f"<pre>{html.escape(self.body)}</pre>",
                smtp_conn_id=self.smtp_conn_id,
            ).notify(context)
            return
        target = local_alerts_file(self.model_line)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


class FailureAlert:
    """``on_failure_callback``: a task of the line failed; tell its owners which, in which run, and why."""

    def __init__(self, config: ModelLineConfig) -> None:
        self.config = config

    def __call__(self, context: Context) -> None:
        ti = context["ti"]
        exc = context.get("exception")
        error = f"{type(exc).__name__}: {exc}" if exc else "unknown"
        LineAlert(
            self.config,
            kind="task_failed",
            subject=f"{ti.dag_id}: task {ti.task_id} failed",
            body=f"Run {ti.run_id}, task {ti.task_id}, try {getattr(ti, 'try_number', '?')}:\n{error}",
            record={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "error": error},
        ).notify(context)
