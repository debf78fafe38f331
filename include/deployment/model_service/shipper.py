"""Ship the prediction log to BigQuery: ``python -m model_service.shipper --directory D --table P.D.T``.

Runs beside the service (a sidecar on the same volume, as the same user: the log is owner-only). Every
``--every`` seconds it reads the complete lines each ``*.jsonl`` file gained since the last cycle, turns
each request into one row per served row (the table the drift monitor reads, include/deployment/README.md:
ts, request_id, model_line, model_version, row_index, features as a JSON object, prediction), streams them
with ``insertId`` ``<request_id>-<row_index>`` (a batch sent again after a crash is not counted twice) and
then records how far each file was shipped in ``<directory>/.shipped.json`` (written atomically). A line
that is not a well-formed log line is counted and skipped, never retried forever. A file shipped to its
end and not written for ``--done-after`` seconds is deleted, so the service's retention budget is used
by what is still to ship. An insert that fails leaves the offsets where they were: the next cycle sends
the same rows again.

Needs google-cloud-bigquery (the product's lock pins it; the slim service image does not carry it):
run it from an image that adds it. Credentials: the pod's workload identity (Application Default
Credentials); ``BIGQUERY_EMULATOR_HOST`` points it at a stand-in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("model_service.shipper")

STATE_FILE = ".shipped.json"
BATCH_ROWS = 500


class BadLine(ValueError):
    """A log line that is not one request with its predictions; ``str()`` is the reason."""


def rows_of_line(line: bytes) -> list[dict[str, Any]]:
    """One log line -> its served rows; BadLine naming what is wrong with the line."""
    try:
        record = json.loads(line)
    except ValueError:
        raise BadLine("not_json") from None
    if not isinstance(record, dict):
        raise BadLine("not_object")
    request, predictions = record.get("request"), record.get("predictions")
    inputs = request.get("rows") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or not isinstance(predictions, list):
        raise BadLine("missing_field")
    if len(inputs) != len(predictions):
        raise BadLine("length_mismatch")
    head = {key: record.get(key) for key in ("ts", "request_id", "model_line", "model_version")}
    if not all(isinstance(value, str) and value for value in head.values()):
        raise BadLine("missing_field")
    out = []
    for index, (row, prediction) in enumerate(zip(inputs, predictions, strict=True)):
        if not isinstance(row, dict):
            raise BadLine("row_not_object")
        out.append(head | {"row_index": index, "features": json.dumps(row), "prediction": prediction})
    return out


class Shipper:
    """Offsets per file, and one cycle of reading, inserting and recording."""

    def __init__(
        self, directory: Path, insert: Callable[[list[dict[str, Any]], list[str]], list[Any]], done_after: float
    ) -> None:
        self.directory = directory
        self.insert = insert  # rows, insert ids -> errors (empty: all written)
        self.done_after = done_after
        self.state_path = directory / STATE_FILE
        self.offsets: dict[str, int] = self._load()
        self.shipped_rows = 0
        self.bad_lines: Counter[str] = Counter()

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save(self) -> None:
        tmp = self.state_path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.offsets, sort_keys=True))
        os.replace(tmp, self.state_path)

    def files(self) -> Iterator[Path]:
        yield from sorted(p for p in self.directory.rglob("*.jsonl") if p.is_file())

    def cycle(self) -> int:
        """Ship what every file gained; returns the rows shipped in this cycle."""
        shipped = 0
        present = set()
        for path in self.files():
            key = str(path.relative_to(self.directory))
            present.add(key)
            shipped += self.ship_file(path, key)
        gone = set(self.offsets) - present  # deleted by the service's retention or by us
        for key in gone:
            del self.offsets[key]
        if gone:
            self._save()
        return shipped

    def ship_file(self, path: Path, key: str) -> int:
        offset = self.offsets.get(key, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if size < offset:  # a new file under the same name: from its start
            offset = 0
        shipped = 0
        with path.open("rb") as handle:
            handle.seek(offset)
            while True:
                chunk = handle.read(8 * 1024 * 1024)
                end = chunk.rfind(b"\n")
                if end < 0:
                    break  # only a line still being written
                shipped += self.ship_lines(chunk[: end + 1], key)
                offset += end + 1
                self.offsets[key] = offset
                self._save()
                handle.seek(offset)
        if offset == size and time.time() - path.stat().st_mtime > self.done_after:
            path.unlink(missing_ok=True)
            self.offsets.pop(key, None)
            self._save()
            log.info("Shipped and deleted %s", key)
        return shipped

    def ship_lines(self, data: bytes, key: str) -> int:
        rows: list[dict[str, Any]] = []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rows += rows_of_line(line)
            except BadLine as exc:
                self.bad_lines[str(exc)] += 1
                log.warning("Skipped a bad line of %s (%s)", key, exc)
        for first in range(0, len(rows), BATCH_ROWS):
            batch = rows[first : first + BATCH_ROWS]
            errors = self.insert(batch, [f"{r['request_id']}-{r['row_index']}" for r in batch])
            if errors:
                raise RuntimeError(f"BigQuery refused rows of {key}: {errors[:3]}")
        self.shipped_rows += len(rows)
        return len(rows)


def bigquery_insert(table: str, deadline: float = 120.0) -> Callable[[list[dict[str, Any]], list[str]], list[Any]]:
    """Streaming inserts into ``table``; transient errors are retried for ``deadline`` seconds, then the cycle
    fails (and the next one sends the same rows again)."""
    from google.cloud import bigquery

    client = bigquery.Client(project=table.split(".", 1)[0])
    retry = bigquery.DEFAULT_RETRY.with_deadline(deadline)

    def insert(rows: list[dict[str, Any]], ids: list[str]) -> list[Any]:
        return list(client.insert_rows_json(table, rows, row_ids=ids, retry=retry))

    return insert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, required=True, help="the service's PREDICTION_LOG_DIR")
    parser.add_argument("--table", required=True, help="project.dataset.table of the shipped prediction logs")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between cycles")
    parser.add_argument("--done-after", type=float, default=600.0, help="delete a shipped file idle this long")
    parser.add_argument("--once", action="store_true", help="one cycle, then exit (a CronJob, or a test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    shipper = Shipper(args.directory, bigquery_insert(args.table), args.done_after)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while True:
        try:
            rows = shipper.cycle()
            if rows:
                log.info("Shipped %d rows to %s (bad lines so far: %s)", rows, args.table, dict(shipper.bad_lines))
        except Exception as exc:  # noqa: BLE001 - a failed insert is retried next cycle, offsets unchanged
            log.error("Cycle failed, retrying in %.0f s: %s: %s", args.every, type(exc).__name__, exc)
            if args.once:
                return 1
        if args.once or stop.wait(args.every):
            return 0


if __name__ == "__main__":
    sys.exit(main())
