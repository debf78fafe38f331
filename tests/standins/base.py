"""A local HTTP stand-in for a cloud REST API: loopback port chosen at run time, request log, faults.

Each stand-in (GitLab v4, Databricks Jobs 2.2, BigQuery v2) subclasses :class:`StandIn` and
registers routes; the real client libraries talk to it over HTTP. Tests count requests with
:meth:`StandIn.requests_matching` and tell it to fail with :meth:`StandIn.inject`:

- ``Fault.status_code(503)``: answer with that status instead of acting (the client may retry);
- ``Fault.rate_limited(retry_after=2)``: 429, with or without a ``Retry-After`` header;
- ``Fault.drop_after()``: act (the side effect happens), then close the connection without an
  answer, as when a network drops between the server acting and the client hearing it;
- ``Fault.drop_before()``: close the connection without acting.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded path, without the query string
    raw_path: str  # as sent (percent-encoding kept): GitLab project ids like group%2Frepo
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str -> as is
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    kind: str  # "status" | "drop_after" | "drop_before"
    status: int = 503
    retry_after: float | None = None

    @classmethod
    def status_code(cls, status: int = 503) -> Fault:
        return cls("status", status=status)

    @classmethod
    def rate_limited(cls, retry_after: float | None = None) -> Fault:
        return cls("status", status=429, retry_after=retry_after)

    @classmethod
    def drop_after(cls) -> Fault:
        return cls("drop_after")

    @classmethod
    def drop_before(cls) -> Fault:
        return cls("drop_before")


Handler = Callable[..., Response]


class _DropConnection(Exception):
    pass


class StandIn:
    """Base class: subclasses call :meth:`route` in ``__init__`` and keep their state behind ``self.lock``."""

    name = "stand-in"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log: list[Request] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        self._faults: list[tuple[str, re.Pattern[str], Fault, list[int]]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StandIn:
        standin = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                standin._dispatch(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "stand-in not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- routes, faults, request log ---------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Handler, raw: bool = False) -> None:
        """``pattern``: regex on the decoded path (``raw=True``: on the path as sent, percent-encoding
        kept); its named groups, decoded, are passed to ``handler(req, **groups)``."""
        self._routes.append((method.upper(), re.compile(f"^{pattern}$"), handler, raw))

    def inject(self, method: str, pattern: str, fault: Fault, times: int = 1) -> None:
        """The next ``times`` requests matching ``method`` and path regex ``pattern`` get ``fault``."""
        with self.lock:
            self._faults.append((method.upper(), re.compile(f"^{pattern}$"), fault, [times]))

    def requests_matching(self, method: str, pattern: str) -> list[Request]:
        regex = re.compile(f"^{pattern}$")
        with self.lock:
            return [r for r in self.log if r.method == method.upper() and regex.match(r.path)]

    def count(self, method: str, pattern: str) -> int:
        return len(self.requests_matching(method, pattern))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for m, regex, fault, left in self._faults:
                if m == method and regex.match(path) and left[0] > 0:
                    left[0] -= 1
                    return fault
        return None

    def _dispatch(self, http: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        body = http.rfile.read(length) if length else b""
        request = Request(
            method=http.command,
            path=unquote(parts.path),
            raw_path=parts.path,
            query=parse_qs(parts.query),
            headers={k.lower(): v for k, v in http.headers.items()},
            body=body,
        )
        with self.lock:
            self.log.append(request)
        fault = self._take_fault(request.method, request.path)
        try:
            if fault is not None and fault.kind == "drop_before":
                raise _DropConnection
            if fault is not None and fault.kind == "status":
                # whole seconds, as servers send it (python-gitlab parses it with int())
                headers = {"Retry-After": str(math.ceil(fault.retry_after))} if fault.retry_after is not None else {}
                self._send(http, Response(fault.status, {"message": f"injected {fault.status}"}, headers))
                return
            response = self._call(request, http.command)
            if fault is not None and fault.kind == "drop_after":
                raise _DropConnection
            self._send(http, response)
        except _DropConnection:
            http.close_connection = True
            try:
                http.connection.shutdown(2)
            except OSError:
                pass

    def _call(self, request: Request, method: str) -> Response:
        allowed = False
        for m, regex, handler, raw in self._routes:
            match = regex.match(request.raw_path if raw else request.path)
            if match is None:
                continue
            allowed = True
            if m != method:
                continue
            groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
            try:
                return handler(request, **groups)
            except Exception as exc:  # a stand-in bug must be visible to the test, as a 500 with the cause
                return Response(500, {"message": f"stand-in error: {type(exc).__name__}: {exc}"})
        if allowed:
            return Response(405, {"message": f"{method} not allowed on {request.path}"})
        return Response(404, {"message": f"{self.name}: no route for {method} {request.path}"})

    @staticmethod
    def _send(http: BaseHTTPRequestHandler, response: Response) -> None:
        body = response.body
        headers = dict(response.headers)
        if isinstance(body, (dict, list)) or body is None and response.status != 204:
            payload = json.dumps(body if body is not None else {}).encode()
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            payload = body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            payload = body or b""
        http.send_response(response.status)
        for key, value in headers.items():
            http.send_header(key, value)
        http.send_header("Content-Length", str(len(payload)))
        http.end_headers()
        if http.command != "HEAD":
            http.wfile.write(payload)
