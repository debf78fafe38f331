"""Served rows for drift monitoring, local adapter: the model service's prediction log as one parquet snapshot.

The service writes one JSON line per request (``include/deployment/model_service/prediction_log.py``)::

    <directory>/<model_line>/v<model_version>/<YYYY-MM-DD>/<host>-<pid>-<start>-<n>.jsonl
    {"ts": "2026-11-29T10:00:00.123Z", "request_id": "...", "model_line": "...", "model_name": "...",
     "model_version": "3", "rows": 2, "request": {"rows": [{...}, {...}]}, "predictions": [412.7, 98.1]}

:func:`snapshot_prediction_log` turns the lines of an interval into one row per served row: ``ts``,
``request_id``, ``model_version``, ``row_index``, the requested features as logged, and ``prediction``
(the value served: a forecast, or for a classifier the probability of class 1, as in training's
reference sample). A line that cannot be read is counted by reason and skipped, never fatal: a log
written by a live service has a half-written last line, and one bad request must not stop the monitor.

A day folder holds the lines written that day (UTC); a line buffered just before midnight is written
just after it, so the day after an interval's last day is read too. Files rotated mid-day and files
of several processes in one folder are all read. Rows are built as columns and turned into Arrow
every ``CHUNK_ROWS`` rows, so memory stays under twice the log's size (a 100 MB log: 170 MB at peak). Like
``LocalWarehouse.snapshot``, the snapshot is written to a temporary file and renamed into place, and a
retry finds it instead of reading the log again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mlops_lifecycle.exceptions import SnapshotError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

PREDICTION_COLUMN = "prediction"
ROW_COLUMNS = ("ts", "request_id", "model_version", "row_index")  # before the features; prediction after
METADATA_KEY = b"mlops_lifecycle.served_log"  # parquet key-value metadata: what made the snapshot
CHUNK_ROWS = 16_384  # served rows kept as Python objects before they become Arrow columns
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class ServedSnapshot:
    """What :func:`snapshot_prediction_log` wrote, or found written by an earlier try.

    Reasons in ``bad_lines``: ``incomplete`` (a last line without its newline: a file being written),
    ``not_json``, ``not_object``, ``bad_ts`` (unparsable, or without a UTC offset), ``missing_field:<name>``,
    ``ill_typed_field:<name>``, ``model_line_mismatch``, ``length_mismatch`` (``rows``, ``request.rows`` and
    ``predictions`` disagree), ``row_not_object``. A line whose ``ts`` is outside the interval is not read
    further, so it is counted by no interval; one whose ``ts`` cannot be read is counted by every interval
    that reads its day folder.
    """

    uri: str  # the parquet snapshot's path
    rows: int  # served rows in it
    reused: bool  # an earlier try made it
    versions: dict[str, int]  # model_version -> rows
    lines: int  # log lines read in the interval
    bad_lines: dict[str, int]  # reason -> count (skipped, never fatal)


class _BadLine(Exception):
    """A log line that is skipped, and why (the key it is counted under)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Served(NamedTuple):
    """One good log line: a request and what it was served."""

    ts: datetime
    request_id: str
    model_version: str
    rows: list[dict[str, Any]]
    predictions: list[float]


def _field(record: dict[str, Any], name: str, kind: type, label: str = "") -> Any:
    """``record[name]`` if it is a ``kind`` (a bool is no int here); _BadLine naming the field otherwise."""
    if name not in record:
        raise _BadLine(f"missing_field:{label or name}")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _BadLine(f"ill_typed_field:{label or name}")
    return value


def _parse_line(raw: bytes, model_line: str, start: datetime, end: datetime) -> _Served | None:
    """The line's request and predictions; None when its ``ts`` is outside [start, end); _BadLine if unusable.

    ``ts`` is checked first, so a line of another interval is never counted as bad here.
    """
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, bytes that are not UTF-8, absurd nesting
        raise _BadLine("not_json") from None
    if not isinstance(record, dict):
        raise _BadLine("not_object")
    try:
        ts = datetime.fromisoformat(_field(record, "ts", str))
    except ValueError:
        raise _BadLine("bad_ts") from None
    if ts.tzinfo is None:  # the log writes UTC with a "Z"; a local time cannot be placed in the interval
        raise _BadLine("bad_ts")
    if not start <= ts < end:
        return None
    request_id = _field(record, "request_id", str)
    line = _field(record, "model_line", str)
    version = _field(record, "model_version", str)
    count = _field(record, "rows", int)
    rows = _field(_field(record, "request", dict), "rows", list, "request.rows")
    predictions = _field(record, "predictions", list)
    if line != model_line:
        raise _BadLine("model_line_mismatch")
    if not count == len(rows) == len(predictions):
        raise _BadLine("length_mismatch")
    if not all(isinstance(row, dict) for row in rows):
        raise _BadLine("row_not_object")
    if not all(isinstance(p, int | float) and not isinstance(p, bool) for p in predictions):
        raise _BadLine("ill_typed_field:predictions")
    return _Served(ts if ts.tzinfo is UTC else ts.astimezone(UTC), request_id, version, rows, predictions)


def _array(values: list[Any]) -> pa.Array:
    """Logged values as one Arrow column; a column whose values mix kinds (text and numbers) becomes text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _as_text(values)


def _as_text(values: list[Any]) -> pa.Array:
    import pyarrow as pa

    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _unify(column: str, chunks: list[pa.Array]) -> list[pa.Array]:
    """Chunks of one feature column cast to one type: the chunks' own when they agree (all-null chunks take
    it), float64 when they are numbers of different kinds, text otherwise."""
    import pyarrow as pa

    kinds = {chunk.type for chunk in chunks} - {pa.null()}
    if len(kinds) <= 1:
        kind = next(iter(kinds), pa.null())
        return [chunk if chunk.type == kind else chunk.cast(kind) for chunk in chunks]
    if all(pa.types.is_integer(k) or pa.types.is_floating(k) for k in kinds):
        return [chunk.cast(pa.float64()) for chunk in chunks]
    log.warning("served feature %s holds values of types %s: kept as text", column, sorted(map(str, kinds)))
    return [_as_text(chunk.to_pylist()) for chunk in chunks]


@dataclass
class _Builder:
    """Served rows of one interval as columns, and the counts of what was read."""

    model_line: str
    start: datetime
    end: datetime
    features: list[str]
    lines: int = 0
    files: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    _columns: dict[str, list[Any]] = field(init=False)
    _chunks: list[dict[str, pa.Array]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._columns = self._empty()

    def _empty(self) -> dict[str, list[Any]]:
        return {name: [] for name in (*ROW_COLUMNS, *self.features, PREDICTION_COLUMN)}

    def read(self, path: Path) -> None:
        """Add the rows of the file's lines in the interval; count its bad lines."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:  # deleted since the folder was listed (retention, or a shipper took it)
            log.warning("prediction log file %s vanished before it was read", path)
            return
        self.files += 1
        with handle:
            for raw in handle:
                if not raw.endswith(b"\n"):  # only a last line can lack it: a file being written
                    self.lines += 1
                    self.bad[INCOMPLETE] += 1
                    continue
                try:
                    served = _parse_line(raw, self.model_line, self.start, self.end)
                except _BadLine as exc:
                    self.lines += 1
                    self.bad[exc.reason] += 1
                    continue
                if served is not None:
                    self.lines += 1
                    self._add(served)

    def _add(self, served: _Served) -> None:
        n = len(served.rows)
        columns = self._columns
        columns["ts"].extend([served.ts] * n)
        columns["request_id"].extend([served.request_id] * n)
        columns["model_version"].extend([served.model_version] * n)
        columns["row_index"].extend(range(n))
        for name in self.features:
            columns[name].extend([row.get(name) for row in served.rows])
        columns[PREDICTION_COLUMN].extend(served.predictions)
        self.versions[served.model_version] += n
        if len(columns["ts"]) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        columns, self._columns = self._columns, self._empty()
        if not columns["ts"]:
            return
        self._chunks.append(
            {
                "ts": pa.array(columns.pop("ts"), pa.timestamp("us", tz="UTC")),
                "request_id": pa.array(columns.pop("request_id"), pa.string()),
                "model_version": pa.array(columns.pop("model_version"), pa.string()),
                "row_index": pa.array(columns.pop("row_index"), pa.int64()),
                PREDICTION_COLUMN: pa.array(columns.pop(PREDICTION_COLUMN), pa.float64()),
            }
            | {name: _array(columns.pop(name)) for name in self.features}
        )

    def table(self) -> pa.Table:
        """All rows, ordered by time (then request and row), whichever files and processes they came from."""
        import pyarrow as pa

        self._flush()
        chunks, self._chunks = self._chunks, []  # the sorted copy replaces them: not kept while it is written
        names = [*ROW_COLUMNS, *self.features, PREDICTION_COLUMN]
        if not chunks:
            table = _fixed_schema(self.features).empty_table()
        else:
            arrays = {name: [chunk.pop(name) for chunk in chunks] for name in names}
            for name in self.features:
                arrays[name] = _unify(name, arrays[name])
            table = pa.table({name: pa.chunked_array(arrays.pop(name)) for name in names})
            table = table.sort_by([("ts", "ascending"), ("request_id", "ascending"), ("row_index", "ascending")])
        metadata = _made_for(self.model_line, self.start, self.end) | {
            "lines": self.lines,
            "bad_lines": dict(sorted(self.bad.items())),
        }
        return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})


def _fixed_schema(features: list[str]) -> pa.Schema:
    """The columns of an interval without served rows: feature types are unknown (null)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("ts", pa.timestamp("us", tz="UTC")),
            ("request_id", pa.string()),
            ("model_version", pa.string()),
            ("row_index", pa.int64()),
            *((name, pa.null()) for name in features),
            (PREDICTION_COLUMN, pa.float64()),
        ]
    )


def _made_for(model_line: str, start: datetime, end: datetime) -> dict[str, str]:
    """What a snapshot is of, as kept in its metadata: the same instants compare equal in any time zone."""
    utc = {"start": start.astimezone(UTC).isoformat(), "end": end.astimezone(UTC).isoformat()}
    return {"model_line": model_line} | utc


def _day(name: str) -> date | None:
    try:
        return date.fromisoformat(name)
    except ValueError:
        return None


def _log_files(directory: Path, model_line: str, start: datetime, end: datetime) -> Iterator[Path]:
    """The ``*.jsonl`` files of every version of the line whose day folder can hold a ``ts`` in [start, end).

    A line is in the folder of the day it was written, its ``ts``'s day or (flushed after midnight) the next.
    """
    first = start.astimezone(UTC).date()
    last = (end.astimezone(UTC) - timedelta(microseconds=1)).date() + timedelta(days=1)
    line_dir = directory / model_line
    if not line_dir.is_dir():
        return
    for version_dir in sorted(p for p in line_dir.iterdir() if p.name.startswith("v") and p.is_dir()):
        for day_dir in sorted(version_dir.iterdir()):
            day = _day(day_dir.name)
            if day is not None and first <= day <= last and day_dir.is_dir():
                yield from sorted(p for p in day_dir.glob("*.jsonl") if p.is_file())


def snapshot_prediction_log(
    directory: Path, model_line: str, start: datetime, end: datetime, features: Sequence[str], target: Path
) -> ServedSnapshot:
    """Write the rows served by ``model_line`` in [start, end) to ``target`` as parquet (once).

    ``start`` and ``end`` are timezone-aware. An interval without served rows gives an empty snapshot
    with the same columns, so a monitor of a quiet interval reports 0 rows instead of failing.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"start and end must be timezone-aware, got {start!r} and {end!r}")
    if start >= end:
        raise ValueError(f"start {start.isoformat()} must be before end {end.isoformat()}")
    features = list(features)
    repeated = {name for name in features if features.count(name) > 1}
    clash = sorted(repeated | ({*ROW_COLUMNS, PREDICTION_COLUMN} & set(features)))
    if clash:
        raise ValueError(f"features {clash} repeat or clash with the snapshot's own columns")
    if target.exists():
        return _reuse(target, model_line, start, end, features)

    import pyarrow.parquet as pq

    started = time.monotonic()
    builder = _Builder(model_line, start, end, features)
    for path in _log_files(directory, model_line, start, end):
        builder.read(path)
    table = builder.table()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    snapshot = ServedSnapshot(
        uri=str(target),
        rows=table.num_rows,
        reused=False,
        versions=dict(sorted(builder.versions.items())),
        lines=builder.lines,
        bad_lines=dict(sorted(builder.bad.items())),
    )
    interval = _made_for(model_line, start, end)
    log.info(
        "Served snapshot %s: %d rows %s of %s [%s, %s) from %d lines in %d files under %s; %d bad lines %s; %.1f s",
        target,
        snapshot.rows,
        snapshot.versions,
        model_line,
        interval["start"],
        interval["end"],
        snapshot.lines,
        builder.files,
        directory,
        sum(snapshot.bad_lines.values()),
        snapshot.bad_lines,
        time.monotonic() - started,
    )
    return snapshot


def _reuse(target: Path, model_line: str, start: datetime, end: datetime, features: list[str]) -> ServedSnapshot:
    """The snapshot an earlier try wrote, with the counts it reported; refused if made for another interval."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(target)
    made = json.loads((parquet.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
    asked = _made_for(model_line, start, end)
    differs = {k: made[k] for k in asked if k in made and made[k] != asked[k]}
    missing = [name for name in features if name not in parquet.schema_arrow.names]
    if differs or missing:
        raise SnapshotError(
            f"Served snapshot {target} exists but was not made for {asked} with features {features}"
            f" ({differs or f'lacks {missing}'}): delete it, or give each interval its own target"
        )
    counts = pc.value_counts(parquet.read(columns=["model_version"]).column("model_version"))
    versions = {item["values"].as_py(): item["counts"].as_py() for item in counts}
    snapshot = ServedSnapshot(
        uri=str(target),
        rows=parquet.metadata.num_rows,
        reused=True,
        versions=dict(sorted(versions.items())),
        lines=int(made.get("lines", 0)),
        bad_lines={str(k): int(v) for k, v in made.get("bad_lines", {}).items()},
    )
    log.info("Served snapshot %s already exists (%d rows %s): reusing it, no log read", target, snapshot.rows, versions)
    return snapshot
