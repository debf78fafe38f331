"""The stable address of a model line's local service: a TCP front that forwards each new connection to
the line's current backend (what a Kubernetes Service is to a Deployment's pods).

Clients use one port (``deploy.port``); the service processes behind it come and go on side ports.
Which backend is current is the ``serving.port`` of the line's state file, written by
``local_service.LocalServiceDeployer`` (atomically) and re-read here whenever it changes: the switch
of a blue/green deployment is that rewrite. Each accepted connection goes to the backend current at
that moment and stays there, so requests in flight finish on the version they started on.

Run by the deployer as::

    python -m mlops_lifecycle.adapters.service_front --port 8601 --state services/<line>.json \
        --lock services/<line>.front

One front per line: it holds an exclusive ``flock`` on the lock file for its life and, once it
listens, writes its pid and port there. A second start finds the lock taken and exits 0 (the front
is already running); exit 3 says something else holds the port. It exits on SIGTERM (open
connections get a few seconds to finish) or when the state file is gone (the line was stopped).
Standard library only (uvloop if installed); bytes are spliced with asyncio streams, large buffers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("service_front")

BUFFER = 256 * 1024  # bytes read at once per direction (a 100-row /predict body fits in one read)
GRACE_SECONDS = 5.0  # after SIGTERM, how long open connections may take to finish
WATCH_SECONDS = 1.0  # how often the front checks that its line still exists
EXIT_ALREADY_RUNNING = 0
EXIT_PORT_TAKEN = 3


class Route:
    """The line's current backend port, from the state file; re-read only when the file changed."""

    def __init__(self, state_file: Path, own_port: int) -> None:
        self.state_file = state_file
        self.own_port = own_port
        self._seen: tuple[int, int, int] | None = None
        self._port: int | None = None

    def backend(self) -> int | None:
        """The port new connections go to (None: nothing serving). One ``stat`` per call."""
        try:
            st = os.stat(self.state_file)
        except OSError:
            self._seen, self._port = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._seen, previous = seen, self._port
            self._port = self._read()
            if self._port != previous:
                log.info("backend now %s", f"127.0.0.1:{self._port}" if self._port else "none")
        return self._port

    def _read(self) -> int | None:
        try:
            serving = json.loads(self.state_file.read_text()).get("serving") or {}
            port = int(serving["port"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return None if port == self.own_port else port  # never forward to itself


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then half-close the other side (HTTP clients may wait for it)."""
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()  # a reset on one side resets the other: nobody waits forever


class Front:
    """Accepted connections, each spliced to the backend current when it arrived (kept for a graceful stop)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.open: set[asyncio.Task[None]] = set()
        self._warned_at = 0.0

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.open.add(task)
        try:
            await self._forward(client_reader, client_writer)
        finally:
            self.open.discard(task)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        port = self.route.backend()
        if port is None:
            client_writer.transport.abort()
            return
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", port, limit=BUFFER)
        except OSError as exc:
            if time.monotonic() - self._warned_at > 1.0:  # at most once a second: a dead backend under load
                self._warned_at = time.monotonic()
                log.warning("backend 127.0.0.1:%d refused a connection: %s", port, exc)
            client_writer.transport.abort()
            return
        try:
            await asyncio.gather(_pipe(client_reader, backend_writer), _pipe(backend_reader, client_writer))
        finally:
            backend_writer.close()
            client_writer.close()


async def serve(port: int, state_file: Path, on_listening: Callable[[], None] | None = None) -> int:
    """Listen on 127.0.0.1:``port`` and forward until SIGTERM or the state file disappears."""
    front = Front(Route(state_file, port))
    try:
        server = await asyncio.start_server(front.handle, "127.0.0.1", port, limit=BUFFER, backlog=1024)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("port %d is in use by something else: not starting", port)
            return EXIT_PORT_TAKEN
        raise
    if on_listening is not None:
        on_listening()
    log.info("listening on 127.0.0.1:%d, routing by %s", port, state_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    missing = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_SECONDS)
        missing = 0 if state_file.exists() else missing + 1
        if missing >= 2:
            log.info("state file %s is gone: the line was stopped", state_file)
            break
    server.close()
    if front.open:
        log.info("stopping: %d open connection(s) get up to %.0f s", len(front.open), GRACE_SECONDS)
        _, pending = await asyncio.wait(set(front.open), timeout=GRACE_SECONDS)
        for task in pending:
            task.cancel()
    log.info("stopped")
    return 0


def _take_lock(path: Path, patience: float = 1.0) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None if another front holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + patience  # a deployer reading the file is not a front: try a little
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="the stable port (127.0.0.1)")
    parser.add_argument("--state", type=Path, required=True, help="the line's state file (serving.port)")
    parser.add_argument("--lock", type=Path, required=True, help="one front per line: lock, pid and port")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format=f"%(asctime)s front:{args.port} %(levelname)s %(message)s"
    )
    fd = _take_lock(args.lock)
    if fd is None:
        log.info("another front holds %s: already running", args.lock)
        return EXIT_ALREADY_RUNNING
    os.ftruncate(fd, 0)  # not listening yet: a deployer must not take a stale pid for this front

    def listening() -> None:
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "port": args.port, "state": str(args.state)}).encode(), 0)

    try:
        import uvloop  # the event loop uvicorn uses too, when installed
    except ImportError:
        return asyncio.run(serve(args.port, args.state, listening))
    return int(uvloop.run(serve(args.port, args.state, listening)))


if __name__ == "__main__":
    sys.exit(main())
