"""Input validation of ``POST /predict``: the body's shape, then every row against the model signature.

Bad input is a ``RequestValidationError`` in FastAPI's 422 shape naming the row and field (at most
``MAX_REPORTED_ERRORS`` of them), never a 500 from deep inside the model. ``RowValidator`` also turns
the checked rows into the model's input, column by column in the signature's dtypes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from fastapi.exceptions import RequestValidationError

from model_service.settings import MAX_ROWS

MAX_REPORTED_ERRORS = 50

_INT_BOUNDS = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_NUMPY_DTYPES = {"integer": "int32", "long": "int64", "float": "float32", "double": "float64", "boolean": "bool"}
_FLOAT_MAX = {"double": float(np.finfo(np.float64).max), "float": float(np.finfo(np.float32).max)}


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
