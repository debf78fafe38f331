"""The deferrable verification: only the exact approved deployment passes, and failures say why."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time

import pytest

from mlops_lifecycle.contract import identity_mismatch
from mlops_lifecycle.triggers.service_version import ServiceVersionTrigger

EXPECTED = {"model_name": "m", "model_version": "3", "run_id": "abc", "code_revision": "deadbeef"}


@pytest.fixture
def service():  # noqa: ANN201
    """A loopback HTTP server whose /version answer the test sets."""
    state = {"answer": {}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps(state["answer"]).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def first_event(trigger: ServiceVersionTrigger) -> dict:
    async def run() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(run())


def test_serialisation_round_trip():
    trigger = ServiceVersionTrigger("http://x", EXPECTED, deadline=123.0, poll_interval=0.5)
    classpath, kwargs = trigger.serialize()
    assert classpath == "mlops_lifecycle.triggers.service_version.ServiceVersionTrigger"
    again = ServiceVersionTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    json.dumps(kwargs)  # only plain values


def test_the_exact_deployment_passes(service):
    url, state = service
    state["answer"] = {**EXPECTED, "model_line": "line"}
    event = first_event(ServiceVersionTrigger(url, EXPECTED, deadline=time.time() + 5, poll_interval=0.1))
    assert event["status"] == "success" and event["served_version"] == "3"


def test_same_version_from_another_revision_is_not_ours(service):
    url, state = service
    state["answer"] = {**EXPECTED, "code_revision": "0ld"}
    event = first_event(ServiceVersionTrigger(url, EXPECTED, deadline=time.time() + 0.5, poll_interval=0.1))
    assert event["status"] == "timeout"
    assert "code_revision 0ld (expected deadbeef)" in event["message"]


def test_nothing_listening_times_out_saying_so():
    trigger = ServiceVersionTrigger("http://127.0.0.1:9", EXPECTED, deadline=time.time() + 0.3, poll_interval=0.1)
    event = first_event(trigger)
    assert event["status"] == "timeout" and "unreachable" in event["message"]


def test_a_local_service_whose_process_exits_is_not_waited_for():
    """The local deploy passes the new service's pid: a failed start-up ends the wait at once, not at the deadline."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    trigger = ServiceVersionTrigger(
        "http://127.0.0.1:9", EXPECTED, deadline=time.time() + 60, poll_interval=0.1, pid=proc.pid
    )
    started = time.monotonic()
    event = first_event(trigger)
    assert event["status"] == "exited" and time.monotonic() - started < 10
    assert f"pid {proc.pid}" in event["message"] and "unreachable" in event["message"]


def test_identity_mismatch_lists_every_differing_field():
    assert identity_mismatch({"model_version": 3, "run_id": "x"}, {"model_version": "3", "run_id": "abc"}) == [
        "run_id x (expected abc)"
    ]
