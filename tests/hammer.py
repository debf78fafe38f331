"""A client on a line's stable port for the whole of a deployment: every answer and every failure, recorded."""

from __future__ import annotations

import http.client
import json
import threading


class Hammer(threading.Thread):
    """GET /version on ``port``, one new connection per request (``pause`` s apart), until stopped."""

    def __init__(self, port: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.pause = pause
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/version", headers={"Connection": "close"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}")
                else:
                    self.versions.append(str(json.loads(body)["model_version"]))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()
            if self.pause:
                self._stop_event.wait(self.pause)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def runs(self) -> list[tuple[str, int]]:
        """The answers as runs: [("1", 812), ("2", 240)] means v1 812 times, then v2 240 times."""
        runs: list[tuple[str, int]] = []
        for version in self.versions:
            if runs and runs[-1][0] == version:
                runs[-1] = (version, runs[-1][1] + 1)
            else:
                runs.append((version, 1))
        return runs
