"""Alerts to a line's owners: the local sink (a JSON-lines file) and e-mail through the SMTP provider's
notifier over an Airflow connection, received by a real SMTP server on loopback."""

from __future__ import annotations

import asyncore
import json
import threading
import warnings
from email import message_from_bytes
from pathlib import Path

import pytest
import yaml

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import smtpd  # the standard library's SMTP server (Python 3.11)

from mlops_lifecycle import paths
from mlops_lifecycle.config import load_model_line
from mlops_lifecycle.notify import LineAlert, local_alerts_file

BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())


def config(tmp_path: Path, **alerting):  # noqa: ANN003, ANN201
    data = BASE | {"alerting": BASE["alerting"] | alerting}
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_model_line(path)


class Inbox(smtpd.SMTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), None, decode_data=False)
        self.port = self.socket.getsockname()[1]
        self.messages: list[tuple[str, list[str], bytes]] = []

    def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.messages.append((mailfrom, rcpttos, data))


@pytest.fixture
def inbox(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    server = Inbox()
    thread = threading.Thread(target=asyncore.loop, kwargs={"timeout": 0.05}, daemon=True)
    thread.start()
    connection = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": server.port,
        "extra": {"from_email": "airflow@example.com", "disable_ssl": True, "disable_tls": True},
    }
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", json.dumps(connection))
    yield server
    server.close()


def alert(cfg) -> LineAlert:  # noqa: ANN001
    return LineAlert(
        cfg,
        kind="drift_breach",
        subject="drift breach in production, 2026-12-01",
        body="v2: price: psi 2.69 >= 0.2\nDrift reports: http://mlflow/#/experiments/1/runs/abc",
        record={"summary": "v2: price: psi 2.69 >= 0.2"},
    )


def test_without_an_smtp_connection_the_alert_is_a_local_record(tmp_path):
    cfg = config(tmp_path)
    target = local_alerts_file(cfg.model_line)
    before = target.read_text().splitlines() if target.exists() else []
    alert(cfg).notify({})
    [record] = [json.loads(x) for x in target.read_text().splitlines()[len(before) :]]
    assert record["kind"] == "drift_breach" and record["channel"] == "local"
    assert record["to"] == ["forecasting-oncall@example.com"] and record["summary"].startswith("v2: price")


def test_with_an_smtp_connection_the_owners_get_an_email(tmp_path, inbox):
    cfg = config(tmp_path, smtp_conn_id="smtp_alerts")
    target = local_alerts_file(cfg.model_line)
    before = target.read_text() if target.exists() else ""
    alert(cfg).notify({})
    [(sender, to, data)] = inbox.messages
    message = message_from_bytes(data)
    assert sender == "airflow@example.com" and to == ["forecasting-oncall@example.com"]
    assert message["Subject"] == "[demand_forecast] drift breach in production, 2026-12-01"
    body = "".join(part.get_payload(decode=True).decode() for part in message.walk() if not part.is_multipart())
    assert "v2: price: psi 2.69 &gt;= 0.2" in body and "runs/abc" in body
    assert (target.read_text() if target.exists() else "") == before  # mailed, not also filed locally
