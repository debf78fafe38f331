"""The model microservice: serves the one model version baked into its image, fast, and says what it is.

Run it (the image's CMD; the local deploy adapter runs the same command as a process)::

    uvicorn model_service.app:app --host 0.0.0.0 --port 8080 --timeout-graceful-shutdown 20

Start-up opens the model package at ``MODEL_DIR`` (no registry call), checks it holds the pinned
version and that its files match their checksums, loads the model and scores the package's golden
set through the serving path: predictions that differ from the offline ones stop the start. Any
failure logs one ``startup_failed`` JSON line naming the cause and the process exits non-zero, so a
deployment never stays up serving nothing or the wrong thing. The port opens only after that.

Endpoints: ``GET /health`` (liveness), ``GET /ready`` (model loaded and warmed), ``GET /version``,
``POST /predict`` (one row or a batch, validated against the model signature: bad input is a 422
naming the row and field, never a 500; with ``MODEL_SERVICE_TOKEN`` set it requires that bearer
token), ``GET /metrics`` (Prometheus).

Speed: concurrent requests are scored together (``MicroBatcher``): while the model is busy with one
call, requests that arrive queue up and go into the next call as one frame. A scikit-learn pipeline
costs nearly the same for 1 row as for 100, so throughput grows with load while latency stays about
two model calls at most. Prediction logging happens in a background thread (``PredictionLog``).

This module is the start-up and the routes; the rest of the service is split by concern:
``settings`` (environment and limits), ``telemetry`` (JSON logs, metrics, the per-request
middleware), ``auth`` (the bearer token), ``validation`` (body and rows against the signature, big
bodies off the event loop), ``scoring`` (``Model``, ``MicroBatcher``). ``_threads`` is imported
first: it sets ``OMP_NUM_THREADS`` before numpy loads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import model_service._threads  # noqa: F401 - first of the package's modules, before anything loads numpy
from model_service.auth import BearerAuth
from model_service.package import ModelOutputError, Package, PackageError, golden_mismatches, open_package
from model_service.prediction_log import PredictionLog
from model_service.scoring import MicroBatcher, Model
from model_service.settings import MAX_BODY_BYTES, MAX_ROWS, Settings, StartupError
from model_service.telemetry import (
    LOG_DROPPED,
    LOG_PRUNED,
    LOG_WRITTEN,
    MODEL_INFO,
    ROWS,
    RequestTelemetry,
    log_event,
    one_line,
)
from model_service.validation import BodyReader


# --------------------------------------------------------------------------------------------------
# Start-up.
# --------------------------------------------------------------------------------------------------
@dataclass
class Service:
    settings: Settings
    package: Package
    model: Model
    batcher: MicroBatcher
    reader: BodyReader
    auth: BearerAuth | None
    prediction_log: PredictionLog | None
    ready: bool = False

    @property
    def run_id(self) -> str:
        return self.package.pin.run_id


def load_service(settings: Settings) -> Service:
    """Open and verify the package, load the model, check the golden set; raise StartupError naming the cause."""
    try:
        package = open_package(settings.model_dir, expected=settings.pin)
    except PackageError as exc:
        raise StartupError(str(exc)) from None
    label = f"{settings.model_name} v{settings.model_version}"
    try:
        model = Model(package)
    except Exception as exc:
        raise StartupError(f"failed to load {label} from {package.model_dir}: {one_line(exc)}") from exc
    check_golden_set(model, package, label)
    prediction_log = None
    if settings.prediction_log_dir is not None:
        prediction_log = PredictionLog(
            settings.prediction_log_dir,
            model_line=settings.model_line,
            model_name=settings.model_name,
            model_version=settings.model_version,
            max_bytes=settings.prediction_log_max_mb * 1024 * 1024,
            max_age_seconds=(
                settings.prediction_log_max_age_hours * 3600 if settings.prediction_log_max_age_hours else None
            ),
        )
    batcher = MicroBatcher(model.predict, settings.max_batch_rows, inline=model.cheap)
    auth = BearerAuth(settings.predict_token) if settings.predict_token else None
    return Service(settings, package, model, batcher, BodyReader(model.validator), auth, prediction_log)


def check_golden_set(model: Model, package: Package, label: str) -> None:
    """Warm the model on the golden set and insist on the offline predictions, on every serving path.

    The model's own path must reproduce them or the service does not start; a compiled path that
    does not is switched off (logged), and the service serves through the model's own path.
    """
    golden = package.golden_set
    rows, expected = golden["rows"], golden["predictions"]
    try:
        model.validator.check(rows)
    except RequestValidationError as exc:
        raise StartupError(f"{label}: the golden set does not fit the model signature: {exc.errors()[:3]}") from None
    try:
        served = model.predict_model(rows)
    except Exception as exc:
        raise StartupError(f"{label} failed its warm-up prediction on the golden set: {one_line(exc)}") from exc
    wrong = golden_mismatches(served, expected)
    if wrong:
        raise StartupError(f"{label}, {wrong[0]}: the serving path ({model.path}) does not reproduce the model")
    if model.compiled is None:
        return
    try:
        wrong = golden_mismatches(model.predict_compiled(rows), expected)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        wrong = [f"fails: {one_line(exc)}"]
    if wrong:
        model.not_compiled_because = f"the compiled path differs, {wrong[0]}"
        model.compiled = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    logging.getLogger("uvicorn.access").disabled = True  # our own request lines replace it
    started = time.perf_counter()
    try:
        settings = Settings.from_env(os.environ)
        service = load_service(settings)
    except StartupError as exc:
        log_event(logging.ERROR, "startup_failed", error=str(exc))
        raise StartupError(str(exc)) from None  # uvicorn prints a short traceback and exits with 3
    app.state.service = service
    MODEL_INFO.labels(
        settings.model_line, settings.model_name, settings.model_version, service.run_id, settings.code_revision or ""
    ).set(1)
    service.ready = True
    log_event(
        logging.INFO,
        "model_loaded",
        **settings.pin,
        run_id=service.run_id,
        code_revision=settings.code_revision,
        image_built_at=settings.image_built_at,
        model_dir=str(settings.model_dir),
        serving_path=service.model.path,
        compiled=service.model.compiled.description if service.model.compiled else None,
        compiled_up_to_rows=service.model.compiled.max_rows_faster if service.model.compiled else None,
        not_compiled_because=None if service.model.compiled else service.model.not_compiled_because,
        schema_validation=service.model.validator.enabled,
        predict_auth="bearer token" if service.auth else None,
        golden_rows=len(service.package.golden_set["rows"]),
        prediction_log=str(settings.prediction_log_dir) if settings.prediction_log_dir else None,
        startup_s=round(time.perf_counter() - started, 2),
    )
    try:
        yield
    finally:
        # Uvicorn has stopped accepting connections and finished the in-flight requests by now.
        service.ready = False
        service.batcher.close()
        service.reader.close()
        if service.prediction_log is not None:
            service.prediction_log.close()
        log_event(
            logging.INFO,
            "shutdown_complete",
            prediction_log_written_rows=service.prediction_log.written if service.prediction_log else 0,
            prediction_log_dropped_rows=service.prediction_log.dropped if service.prediction_log else 0,
            prediction_log_pruned_rows=service.prediction_log.pruned if service.prediction_log else 0,
        )


# --------------------------------------------------------------------------------------------------
# HTTP.
# --------------------------------------------------------------------------------------------------
app = FastAPI(title="model service", lifespan=lifespan)
app.add_middleware(RequestTelemetry)


def _service(request: Request) -> Service:
    return request.app.state.service


def _json(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(content, allow_nan=False), status_code=status, media_type="application/json")


@app.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers (the port opens only once the model is loaded)."""
    return {"status": "ok"}


@app.get("/ready")
def ready(request: Request) -> Response:
    """Readiness: the model is loaded and has reproduced its golden set."""
    service = _service(request)
    if not service.ready:
        return _json({"status": "not ready"}, 503)
    return _json({"status": "ready", "model_version": service.settings.model_version})


@app.get("/version")
def version(request: Request) -> dict[str, Any]:
    """What this process serves: the lifecycle's verify step and the smoke tests compare it with the pin."""
    service = _service(request)
    s = service.settings
    return {
        **s.pin,
        "run_id": service.run_id,
        "code_revision": s.code_revision,
        "image_built_at": s.image_built_at,
        "packaged_at": service.package.manifest.get("packaged_at"),
    }


@app.get("/metrics")
def metrics() -> Response:
    service = getattr(app.state, "service", None)
    if service is not None and service.prediction_log is not None:
        LOG_WRITTEN.set(service.prediction_log.written)
        LOG_DROPPED.set(service.prediction_log.dropped)
        LOG_PRUNED.set(service.prediction_log.pruned)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["rows"],
                "additionalProperties": False,
                "properties": {
                    "rows": {"type": "array", "minItems": 1, "maxItems": MAX_ROWS, "items": {"type": "object"}}
                },
            }
        }
    },
}


async def _body(request: Request) -> bytearray:
    """The request body, refused with 413 as soon as it is known to exceed MAX_BODY_BYTES.

    Gathered in one growing buffer rather than chunks joined at the end: a 32 MiB body is never held
    twice, nor copied in one piece inside the event loop.
    """
    too_large = HTTPException(413, f"request body larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return body


@app.post("/predict", openapi_extra={"requestBody": PREDICT_BODY})
async def predict(request: Request) -> Response:
    """Score rows: ``{"rows": [{feature: value, ...}, ...]}`` -> one prediction per row."""
    service = _service(request)
    if service.auth is not None:
        service.auth.check(request.headers.get("authorization"))
    body = await _body(request)
    rows = await service.reader.rows(body)
    request.state.rows = len(rows)
    try:
        predictions = await service.batcher.predict(rows)
    except ModelOutputError as exc:
        log_event(logging.ERROR, "predict_failed", error=str(exc), model_version=service.settings.model_version)
        return _json({"detail": str(exc)}, 500)
    except Exception as exc:
        log_event(logging.ERROR, "predict_failed", error=one_line(exc), model_version=service.settings.model_version)
        return _json({"detail": f"prediction failed: {type(exc).__name__}"}, 500)
    request_id = request.state.request_id
    ROWS.labels(service.settings.model_version).inc(len(rows))
    if service.prediction_log is not None:
        service.prediction_log.record(request_id, body, predictions)
    return _json(
        {
            "model_name": service.settings.model_name,
            "model_version": service.settings.model_version,
            "request_id": request_id,
            "predictions": predictions,
        }
    )
