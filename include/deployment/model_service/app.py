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
naming the row and field, never a 500), ``GET /metrics`` (Prometheus).

Speed: concurrent requests are scored together (``MicroBatcher``): while the model is busy with one
call, requests that arrive queue up and go into the next call as one frame. A scikit-learn pipeline
costs nearly the same for 1 row as for 100, so throughput grows with load while latency stays about
two model calls at most. Prediction logging happens in a background thread (``PredictionLog``).
"""

from __future__ import annotations

import os

# One model thread per process; pods scale out instead. Must be set before numpy/sklearn load OpenMP.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import AsyncIterator, Callable, Mapping  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fastapi import FastAPI, HTTPException, Request, Response  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from model_service.compiled import CompiledModel, compile_model  # noqa: E402
from model_service.package import (  # noqa: E402
    ModelOutputError,
    Package,
    PackageError,
    golden_mismatches,
    open_package,
    to_floats,
)
from model_service.prediction_log import PredictionLog  # noqa: E402

REQUIRED_ENV = ("MODEL_DIR", "MODEL_LINE", "MODEL_NAME", "MODEL_VERSION")
MAX_ROWS = 10_000
MAX_BODY_BYTES = 32 * 1024 * 1024  # 10,000 wide rows fit; a bigger body is refused before it is held in memory
MAX_REPORTED_ERRORS = 50
INLINE_ROWS = 32  # compiled calls up to this many rows run in the event loop (~0.5 ms for 300 trees)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_INT_BOUNDS = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_NUMPY_DTYPES = {"integer": "int32", "long": "int64", "float": "float32", "double": "float64", "boolean": "bool"}
_FLOAT_MAX = {"double": float(np.finfo(np.float64).max), "float": float(np.finfo(np.float32).max)}


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


def _log(level: int, event: str, **fields: Any) -> None:
    log.log(level, event, extra={"fields": fields})


def _one_line(exc: BaseException) -> str:
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
    "model_service_prediction_log_pruned_rows", "Logged rows deleted unshipped to keep within PREDICTION_LOG_MAX_MB"
)


# --------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------
class StartupError(RuntimeError):
    """The service cannot serve: bad configuration, a missing or wrong model package, a failing model."""


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    model_line: str
    model_name: str
    model_version: str
    code_revision: str | None
    image_built_at: str | None
    prediction_log_dir: Path | None
    prediction_log_max_mb: int
    max_batch_rows: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in REQUIRED_ENV if not env.get(name, "").strip()]
        if missing:
            raise StartupError(f"missing required environment variable(s): {', '.join(missing)}")
        version = env["MODEL_VERSION"].strip()
        if not version.isdigit():
            raise StartupError(f"MODEL_VERSION must be a registered version number like '3', got {version!r}")
        numbers = {}
        for name, default in (("MAX_BATCH_ROWS", 2 * MAX_ROWS), ("PREDICTION_LOG_MAX_MB", 512)):
            text = env.get(name, "").strip() or str(default)
            if not text.isdigit() or int(text) < 1:
                raise StartupError(f"{name} must be a positive integer, got {text!r}")
            numbers[name] = int(text)
        log_dir = env.get("PREDICTION_LOG_DIR", "").strip()
        return cls(
            model_dir=Path(env["MODEL_DIR"].strip()),
            model_line=env["MODEL_LINE"].strip(),
            model_name=env["MODEL_NAME"].strip(),
            model_version=version,
            code_revision=env.get("CODE_REVISION", "").strip() or None,
            image_built_at=env.get("IMAGE_BUILT_AT", "").strip() or None,
            prediction_log_dir=Path(log_dir) if log_dir else None,
            prediction_log_max_mb=numbers["PREDICTION_LOG_MAX_MB"],
            max_batch_rows=numbers["MAX_BATCH_ROWS"],
        )

    @property
    def pin(self) -> dict[str, str]:
        return {"model_line": self.model_line, "model_name": self.model_name, "model_version": self.model_version}


# --------------------------------------------------------------------------------------------------
# Input validation against the model signature.
# --------------------------------------------------------------------------------------------------
def _error(loc: list[Any], kind: str, msg: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": _json_safe(value)}


def _json_safe(value: Any) -> Any:
    """The offending input as sent, or its repr if the 422 body could not carry it (NaN, Infinity)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return repr(value)
    return value


def parse_body(raw: bytes) -> list[dict[str, Any]]:
    """``{"rows": [{...}, ...]}`` -> the rows, or RequestValidationError in FastAPI's 422 shape."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RequestValidationError([_error([], "json_invalid", f"request body is not valid JSON: {exc}")]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([_error([], "model_type", 'request body must be an object {"rows": [...]}')])
    errors = [_error([key], "extra_forbidden", f"unknown field {key!r}", body[key]) for key in body if key != "rows"]
    rows = body.get("rows")
    if rows is None:
        errors.append(_error(["rows"], "missing", "field 'rows' is required: a list of 1 to 10000 objects"))
    elif not isinstance(rows, list):
        errors.append(_error(["rows"], "list_type", "field 'rows' must be a list of objects"))
    elif not 1 <= len(rows) <= MAX_ROWS:
        errors.append(
            _error(["rows"], "too_short" if not rows else "too_long", f"'rows' must hold 1 to {MAX_ROWS} rows")
        )
    else:
        errors += [
            _error(["rows", i], "dict_type", f"row {i} must be an object", row)
            for i, row in enumerate(rows)
            if not isinstance(row, dict)
        ]
    if errors:
        raise RequestValidationError(errors[:MAX_REPORTED_ERRORS])
    return rows  # type: ignore[return-value]


class RowValidator:
    """Checks rows against a column-based MLflow input schema and builds the model's DataFrame.

    Types outside the simple scalars (arrays, objects, binary) are passed through for the model to
    enforce; with no usable schema every row goes to the model as it is.
    """

    def __init__(self, schema: Any) -> None:
        self.enabled = bool(schema is not None and not schema.is_tensor_spec() and schema.has_input_names())
        self.columns: list[tuple[str, str, bool]] = (
            [(str(spec.name), _type_name(spec.type), spec.required) for spec in schema.inputs] if self.enabled else []
        )
        self._known = {name for name, _, _ in self.columns}

    def check(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        errors: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            if row.keys() - self._known:
                for field in sorted(row.keys() - self._known):
                    errors.append(_error(["rows", i, field], "extra_forbidden", f"row {i}: unknown field {field!r}"))
            for name, dtype, required in self.columns:
                value = row.get(name)
                if value is None:
                    if required:
                        kind = "missing" if name not in row else "null"
                        errors.append(
                            _error(["rows", i, name], "missing", f"row {i}: field {name!r} is {kind} (required)")
                        )
                    continue
                msg = _type_problem(value, dtype)
                if msg:
                    errors.append(_error(["rows", i, name], "type_error", f"row {i}: field {name!r} {msg}", value))
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        if errors:
            raise RequestValidationError(errors[:MAX_REPORTED_ERRORS])

    def column_data(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Column by column, in signature order and dtype (rows were checked before).

        Numbers become numpy arrays of the signature's dtype; a missing optional number becomes NaN
        (as pandas would make it); strings and other types stay lists.
        """
        data: dict[str, Any] = {}
        for name, dtype, _ in self.columns:
            values = [row.get(name) for row in rows]
            numpy_dtype = _NUMPY_DTYPES.get(dtype)
            if numpy_dtype and None not in values:
                data[name] = np.asarray(values, dtype=numpy_dtype)
            elif numpy_dtype and dtype != "boolean":
                data[name] = np.asarray([np.nan if v is None else v for v in values], dtype="float64")
            elif dtype == "datetime":
                data[name] = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601")
            else:
                data[name] = values
        return data

    def frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        if not self.enabled:
            return pd.DataFrame.from_records(rows)
        return pd.DataFrame(self.column_data(rows), copy=False)


def _type_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) and name in (*_NUMPY_DTYPES, "string", "datetime") else "other"


def _type_problem(value: Any, dtype: str) -> str | None:
    """Why ``value`` does not fit the MLflow type ``dtype`` (None when it fits). JSON decides the types."""
    if dtype == "double" or dtype == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {_kind(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        # 1e400 as an integer literal, or 1e39 for float32, would become inf (or fail) in the frame
        return None if abs(value) <= _FLOAT_MAX[dtype] else f"is out of range for {dtype}"
    if dtype == "string":
        return None if isinstance(value, str) else f"must be a string, got {_kind(value)}"
    if dtype in _INT_BOUNDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {_kind(value)}"
        low, high = _INT_BOUNDS[dtype]
        return None if low <= value <= high else f"is out of range for {dtype} ({low}..{high})"
    if dtype == "boolean":
        return None if isinstance(value, bool) else f"must be a boolean, got {_kind(value)}"
    if dtype == "datetime":
        if not isinstance(value, str):
            return f"must be an ISO 8601 date-time string, got {_kind(value)}"
        try:
            pd.to_datetime(value, format="ISO8601")
        except ValueError:
            return "must be an ISO 8601 date-time string"
    return None


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", float: "number", int: "integer"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------------------------------
# The model and the batcher.
# --------------------------------------------------------------------------------------------------
class Model:
    """The loaded model behind one call: rows in, one float per row out.

    A scikit-learn model is called directly with its pyfunc ``predict_fn`` (what ``mlflow.pyfunc``
    would call after its own schema enforcement, which ``RowValidator`` already did), with
    scikit-learn's per-call input checks off: rows are validated and finite. When the pipeline is
    one ``model_service.compiled`` supports, batches up to its ``max_rows_faster`` go through the
    compiled numpy version instead (~0.1 ms instead of ~5 ms for one row of a 300-tree model). Any
    other flavour goes through ``mlflow.pyfunc``. Start-up proves every path used reproduces the
    golden set (``check_golden_set``).
    """

    def __init__(self, package: Package) -> None:
        import mlflow.pyfunc

        self.pyfunc = mlflow.pyfunc.load_model(str(package.model_dir))
        flavors = self.pyfunc.metadata.flavors
        predict_fn = flavors.get("python_function", {}).get("predict_fn", "predict")
        self.validator = RowValidator(self.pyfunc.metadata.get_input_schema())
        self._sklearn_config: Callable[[], Any] = contextlib.nullcontext
        self.compiled: CompiledModel | None = None
        if "sklearn" in flavors:
            import sklearn

            raw = self.pyfunc.get_raw_model()
            self._call = getattr(raw, predict_fn)
            self._sklearn_config = lambda: sklearn.config_context(assume_finite=True, skip_parameter_validation=True)
            self.path = f"scikit-learn {predict_fn}"
            if self.validator.enabled:
                self.compiled, self.not_compiled_because = compile_model(
                    raw, predict_fn, [name for name, _, _ in self.validator.columns]
                )
            else:
                self.not_compiled_because = "the model signature names no input columns"
        else:
            self._call = self.pyfunc.predict
            self.path = "mlflow.pyfunc predict"
            self.not_compiled_because = f"not a scikit-learn model (flavors: {', '.join(sorted(flavors))})"

    def cheap(self, rows: int) -> bool:
        """A call on ``rows`` rows takes well under a millisecond (the compiled path on a small batch)."""
        return self.compiled is not None and rows <= INLINE_ROWS

    def predict(self, rows: list[dict[str, Any]]) -> list[float]:
        if self.compiled is not None and len(rows) <= self.compiled.max_rows_faster:
            return self.predict_compiled(rows)
        return self.predict_model(rows)

    def predict_model(self, rows: list[dict[str, Any]]) -> list[float]:
        frame = self.validator.frame(rows)
        with self._sklearn_config():
            return to_floats(self._call(frame), len(rows))

    def predict_compiled(self, rows: list[dict[str, Any]]) -> list[float]:
        assert self.compiled is not None
        data = self.validator.column_data(rows)
        arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object) for k, v in data.items()}
        return to_floats(self.compiled.predict(arrays), len(rows))


class MicroBatcher:
    """Scores concurrent requests together on one model thread.

    Whenever the model thread is free it takes every queued request (up to ``max_rows`` rows) as one
    call. No timer: an idle service scores a lone request at once. If a combined call fails, each
    request is scored alone so one request's failure never becomes another's.

    Calls that ``inline`` says are cheap (the compiled model on a small batch, well under a
    millisecond) run in the event loop itself: handing them to the model thread cost more than the
    call, and the two threads then took turns on the GIL (single-row p99 6-10 ms at 8 connections).
    Requests that arrive meanwhile wait in their sockets and are batched together next.
    """

    def __init__(
        self,
        predict: Callable[[list[dict[str, Any]]], list[float]],
        max_rows: int,
        inline: Callable[[int], bool] = lambda rows: False,
    ) -> None:
        self._predict = predict
        self._max_rows = max_rows
        self._inline = inline
        self._queue: deque[tuple[list[dict[str, Any]], asyncio.Future[list[float]]]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._worker: asyncio.Task[None] | None = None

    async def predict(self, rows: list[dict[str, Any]]) -> list[float]:
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0][0]) <= self._max_rows):
                rows, future = self._queue.popleft()
                batch.append((rows, future))
                size += len(rows)
            combined = [row for rows, _ in batch for row in rows]
            BATCH_ROWS.observe(size)
            try:
                if self._inline(size):
                    results = self._predict(combined)
                else:
                    results = await loop.run_in_executor(self._executor, self._predict, combined)
            except Exception:
                if len(batch) == 1:
                    _, future = batch[0]
                    if not future.done():
                        future.set_exception(sys.exc_info()[1])  # type: ignore[arg-type]
                    continue
                for rows, future in batch:  # isolate the failing request
                    try:
                        result = await loop.run_in_executor(self._executor, self._predict, rows)
                    except Exception as exc:  # noqa: BLE001 - handed to the request that caused it
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(result)
                continue
            start = 0
            for rows, future in batch:
                if not future.done():
                    future.set_result(results[start : start + len(rows)])
                start += len(rows)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# Start-up.
# --------------------------------------------------------------------------------------------------
@dataclass
class Service:
    settings: Settings
    package: Package
    model: Model
    batcher: MicroBatcher
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
        raise StartupError(f"failed to load {label} from {package.model_dir}: {_one_line(exc)}") from exc
    check_golden_set(model, package, label)
    prediction_log = None
    if settings.prediction_log_dir is not None:
        prediction_log = PredictionLog(
            settings.prediction_log_dir,
            model_line=settings.model_line,
            model_name=settings.model_name,
            model_version=settings.model_version,
            max_bytes=settings.prediction_log_max_mb * 1024 * 1024,
        )
    batcher = MicroBatcher(model.predict, settings.max_batch_rows, inline=model.cheap)
    return Service(settings, package, model, batcher, prediction_log)


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
        raise StartupError(f"{label} failed its warm-up prediction on the golden set: {_one_line(exc)}") from exc
    wrong = golden_mismatches(served, expected)
    if wrong:
        raise StartupError(f"{label}, {wrong[0]}: the serving path ({model.path}) does not reproduce the model")
    if model.compiled is None:
        return
    try:
        wrong = golden_mismatches(model.predict_compiled(rows), expected)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        wrong = [f"fails: {_one_line(exc)}"]
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
        _log(logging.ERROR, "startup_failed", error=str(exc))
        raise StartupError(str(exc)) from None  # uvicorn prints a short traceback and exits with 3
    app.state.service = service
    MODEL_INFO.labels(
        settings.model_line, settings.model_name, settings.model_version, service.run_id, settings.code_revision or ""
    ).set(1)
    service.ready = True
    _log(
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
        if service.prediction_log is not None:
            service.prediction_log.close()
        _log(
            logging.INFO,
            "shutdown_complete",
            prediction_log_written_rows=service.prediction_log.written if service.prediction_log else 0,
            prediction_log_dropped_rows=service.prediction_log.dropped if service.prediction_log else 0,
            prediction_log_pruned_rows=service.prediction_log.pruned if service.prediction_log else 0,
        )


# --------------------------------------------------------------------------------------------------
# HTTP.
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
                _log(
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
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


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


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed MAX_BODY_BYTES."""
    too_large = HTTPException(413, f"request body larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@app.post("/predict", openapi_extra={"requestBody": PREDICT_BODY})
async def predict(request: Request) -> Response:
    """Score rows: ``{"rows": [{feature: value, ...}, ...]}`` -> one prediction per row."""
    service = _service(request)
    body = await _body(request)
    rows = parse_body(body)
    request.state.rows = len(rows)
    service.model.validator.check(rows)
    try:
        predictions = await service.batcher.predict(rows)
    except ModelOutputError as exc:
        _log(logging.ERROR, "predict_failed", error=str(exc), model_version=service.settings.model_version)
        return _json({"detail": str(exc)}, 500)
    except Exception as exc:
        _log(logging.ERROR, "predict_failed", error=_one_line(exc), model_version=service.settings.model_version)
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
