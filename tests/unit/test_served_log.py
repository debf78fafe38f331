"""The served rows a drift monitor compares with training: prediction logs written by the real model-service
``PredictionLog`` (in this process and in others) read into one parquet snapshot per interval."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mlops_lifecycle.adapters.served_log import CHUNK_ROWS, snapshot_prediction_log
from mlops_lifecycle.exceptions import SnapshotError

DEPLOYMENT = Path(__file__).resolve().parents[2] / "include" / "deployment"
sys.path.insert(0, str(DEPLOYMENT))

from model_service.prediction_log import PredictionLog  # noqa: E402

LINE = "demand_forecast"
FEATURES = ["market_id", "price", "lag_7"]
COLUMNS = ["ts", "request_id", "model_version", "row_index", *FEATURES, "prediction"]
HOUR = timedelta(hours=1)

# a service process of its own: writes `requests` requests of `rows` rows each, a few ms apart
WRITER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from model_service.prediction_log import PredictionLog
directory, version, prefix, requests, rows = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
log = PredictionLog(Path(directory), model_line="demand_forecast", model_name="demand_forecast",
                    model_version=version, flush_seconds=0.01, max_file_bytes=400)
for i in range(requests):
    records = [{"market_id": f"M{j:02d}", "price": 7.5 + j, "lag_7": i * 10 + j} for j in range(rows)]
    log.record(f"{prefix}-{i}", json.dumps({"rows": records}).encode(), [float(i * 100 + j) for j in range(rows)])
    time.sleep(0.03)
log.close()
"""


def body(i: int, rows: int) -> bytes:
    """A /predict body as a client sends it; ``note`` is not a feature, row 1 lacks ``lag_7``."""
    records: list[dict[str, Any]] = [
        {"market_id": f"M{j:02d}", "price": 7.5 + j, "lag_7": i * 10 + j, "note": "x"} for j in range(rows)
    ]
    if rows > 1:
        del records[1]["lag_7"]
    return json.dumps({"rows": records}, indent=1).encode()  # pretty-printed, as a client may send it


def serve(directory: Path, version: str, requests: int, rows: int = 2, prefix: str = "req") -> None:
    """Requests scored by one service process (this one), each logged a few ms after the last."""
    log = PredictionLog(directory, model_line=LINE, model_name=LINE, model_version=version, flush_seconds=0.01)
    for i in range(requests):
        log.record(f"{prefix}-{i}", body(i, rows), [float(i * 100 + j) for j in range(rows)])
        time.sleep(0.005)  # the log's ts has milliseconds: each request its own
    log.close()


def logged(directory: Path) -> list[dict[str, Any]]:
    """Every line of the log, oldest first."""
    lines = [json.loads(x) for path in directory.rglob("*.jsonl") for x in path.read_text().splitlines()]
    return sorted(lines, key=lambda line: line["ts"])


def ts(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(line["ts"])


def snapshot(directory: Path, start: datetime, end: datetime, target: Path) -> Any:
    return snapshot_prediction_log(directory, LINE, start, end, FEATURES, target)


def test_an_interval_keeps_the_requests_from_its_start_up_to_its_end(tmp_path: Path) -> None:
    serve(tmp_path / "log", "3", requests=5)
    lines = logged(tmp_path / "log")
    assert [line["request_id"] for line in lines] == [f"req-{i}" for i in range(5)]

    # [ts of req-1, ts of req-3): the start is in, the end is out
    result = snapshot(tmp_path / "log", ts(lines[1]), ts(lines[3]), tmp_path / "served.parquet")
    assert (result.rows, result.versions, result.lines, result.bad_lines) == (4, {"3": 4}, 2, {})
    assert not result.reused and result.uri == str(tmp_path / "served.parquet")

    frame = pd.read_parquet(result.uri)
    assert list(frame.columns) == COLUMNS
    assert frame["request_id"].tolist() == ["req-1", "req-1", "req-2", "req-2"]
    assert frame["row_index"].tolist() == [0, 1, 0, 1]
    assert frame["model_version"].tolist() == ["3"] * 4
    assert frame["ts"].tolist() == [pd.Timestamp(ts(lines[1]))] * 2 + [pd.Timestamp(ts(lines[2]))] * 2
    assert str(frame["ts"].dt.tz) == "UTC"
    # each served row beside the prediction it got; values as sent, a feature the row lacks is null
    assert frame["market_id"].tolist() == ["M00", "M01"] * 2
    assert frame["price"].tolist() == [7.5, 8.5] * 2
    assert frame.loc[frame["row_index"] == 0, "lag_7"].tolist() == [10, 20]
    assert frame.loc[frame["row_index"] == 1, "lag_7"].isna().all()
    assert frame["prediction"].tolist() == [100.0, 101.0, 200.0, 201.0]


def test_rotated_files_of_several_processes_and_versions_are_all_read(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    # two processes serving v3 side by side (their files rotate every few requests), then v4 in this one
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(DEPLOYMENT), str(directory), "3", name, "8", "3"])
        for name in ("a", "b")
    ]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    serve(directory, "4", requests=3, prefix="c")
    v3_files = list((directory / LINE / "v3").glob("*/*.jsonl"))
    assert len(v3_files) > 2 and len({path.name.split("-")[-3] for path in v3_files}) == 2, "rotated, two pids"

    now = datetime.now(UTC)
    result = snapshot(directory, now - HOUR, now + HOUR, tmp_path / "served.parquet")
    assert (result.rows, result.versions, result.lines) == (2 * 8 * 3 + 3 * 2, {"3": 48, "4": 6}, 19)
    frame = pd.read_parquet(result.uri)
    assert frame["ts"].is_monotonic_increasing
    rows_per_request = frame.groupby("request_id")["row_index"].apply(list).to_dict()
    expected = {f"{p}-{i}": [0, 1, 2] for p in "ab" for i in range(8)} | {f"c-{i}": [0, 1] for i in range(3)}
    assert rows_per_request == expected
    served = frame.set_index(["request_id", "row_index"])
    assert served.loc[("b-7", 2), ["lag_7", "prediction"]].tolist() == [72, 702.0]


def test_bad_lines_are_counted_by_reason_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "log"
    serve(directory, "3", requests=2)
    [good_file] = directory.rglob("*.jsonl")
    good = logged(directory)[0]

    def like(**changes: Any) -> str:
        return json.dumps({**good, **changes})

    bad = [
        "not json at all",
        "[1, 2]",
        like(ts="yesterday"),
        like(ts="2026-11-29T10:00:00"),  # no offset: cannot be placed in a UTC interval
        json.dumps({k: v for k, v in good.items() if k != "predictions"}),
        like(request_id=7),
        like(predictions=[1.0]),  # 2 rows, 1 prediction
        like(request={"rows": [{"market_id": "M00"}, "M01"]}),
        like(model_line="high_demand_alert"),
        like(predictions=["412.7", 98.1]),
        like(ts="2020-01-01T00:00:00.000Z", predictions=[1.0]),  # bad, but of another interval: not counted
    ]
    other = good_file.with_name("host-99-1-1.jsonl")  # another process's file in the same folder
    other.write_text("".join(line + "\n" for line in bad) + like(request_id="being-written")[:-20])

    caplog.set_level(logging.INFO, logger="mlops_lifecycle.adapters.served_log")
    now = datetime.now(UTC)
    result = snapshot(directory, now - HOUR, now + HOUR, tmp_path / "served.parquet")
    assert result.bad_lines == {
        "bad_ts": 2,
        "ill_typed_field:predictions": 1,
        "ill_typed_field:request_id": 1,
        "incomplete": 1,
        "length_mismatch": 1,
        "missing_field:predictions": 1,
        "model_line_mismatch": 1,
        "not_json": 1,
        "not_object": 1,
        "row_not_object": 1,
    }
    assert (result.rows, result.versions, result.lines) == (4, {"3": 4}, 2 + 11)
    assert set(pd.read_parquet(result.uri)["request_id"]) == {"req-0", "req-1"}
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Served snapshot")]
    assert "4 rows" in summary and "11 bad lines" in summary and "'not_json': 1" in summary


def test_a_line_flushed_after_midnight_counts_in_the_interval_of_its_ts(tmp_path: Path) -> None:
    """The folder is the day a line was written: a request of 23:59:59.9 may be in the next day's folder."""
    line = {
        "ts": "2026-11-29T23:59:59.900Z",
        "request_id": "late",
        "model_line": LINE,
        "model_name": LINE,
        "model_version": "3",
        "rows": 1,
        "request": {"rows": [{"market_id": "M01", "price": 7.5, "lag_7": 3}]},
        "predictions": [41.0],
    }
    folder = tmp_path / "log" / LINE / "v3" / "2026-11-30"
    folder.mkdir(parents=True)
    (folder / "host-1-1-1.jsonl").write_text(json.dumps(line) + "\n")

    day = datetime(2026, 11, 29, tzinfo=UTC)
    result = snapshot(tmp_path / "log", day, day + timedelta(days=1), tmp_path / "29.parquet")
    assert (result.rows, result.versions) == (1, {"3": 1})
    next_day = snapshot(tmp_path / "log", day + timedelta(days=1), day + timedelta(days=2), tmp_path / "30.parquet")
    assert next_day.rows == 0


def test_values_of_one_feature_logged_as_different_kinds_are_kept(tmp_path: Path) -> None:
    """A client may send ``7`` for a price; a new version may take a feature as text: nothing is lost."""
    directory = tmp_path / "log"
    per_request = CHUNK_ROWS // 2 + 5  # each version's rows fill a chunk of their own, typed from its values
    for version, row in (("3", {"price": 7, "market_id": 1}), ("4", {"price": 7.5, "market_id": "M01"})):
        log = PredictionLog(directory, model_line=LINE, model_name=LINE, model_version=version, flush_seconds=0.01)
        for i in range(2):
            log.record(f"v{version}-{i}", json.dumps({"rows": [row] * per_request}).encode(), [1.0] * per_request)
        log.close()
    rows = 2 * per_request

    now = datetime.now(UTC)
    result = snapshot(directory, now - HOUR, now + HOUR, tmp_path / "served.parquet")
    assert (result.rows, result.versions) == (2 * rows, {"3": rows, "4": rows})
    frame = pd.read_parquet(result.uri)
    assert frame["price"].dtype == "float64" and set(frame["price"]) == {7.0, 7.5}
    assert set(frame["market_id"]) == {"1", "M01"}  # numbers and text: text
    assert frame["lag_7"].isna().all()


def test_a_second_call_reuses_the_snapshot_and_its_counts(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    serve(directory, "3", requests=3)
    [path] = directory.rglob("*.jsonl")
    with path.open("a") as handle:
        handle.write("garbage\n")
    now = datetime.now(UTC)
    first = snapshot(directory, now - HOUR, now + HOUR, tmp_path / "served.parquet")

    for path in directory.rglob("*.jsonl"):
        path.unlink()  # a retry does not read the log again: its files may be gone meanwhile
    again = snapshot(directory, now - HOUR, now + HOUR, tmp_path / "served.parquet")
    assert again.reused and not first.reused
    assert (again.rows, again.versions, again.lines, again.bad_lines) == (6, {"3": 6}, 4, {"not_json": 1})
    assert (again.uri, again.rows, again.versions, again.lines, again.bad_lines) == (
        first.uri,
        first.rows,
        first.versions,
        first.lines,
        first.bad_lines,
    )
    # a target made for another interval is never passed off as this one's
    with pytest.raises(SnapshotError, match="was not made for"):
        snapshot(directory, now, now + HOUR, tmp_path / "served.parquet")


def test_an_interval_without_requests_gives_an_empty_snapshot_with_the_columns(tmp_path: Path) -> None:
    serve(tmp_path / "log", "3", requests=1)
    earlier = datetime.now(UTC) - timedelta(days=3)
    for directory in (tmp_path / "log", tmp_path / "never-served"):
        target = tmp_path / f"{directory.name}.parquet"
        result = snapshot(directory, earlier, earlier + HOUR, target)
        assert (result.rows, result.versions, result.lines, result.bad_lines) == (0, {}, 0, {})
        frame = pd.read_parquet(target)
        assert list(frame.columns) == COLUMNS and frame.empty
