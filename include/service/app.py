"""Minimal model microservice: serve one registered MLflow model version over HTTP.

The lifecycle's local deploy adapter starts it as its own process::

    python -m uvicorn app:app --app-dir include/service --host 127.0.0.1 --port PORT

Configuration comes from the environment only (see ``Settings.from_env``). The model is loaded, its
registry entry resolved and a warm-up prediction made before the server accepts connections; any
failure there logs one ``startup_failed`` JSON line naming the cause and the process exits non-zero,
so a deployment never stays up serving nothing.

Endpoints: ``GET /health``, ``GET /version`` (what the lifecycle's verify step reads) and
``POST /predict`` (rows validated against the model signature: bad input is a 422, never a 500).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types.schema import DataType, Schema
from pydantic import BaseModel, ConfigDict, Field

REQUIRED_ENV = ("MODEL_LINE", "MODEL_NAME", "MODEL_VERSION", "MLFLOW_TRACKING_URI")
MAX_ROWS = 10_000
MAX_REPORTED_ERRORS = 50

_INT_BOUNDS = {DataType.integer: (-(2**31), 2**31 - 1), DataType.long: (-(2**63), 2**63 - 1)}
_PANDAS_DTYPES = {
    DataType.integer: "int32",
    DataType.long: "int64",
    DataType.float: "float32",
    DataType.double: "float64",
    DataType.boolean: "bool",
}


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
    logger = logging.getLogger("mlops_service")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


log = _make_logger()


def _log(level: int, event: str, **fields: Any) -> None:
    log.log(level, event, extra={"fields": fields})


# --------------------------------------------------------------------------------------------------
# Configuration and start-up.
# --------------------------------------------------------------------------------------------------
class StartupError(RuntimeError):
    """The service cannot serve: bad configuration, unknown model version, or a model that fails."""


@dataclass(frozen=True)
class Settings:
    model_line: str
    model_name: str
    model_version: str
    tracking_uri: str
    model_uri: str
    service_revision: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in REQUIRED_ENV if not env.get(name, "").strip()]
        if missing:
            raise StartupError(f"missing required environment variable(s): {', '.join(missing)}")
        name, version = env["MODEL_NAME"].strip(), env["MODEL_VERSION"].strip()
        if not version.isdigit():
            raise StartupError(f"MODEL_VERSION must be a registered version number like '3', got {version!r}")
        return cls(
            model_line=env["MODEL_LINE"].strip(),
            model_name=name,
            model_version=version,
            tracking_uri=env["MLFLOW_TRACKING_URI"].strip(),
            model_uri=env.get("MODEL_URI", "").strip() or f"models:/{name}/{version}",
            service_revision=env.get("SERVICE_REVISION", "").strip() or None,
        )


def _redact(uri: str) -> str:
    """Drop user:password from a URI before it goes into a log line or an error message."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


@dataclass(frozen=True)
class ServiceState:
    settings: Settings
    run_id: str | None
    model: Any  # mlflow.pyfunc.PyFuncModel
    validator: RowValidator


def load_service(settings: Settings) -> ServiceState:
    """Resolve the registry entry, load the model and warm it; raise StartupError naming the cause."""
    uri = settings.tracking_uri
    where = _redact(uri)
    if uri.startswith("sqlite:///"):
        # Guard: an MLflow client pointed at a missing sqlite file silently creates an empty store.
        path = uri.removeprefix("sqlite:///")
        if path != ":memory:" and not os.path.exists(path):
            raise StartupError(f"MLFLOW_TRACKING_URI points at a sqlite file that does not exist: {path}")

    label = f"model {settings.model_name!r} version {settings.model_version}"
    try:
        model_version = MlflowClient(tracking_uri=uri).get_model_version(settings.model_name, settings.model_version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise StartupError(f"{label} is not registered in the MLflow registry at {where}") from exc
        raise StartupError(f"could not look up {label} in the MLflow registry at {where}: {_one_line(exc)}") from exc
    except Exception as exc:
        raise StartupError(f"could not look up {label} in the MLflow registry at {where}: {_one_line(exc)}") from exc

    try:
        model = mlflow.pyfunc.load_model(settings.model_uri)
    except Exception as exc:
        raise StartupError(f"failed to load {label} from {settings.model_uri}: {_one_line(exc)}") from exc

    validator = RowValidator(model.metadata.get_input_schema())
    example = model.input_example
    if example is not None:
        try:
            model.predict(example)
        except Exception as exc:
            raise StartupError(
                f"{label} failed its warm-up prediction on its own input example: {_one_line(exc)}"
            ) from exc
    return ServiceState(settings=settings, run_id=model_version.run_id, model=model, validator=validator)


# --------------------------------------------------------------------------------------------------
# Input validation against the model signature.
# --------------------------------------------------------------------------------------------------
class RowValidator:
    """Checks request rows against a column-based MLflow input schema and builds the DataFrame.

    Errors use FastAPI's 422 shape: ``{"loc": ["body", "rows", i, field], "msg": ..., "type": ...}``.
    Types outside the simple scalars (arrays, objects, binary) are passed through for MLflow to enforce.
    """

    def __init__(self, schema: Schema | None) -> None:
        self.enabled = bool(schema is not None and not schema.is_tensor_spec() and schema.has_input_names())
        self.columns: list[tuple[str, Any, bool]] = (
            [(str(spec.name), spec.type, spec.required) for spec in schema.inputs] if self.enabled else []
        )
        self._known = {name for name, _, _ in self.columns}

    def to_frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        if not self.enabled:
            return pd.DataFrame.from_records(rows)
        errors: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            for field in sorted(row.keys() - self._known):
                errors.append(_error(i, field, "extra_forbidden", f"unknown field {field!r}", row[field]))
            for name, dtype, required in self.columns:
                if name not in row or row[name] is None:
                    if required:
                        kind = "missing" if name not in row else "null"
                        errors.append(_error(i, name, "missing", f"field {name!r} is {kind} (required)", None))
                    continue
                msg = _type_problem(row[name], dtype)
                if msg:
                    errors.append(_error(i, name, "type_error", f"field {name!r} {msg}", row[name]))
        if errors:
            raise RequestValidationError(errors[:MAX_REPORTED_ERRORS])
        names = [name for name, _, _ in self.columns]
        frame = pd.DataFrame.from_records([{n: row.get(n) for n in names} for row in rows], columns=names)
        for name, dtype, _ in self.columns:
            if not isinstance(dtype, DataType):
                continue
            try:
                if dtype in _PANDAS_DTYPES and frame[name].notna().all():
                    frame[name] = frame[name].astype(_PANDAS_DTYPES[dtype])
                elif dtype == DataType.datetime:
                    frame[name] = pd.to_datetime(frame[name], format="ISO8601")
            except (TypeError, ValueError) as exc:  # e.g. mixed time zones across rows
                msg = f"field {name!r} cannot be read as {dtype.name}: {_one_line(exc)}"
                raise RequestValidationError(
                    [{"type": "type_error", "loc": ["body", "rows", name], "msg": msg, "input": None}]
                ) from exc
        return frame


def _error(row: int, field: str, kind: str, msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", "rows", row, field], "msg": f"row {row}: {msg}", "input": value}


def _type_problem(value: Any, dtype: Any) -> str | None:
    """Why ``value`` does not fit the MLflow ``dtype`` (None when it fits). JSON decides the types."""
    if not isinstance(dtype, DataType):  # Array, Object, Map, Any: left to MLflow's own enforcement
        return None
    if dtype == DataType.string:
        return None if isinstance(value, str) else f"must be a string, got {type(value).__name__}"
    if dtype == DataType.boolean:
        return None if isinstance(value, bool) else f"must be a boolean, got {type(value).__name__}"
    if dtype in _INT_BOUNDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {type(value).__name__}"
        low, high = _INT_BOUNDS[dtype]
        return None if low <= value <= high else f"is out of range for {dtype.name} ({low}..{high})"
    if dtype in (DataType.float, DataType.double):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {type(value).__name__}"
        return None if math.isfinite(value) else "must be a finite number"
    if dtype == DataType.datetime:
        if not isinstance(value, str):
            return f"must be an ISO 8601 date-time string, got {type(value).__name__}"
        try:
            pd.to_datetime(value, format="ISO8601")
        except ValueError:
            return "must be an ISO 8601 date-time string"
        return None
    return None


def _to_floats(raw: Any, n_rows: int) -> list[float]:
    """Model output as one finite float per row, or ValueError saying what the model returned."""
    values = raw.to_numpy() if isinstance(raw, pd.DataFrame | pd.Series) else np.asarray(raw)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.shape[0] != n_rows:
        raise ValueError(f"model returned output of shape {values.shape}, expected ({n_rows},)")
    try:
        floats = values.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model output is not numeric ({values.dtype}): {exc}") from exc
    if not np.isfinite(floats).all():
        raise ValueError(f"model returned a non-finite prediction at row {int(np.argmin(np.isfinite(floats)))}")
    return floats.tolist()


# --------------------------------------------------------------------------------------------------
# The application.
# --------------------------------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ROWS)


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[float]


class VersionResponse(BaseModel):
    model_line: str
    model_name: str
    model_version: str
    run_id: str | None
    service_revision: str | None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Our middleware writes one JSON line per request; uvicorn's plain-text access log would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
    started = time.perf_counter()
    try:
        settings = Settings.from_env(os.environ)
        state = load_service(settings)
    except StartupError as exc:
        _log(logging.ERROR, "startup_failed", error=str(exc))
        # Uvicorn prints the traceback and exits with status 3; ``from None`` keeps that short.
        raise StartupError(str(exc)) from None
    app.state.service = state
    _log(
        logging.INFO,
        "model_loaded",
        model_line=settings.model_line,
        model_name=settings.model_name,
        model_version=settings.model_version,
        model_uri=settings.model_uri,
        run_id=state.run_id,
        tracking_uri=_redact(settings.tracking_uri),
        service_revision=settings.service_revision,
        schema_validation=state.validator.enabled,
        startup_s=round(time.perf_counter() - started, 2),
    )
    yield


app = FastAPI(title="model service", lifespan=lifespan)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


@app.middleware("http")
async def log_requests(request: Request, call_next: Any) -> Response:
    started = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        state: ServiceState | None = getattr(request.app.state, "service", None)
        _log(
            logging.INFO if status < 500 else logging.ERROR,
            "request",
            method=request.method,
            route=getattr(route, "path", request.url.path),
            status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            model_version=state.settings.model_version if state else None,
            rows=getattr(request.state, "rows", None),
        )


@app.get("/health")
def health(request: Request) -> dict[str, str]:
    _state(request)  # present once the lifespan loaded the model; the port is not open before that
    return {"status": "ok"}


@app.get("/version", response_model=VersionResponse)
def version(request: Request) -> VersionResponse:
    s = _state(request)
    return VersionResponse(
        model_line=s.settings.model_line,
        model_name=s.settings.model_name,
        model_version=s.settings.model_version,
        run_id=s.run_id,
        service_revision=s.settings.service_revision,
    )


@app.post("/predict", response_model=PredictResponse)
def predict(body: PredictRequest, request: Request) -> PredictResponse | JSONResponse:
    # A plain ``def``: FastAPI runs it in its thread pool, so a slow model never blocks /health.
    s = _state(request)
    request.state.rows = len(body.rows)
    frame = s.validator.to_frame(body.rows)
    try:
        raw = s.model.predict(frame)
    except MlflowException as exc:  # MLflow's own schema enforcement: still the caller's input
        raise RequestValidationError(
            [{"type": "schema", "loc": ["body", "rows"], "msg": _one_line(exc), "input": None}]
        ) from exc
    except Exception as exc:
        _log(logging.ERROR, "predict_failed", error=_one_line(exc), model_version=s.settings.model_version)
        return JSONResponse(status_code=500, content={"detail": f"prediction failed: {type(exc).__name__}"})
    try:
        predictions = _to_floats(raw, len(body.rows))
    except ValueError as exc:
        _log(logging.ERROR, "predict_failed", error=str(exc), model_version=s.settings.model_version)
        return JSONResponse(status_code=500, content={"detail": str(exc)})
    return PredictResponse(
        model_name=s.settings.model_name, model_version=s.settings.model_version, predictions=predictions
    )
