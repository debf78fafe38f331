"""The prediction log on its own: it keeps its directory within its disk budget and age (whoever wrote the
files), says what it deleted, and lets nobody but its user read the inputs it holds."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "include" / "deployment"))

from model_service.prediction_log import PredictionLog  # noqa: E402


def test_files_stay_within_the_budget_deleting_the_oldest(tmp_path: Path) -> None:
    log = PredictionLog(
        tmp_path, model_line="line", model_name="name", model_version="3", max_bytes=40_000, flush_seconds=0.01
    )
    body = json.dumps({"rows": [{"market_id": "M01", "price": 7.5, "note": "x" * 100}] * 10}, indent=1).encode()
    for i in range(60):
        log.record(f"req-{i}", body, [float(i)] * 10)
        log._wake.set()  # write each request as it comes, so files rotate many times
        while log._buffer:
            pass
    log.close()

    files = sorted((tmp_path / "line" / "v3").glob("*/*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert sum(f.stat().st_size for f in files) <= 40_000
    assert log.pruned > 0 and log.written == 600 and log.dropped == 0
    assert sum(line["rows"] for line in lines) == log.written - log.pruned
    # what is left is the newest: the deleted rows are the oldest requests
    assert lines[-1]["request_id"] == "req-59" and lines[0]["request_id"] != "req-0"
    # a pretty-printed body still makes one line, and comes back as sent
    assert lines[-1]["request"] == json.loads(body) and lines[-1]["predictions"] == [59.0] * 10
    assert {k: lines[-1][k] for k in ("model_line", "model_name", "model_version", "rows")} == {
        "model_line": "line",
        "model_name": "name",
        "model_version": "3",
        "rows": 10,
    }


def test_a_full_buffer_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, model_line="l", model_name="n", model_version="1", max_buffered_rows=5)
    log.record("a", b'{"rows": [{}, {}, {}, {}]}', [1.0] * 4)
    log.record("b", b'{"rows": [{}, {}, {}, {}]}', [1.0] * 4)  # would exceed the buffer: dropped, counted
    log.close()
    assert (log.written, log.dropped) == (4, 4)


def _earlier_file(directory: Path, relative: str, requests: int, age_seconds: float) -> Path:
    """A prediction log file as an earlier process left it: ``requests`` lines of 2 rows each, last
    written ``age_seconds`` ago."""
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    line = '{"ts": "2026-01-01T00:00:00.000Z", "request_id": "old-%d", "model_line": "line", "model_name": "name", '
    # a row that looks like a line's head does not count: only the start of each line does
    line += '"model_version": "2", "rows": 2, "request": {"rows": [{"a": 0, "rows": 5, "request": 1}, {}]}, '
    line += '"predictions": [1.0, 2.0]}'
    path.write_text("".join(line % i + "\n" for i in range(requests)))
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def _log(directory: Path, **limits: float) -> PredictionLog:
    return PredictionLog(
        directory, model_line="line", model_name="name", model_version="3", flush_seconds=0.01, **limits
    )


def _write_one(log: PredictionLog, request_id: str = "new") -> None:
    log.record(request_id, b'{"rows": [{"x": 1}]}', [1.0])
    log.close()


def test_files_and_the_directories_it_creates_are_owner_only(tmp_path: Path) -> None:
    """The log holds raw inputs: nobody but the service's user may read it."""
    directory = tmp_path / "predictions" / "nested"
    _write_one(_log(directory))
    created = [directory.parent, directory, *directory.rglob("*")]
    assert [p.name for p in created if p.is_file()], "nothing was written"
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in created}
    assert modes == {name: 0o600 if name.endswith(".jsonl") else 0o700 for name in modes}


def test_the_size_bound_covers_files_left_by_earlier_processes_oldest_first(tmp_path: Path) -> None:
    oldest = _earlier_file(tmp_path, "line/v1/2026-01-01/host-7-100-1.jsonl", 100, age_seconds=3 * 86400)
    older = _earlier_file(tmp_path, "other_line/v2/2026-01-02/host-8-200-1.jsonl", 100, age_seconds=2 * 86400)
    newer = _earlier_file(tmp_path, "line/v2/2026-01-03/host-9-300-1.jsonl", 100, age_seconds=86400)
    not_a_log = tmp_path / "line" / "README.txt"
    not_a_log.write_text("kept: not a *.jsonl file\n" * 1000)
    budget = newer.stat().st_size + 1000  # the newest earlier file and this process's one line fit
    log = _log(tmp_path, max_bytes=budget)
    _write_one(log)
    assert not oldest.exists() and not older.exists()
    assert newer.exists() and not_a_log.exists()
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.jsonl")) <= budget
    assert log.pruned == 2 * 100 * 2, "the rows of the deleted files, read from the head of their lines"


def test_max_age_deletes_files_last_written_before_it_even_when_idle(tmp_path: Path) -> None:
    stale = _earlier_file(tmp_path, "line/v2/2026-01-01/host-7-100-1.jsonl", 3, age_seconds=2 * 3600)
    fresh = _earlier_file(tmp_path, "line/v2/2026-01-01/host-7-100-2.jsonl", 3, age_seconds=60)
    log = _log(tmp_path, max_age_seconds=3600)
    deadline = time.monotonic() + 10
    while stale.exists() and time.monotonic() < deadline:  # no request at all: the log's own loop prunes
        time.sleep(0.01)
    log.close()
    assert not stale.exists() and fresh.exists()
    assert log.pruned == 3 * 2


def test_a_file_deleted_under_the_log_is_replaced_by_a_new_one(tmp_path: Path) -> None:
    """A shipper that removes what it shipped, or the retention of a service beside this one, may delete
    the open file: what comes next must go to a file that exists, not to the deleted one."""
    log = _log(tmp_path)
    log.record("first", b'{"rows": [{"x": 1}]}', [1.0])
    deadline = time.monotonic() + 10
    while log.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    [first] = tmp_path.rglob("*.jsonl")
    first.unlink()
    _write_one(log, "second")
    lines = [line for path in tmp_path.rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert [json.loads(line)["request_id"] for line in lines] == ["second"]
