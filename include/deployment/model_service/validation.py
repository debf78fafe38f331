"""Input validation of ``POST /predict``: the body's encoding and shape, then every row against the model signature.

Bad input is a ``RequestValidationError`` in FastAPI's 422 shape naming the row and field (at most
``MAX_REPORTED_ERRORS`` of them), never a 500 from deep inside the model. ``RowValidator`` also turns
the checked rows into the model's input, column by column in the signature's dtypes.

Hostile bodies cost bounded work. Parsing JSON makes a Python object of every value (30 to 80 bytes
for a value of 2 to 4 bytes), so ``BodyReader`` refuses a body with more values than the model could
take before parsing it; each JSON object is checked as it is parsed (no more keys than a row has
fields, no key twice); errors stop at ``MAX_REPORTED_ERRORS``. Bodies above ``INLINE_BODY_BYTES`` are
read on a thread of their own, so the event loop keeps answering other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from model_service.settings import MAX_ROWS

MAX_REPORTED_ERRORS = 50
INLINE_BODY_BYTES = 64 * 1024  # read in the event loop: well under a millisecond, hostile or not
UNTYPED_MAX_VALUES = 1_000_000  # values in a body for a model whose columns are not all scalars
COUNT_CHUNK_BYTES = 1024 * 1024  # counted at a time, so that other threads get the GIL in between
MAX_ECHOED_CHARS = 100  # of an offending string in a 422 (the whole value could be megabytes)

_INT_BOUNDS = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_NUMPY_DTYPES = {"integer": "int32", "long": "int64", "float": "float32", "double": "float64", "boolean": "bool"}
_FLOAT_MAX = {"double": float(np.finfo(np.float64).max), "float": float(np.finfo(np.float32).max)}


def _error(loc: list[Any], kind: str, msg: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": _echo(value)}


def _echo(value: Any) -> Any:
    """The offending input as a 422 can carry it: scalars as sent (NaN and Infinity as their repr, long
    strings cut), arrays and objects by their size only (they may hold most of a 32 MiB body)."""
    if isinstance(value, list | dict):
        return f"{_kind(value)} of {len(value)} {'items' if isinstance(value, list) else 'keys'}"
    if isinstance(value, str) and len(value) > MAX_ECHOED_CHARS:
        return value[:MAX_ECHOED_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class _ObjectTooLarge(Exception):
    def __init__(self, keys: int) -> None:
        self.keys = keys


class BodyReader:
    """The rows of ``POST /predict`` bodies, checked against the model signature (``RowValidator``).

    What a body may hold follows from the signature when every column is a scalar. A row has one key
    per column, so no JSON object may have more than the columns plus ``MAX_REPORTED_ERRORS`` keys
    (the unknown ones are named in the 422), and the body may hold four times the values of
    ``MAX_ROWS`` full rows. Values are counted before parsing as the ',', '[' and '{' of the raw
    text, in strings too: the slack leaves room for such characters in column names and strings.
    A schema with other columns (arrays, objects) or none allows ``UNTYPED_MAX_VALUES`` values and
    objects of any size.

    Big bodies are read by one thread of their own rather than a pool: at most one big body is
    turned into Python objects at any time (memory stays bounded however many arrive at once), and
    the event loop runs in between: the parser calls back into Python for every object, so the GIL
    changes hands, but it builds each object whole first (~30 ms for one of 100k keys).
    """

    def __init__(self, validator: RowValidator) -> None:
        self.validator = validator
        columns = len(validator.columns)
        flat = validator.enabled and all(dtype != "other" for _, dtype, _ in validator.columns)
        self.max_keys = columns + MAX_REPORTED_ERRORS if flat else None
        self.max_values = 4 * MAX_ROWS * (columns + 1) if flat else UNTYPED_MAX_VALUES
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body")

    async def rows(self, raw: bytes | bytearray) -> list[dict[str, Any]]:
        """``read``, in the event loop for a small body, on the body thread for a big one."""
        if len(raw) <= INLINE_BODY_BYTES:
            return self.read(raw)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.read, raw)

    def read(self, raw: bytes | bytearray) -> list[dict[str, Any]]:
        """The checked rows of ``raw``; HTTPException (415, 413) or RequestValidationError (422) otherwise."""
        if len(raw) > self.max_values and _values_exceed(raw, self.max_values):  # a value takes a byte at least
            raise HTTPException(
                413,
                f"request body holds more than {self.max_values:,} JSON values (',', '[' and '{{' counted, "
                "in strings too): send fewer rows per request",
            )
        rows = parse_body(_utf8(raw), self.max_keys)
        self.validator.check(rows)
        return rows

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _values_exceed(raw: bytes | bytearray, limit: int) -> bool:
    """Whether ``raw`` has more than ``limit`` of ',', '[' and '{' (every JSON value after the first of
    an array or object follows a ','), counted a chunk at a time and only as far as needed."""
    values = 0
    for start in range(0, len(raw), COUNT_CHUNK_BYTES):
        end = start + COUNT_CHUNK_BYTES
        values += raw.count(b",", start, end) + raw.count(b"[", start, end) + raw.count(b"{", start, end)
        if values > limit:
            return True
    return False


def _utf8(raw: bytes | bytearray) -> str:
    """The body as text. Only UTF-8 without a byte order mark: ``json.loads`` would also take UTF-16
    and UTF-32 (and UTF-8 with encoded surrogates), and the prediction log keeps the body as sent."""
    encoding = json.detect_encoding(raw)
    if encoding != "utf-8":
        raise HTTPException(
            415, f"request body must be JSON in UTF-8 without a byte order mark; this one is {encoding.upper()}"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            415, f"request body must be JSON in UTF-8; byte {exc.start} ({raw[exc.start]:#04x}) is not valid UTF-8"
        ) from None


def parse_body(text: str, max_keys: int | None) -> list[dict[str, Any]]:
    """``{"rows": [{...}, ...]}`` -> the rows, or RequestValidationError in FastAPI's 422 shape.

    Every JSON object is built by a hook that refuses more than ``max_keys`` keys (None: any number)
    and notes a key that appears twice (``json.loads`` would keep the last silently).
    """
    repeated: list[tuple[dict[str, Any], str]] = []

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if max_keys is not None and len(pairs) > max_keys:
            raise _ObjectTooLarge(len(pairs))
        built = dict(pairs)
        if len(built) < len(pairs) and len(repeated) < MAX_REPORTED_ERRORS:
            repeated.append((built, _first_repeated(pairs)))
        return built

    try:
        body = json.loads(text, object_pairs_hook=build)
    except _ObjectTooLarge as exc:
        msg = f"a JSON object in the request body has {exc.keys} keys, more than a row can have ({max_keys})"
        raise RequestValidationError([_error([], "too_many_keys", msg)]) from None
    except RecursionError:
        msg = "request body is nested too deeply: rows are objects of the model's fields"
        raise RequestValidationError([_error([], "json_invalid", msg)]) from None
    except ValueError as exc:
        raise RequestValidationError([_error([], "json_invalid", f"request body is not valid JSON: {exc}")]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([_error([], "model_type", 'request body must be an object {"rows": [...]}')])
    extra = islice((key for key in body if key != "rows"), MAX_REPORTED_ERRORS)
    errors = [_error([key], "extra_forbidden", f"unknown field {key!r}", body[key]) for key in extra]
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
        not_objects = (i for i, row in enumerate(rows) if not isinstance(row, dict))
        errors += [
            _error(["rows", i], "dict_type", f"row {i} must be an object", rows[i])
            for i in islice(not_objects, MAX_REPORTED_ERRORS)
        ]
    if repeated:  # first: they explain what else is wrong (json.loads kept the last of each)
        errors[:0] = _repeated_keys(repeated, body, rows if isinstance(rows, list) else [])
    if errors:
        raise RequestValidationError(errors[:MAX_REPORTED_ERRORS])
    return rows  # type: ignore[return-value]


def _first_repeated(pairs: list[tuple[str, Any]]) -> str:
    return next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)


def _repeated_keys(repeated: list[tuple[dict[str, Any], str]], body: Any, rows: list[Any]) -> list[dict[str, Any]]:
    """One error per object that has a key twice, naming the row where the object is one."""
    row_of = {id(row): i for i, row in enumerate(rows)}
    errors = []
    for obj, key in repeated:
        if obj is body:
            errors.append(_error([key], "duplicate_key", f"field {key!r} appears more than once"))
        elif id(obj) in row_of:
            i = row_of[id(obj)]
            errors.append(_error(["rows", i, key], "duplicate_key", f"row {i}: field {key!r} appears more than once"))
        else:
            errors.append(_error([], "duplicate_key", f"a nested object has the key {key!r} more than once"))
    return errors


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
            if not row.keys() <= self._known:
                unknown = (field for field in row if field not in self._known)
                for field in islice(unknown, MAX_REPORTED_ERRORS - len(errors)):
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
