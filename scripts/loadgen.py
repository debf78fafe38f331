"""Closed-loop HTTP/1.1 load generator: N keep-alive connections POST the same body for a fixed time.

    python scripts/loadgen.py --url http://127.0.0.1:8080/predict --body-file body.json \
        --connections 8 --duration 10 --warmup 2

Prints one JSON line: requests (2xx answers), errors, first_error, rps, p50_ms, p90_ms, p99_ms, max_ms,
all over the requests sent after the warm-up; plus its own CPU seconds per request (``cpu_us_per_request``)
so a reader can check that the generator was not the bottleneck. With ``--server-pid`` (Linux) it
also reports the CPU seconds the server's process tree used over the same measured window.

It is meant to be cheap per request, since it shares the cores with the server under test: the
request bytes are encoded once; each connection is an ``asyncio.Protocol`` (uvloop when importable)
that parses only the status line and Content-Length (or a chunked body) and writes the next request
from the callback that completes the previous answer, so no coroutine or future is woken per request.
A connection error or a non-2xx answer counts as an error; a dropped connection is reopened.
Only the standard library is needed (uvloop optional).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

GRACE_SECONDS = 10.0  # after the end, how long in-flight requests may take before they count as errors
RECONNECT_PAUSE = 0.05  # after a connection error, so a dead server does not spin the loop


class Run:
    """Shared state of one run: the clock boundaries, the latencies and the error count."""

    def __init__(self, request: bytes, warmup_end: float, end: float) -> None:
        self.request = request
        self.warmup_end = warmup_end
        self.end = end
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error: str | None = None

    def error(self, text: str, started: float) -> None:
        if started >= self.warmup_end:
            self.errors += 1
            if self.first_error is None:
                self.first_error = text


class Connection(asyncio.Protocol):
    """One keep-alive connection in a closed loop: the next request goes out when an answer is complete."""

    def __init__(self, run: Run, closed: asyncio.Future) -> None:
        self.run = run
        self.closed = closed  # resolved when the transport is gone: the driver reopens or stops
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = 0.0
        self.in_flight = False
        self.stopping = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.body_left = -1  # -1: headers not parsed yet
        self.chunked = False
        self.until_close = False
        self.close_after = False

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            done = self.parse()
        except ValueError as exc:  # a malformed answer: count it, drop the connection
            self.fail(f"bad response: {exc}")
            return
        if done:
            self.complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:
            if self.until_close and self.status:  # the body was delimited by the close
                self.complete(reopen=False)
            else:
                self.in_flight = False
                self.run.error(f"connection lost: {exc or 'closed by server'}", self.started)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- the loop ---

    def send(self) -> None:
        if self.stopping or time.perf_counter() >= self.run.end:
            self.stopping = True
            self.transport.close()
            return
        self._reset()
        self.in_flight = True
        self.started = time.perf_counter()
        self.transport.write(self.run.request)

    def complete(self, reopen: bool = True) -> None:
        finished = time.perf_counter()
        self.in_flight = False
        run = self.run
        if 200 <= self.status < 300:
            if self.started >= run.warmup_end:
                run.latencies.append(finished - self.started)
        else:
            run.error(f"HTTP {self.status}: {bytes(self.buffer[:300]).decode(errors='replace')}", self.started)
        self.buffer.clear()
        if self.close_after or self.until_close:
            if reopen and self.transport is not None:
                self.transport.close()  # connection_lost resolves ``closed``; the driver reopens
            return
        self.send()

    def fail(self, text: str) -> None:
        self.in_flight = False
        self.run.error(text, self.started)
        self.transport.close()

    def parse(self) -> bool:
        """Consume what arrived; True once the whole answer is in. The body is kept only for errors."""
        buf = self.buffer
        if self.body_left < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1."):
                raise ValueError(bytes(buf[:80]).decode(errors="replace"))
            self.status = int(head[9:12])
            del buf[: end + 4]
            self.close_after = b"\r\nconnection: close" in head
            position = head.find(b"\r\ncontent-length:")
            if position >= 0:
                stop = head.find(b"\r\n", position + 17)
                self.body_left = int(head[position + 17 : stop if stop >= 0 else None])
            elif b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                self.chunked = True
                self.body_left = 0
            elif self.status in (204, 304) or 100 <= self.status < 200:
                self.body_left = 0
            else:
                self.until_close = True
                self.body_left = 0
                return False
        if self.chunked:
            return self._parse_chunks()
        if self.until_close:
            return False
        if len(buf) < self.body_left:
            return False
        if len(buf) > self.body_left:
            raise ValueError("more bytes than Content-Length (pipelining is not used)")
        return True

    def _parse_chunks(self) -> bool:
        """Chunked body: drop complete chunks from the front of the buffer; True after the last one."""
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return False
            if self.body_left == -2:  # after the zero-size chunk: trailers until an empty line
                del buf[: line_end + 2]
                if line_end == 0:
                    return True
                continue
            size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                del buf[: line_end + 2]
                self.body_left = -2
                continue
            if len(buf) < line_end + 2 + size + 2:
                return False
            del buf[: line_end + 2 + size + 2]


async def drive(run: Run, host: str, port: int) -> None:
    """Keep one connection in the loop until the end, reopening it after errors or server closes."""
    loop = asyncio.get_running_loop()
    while time.perf_counter() < run.end:
        closed = loop.create_future()
        started = time.perf_counter()
        try:
            await loop.create_connection(lambda closed=closed: Connection(run, closed), host, port)
        except OSError as exc:
            run.error(f"connect: {exc}", started)
            await asyncio.sleep(RECONNECT_PAUSE)
            continue
        await closed


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime, stime are 14, 15
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


async def measure(
    url: str, body: bytes, connections: int, duration: float, warmup: float, server_pid: int | None = None
) -> dict:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"only plain http:// URLs are supported, got {url}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    now = time.perf_counter()
    run = Run(request, warmup_end=now + warmup, end=now + warmup + duration)

    cpu: dict[str, float] = {}

    async def cpu_clock() -> None:  # the generator's own CPU time over the measured window
        await asyncio.sleep(max(0.0, run.warmup_end - time.perf_counter()))
        cpu["start"] = time.process_time()
        if server_pid:
            cpu["server_start"] = tree_cpu_seconds(server_pid)
        await asyncio.sleep(max(0.0, run.end - time.perf_counter()))
        cpu["end"] = time.process_time()
        if server_pid:
            cpu["server_end"] = tree_cpu_seconds(server_pid)

    clock = asyncio.ensure_future(cpu_clock())
    drivers = [asyncio.ensure_future(drive(run, host, port)) for _ in range(connections)]
    _, pending = await asyncio.wait(drivers, timeout=warmup + duration + GRACE_SECONDS)
    for task in pending:  # a request that never answered: an error, not a latency
        task.cancel()
        run.error(f"no answer within {GRACE_SECONDS:.0f} s after the end", run.warmup_end)
    await clock

    latencies = sorted(run.latencies)
    count = len(latencies)

    def percentile(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(count - 1, max(0, math.ceil(q * count) - 1))] * 1000, 3)  # nearest rank

    cpu_seconds = cpu["end"] - cpu["start"]
    server_cpu = cpu["server_end"] - cpu["server_start"] if server_pid else None
    return {
        "url": url,
        "connections": connections,
        "duration_s": duration,
        "warmup_s": warmup,
        "body_bytes": len(body),
        "requests": count,
        "errors": run.errors,
        "first_error": run.first_error,
        "rps": round(count / duration, 1),
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
        "mean_ms": round(sum(latencies) / count * 1000, 3) if latencies else None,
        "cpu_s": round(cpu_seconds, 3),
        "cpu_us_per_request": round(cpu_seconds / count * 1e6, 1) if count else None,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 3),
        "server_cpu_ms_per_request": round(server_cpu / count * 1000, 3) if server_cpu is not None and count else None,
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://host:port/path to POST to")
    parser.add_argument("--body-file", required=True, type=Path, help="the request body (sent as JSON)")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds, after the warm-up")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load before measuring")
    parser.add_argument("--server-pid", type=int, help="also report this process tree's CPU over the window")
    args = parser.parse_args()
    work = measure(args.url, args.body_file.read_bytes(), args.connections, args.duration, args.warmup, args.server_pid)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
