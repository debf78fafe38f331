"""What the model service tells its operators: JSON log lines, Prometheus metrics, one line per request.

Logs are one JSON object per line on stderr (logger ``model_service``); metrics live in the default
Prometheus registry (its process and GC collectors come with it), scraped at ``GET /metrics``.
``RequestTelemetry`` is the pure ASGI middleware that gives every request its id, its log line and
its count and latency. Only the standard library and ``prometheus_client``: no numpy here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

if TYPE_CHECKING:
    from model_service.app import Service

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# --------------------------------------------------------------------------------------------------
# Logging: one JSON object per line on stderr.
# --------------------------------------------------------------------------------------------------
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def _make_logger() -> logging.Logger:
    logger = logging.getLogger("model_service")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


log = _make_logger()


def log_event(level: int, event: str, **fields: Any) -> None:
    """One JSON line: ``event`` plus ``fields`` as top-level keys."""
    log.log(level, event, extra={"fields": fields})


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a log field or an error message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


# --------------------------------------------------------------------------------------------------
# Metrics (Prometheus, default registry: process and GC collectors come with it).
# --------------------------------------------------------------------------------------------------
disable_created_metrics()  # no *_created series: they double the scrape for nothing a dashboard uses
REQUESTS = Counter(
    "model_service_requests",
    "HTTP requests by route, method and status",
    ["route", "method", "status", "model_version"],
)
LATENCY = Histogram(
    "model_service_request_duration_seconds",
    "HTTP request latency by route, method and status",
    ["route", "method", "status", "model_version"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
ROWS = Counter("model_service_predicted_rows", "Rows scored", ["model_version"])
BATCH_ROWS = Histogram(
    "model_service_model_call_rows",
    "Rows per model call (concurrent requests are scored together)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000),
)
MODEL_INFO = Gauge(
    "model_service_model_info",
    "The model version this process serves (value 1)",
    ["model_line", "model_name", "model_version", "run_id", "code_revision"],
)
LOG_WRITTEN = Gauge("model_service_prediction_log_written_rows", "Rows written to the prediction log")
LOG_DROPPED = Gauge("model_service_prediction_log_dropped_rows", "Rows not logged because the log fell behind")
LOG_PRUNED = Gauge(
    "model_service_prediction_log_pruned_rows",
    "Logged rows deleted unshipped to keep PREDICTION_LOG_DIR within PREDICTION_LOG_MAX_MB and _MAX_AGE_HOURS",
)


# --------------------------------------------------------------------------------------------------
# Per-request telemetry.
# --------------------------------------------------------------------------------------------------
class RequestTelemetry:
    """Pure ASGI middleware: request id, one JSON log line, count and latency per route and status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            service: Service | None = getattr(scope["app"].state, "service", None) if "app" in scope else None
            version = service.settings.model_version if service else ""
            REQUESTS.labels(route, scope["method"], status, version).inc()
            LATENCY.labels(route, scope["method"], status, version).observe(elapsed)
            if route != "/metrics":
                log_event(
                    logging.INFO if status < 500 else logging.ERROR,
                    "request",
                    request_id=request_id,
                    method=scope["method"],
                    route=route,
                    status=status,
                    latency_ms=round(elapsed * 1000, 2),
                    model_version=version or None,
                    rows=scope["state"].get("rows"),
                )


def _request_id(scope: dict[str, Any]) -> str:
    """The caller's ``X-Request-ID`` if it is a sane token, else a fresh one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex
