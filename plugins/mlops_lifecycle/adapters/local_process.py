"""Run a child process for a task: its output streams into the task log, and it dies with the task.

Used by the local training adapter. The child gets its own process group so ``terminate`` (called
from ``on_kill`` or on timeout) stops it and anything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class ProcessFailed(RuntimeError):
    def __init__(self, returncode: int | None, tail: list[str], timed_out: bool) -> None:
        self.returncode = returncode
        self.tail = tail
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited with code {returncode}"
        super().__init__(f"process {what}; last output:\n" + "\n".join(tail))


class LocalProcess:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None

    def run(self, timeout_seconds: float, keep_lines: int = 40) -> list[str]:
        """Run to completion, logging each output line; return all lines. Raise ProcessFailed otherwise."""
        deadline = time.monotonic() + timeout_seconds
        lines: list[str] = []
        tail: deque[str] = deque(maxlen=keep_lines)
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        log.info("Started pid %d: %s", self.proc.pid, " ".join(self.argv[:2]))
        assert self.proc.stdout is not None
        timed_out = False
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            log.info("  | %s", line)
            if time.monotonic() > deadline:
                timed_out = True
                self.terminate()
                break
        try:
            returncode = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.terminate()
            returncode = self.proc.returncode
        if timed_out or returncode != 0:
            raise ProcessFailed(returncode, list(tail), timed_out)
        return lines

    def terminate(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after a grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        log.warning("Stopping pid %d and its process group", self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
