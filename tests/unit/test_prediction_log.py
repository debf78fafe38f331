"""The prediction log on its own: it never holds more than its disk budget, and says what it deleted."""

from __future__ import annotations

import json
import sys
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
