"""Wait, in the triggerer, until a service's ``/version`` reports exactly the expected identity.

Identity is every field in ``expected`` (``contract.serving_identity``: model line, registered name,
version, MLflow run id and the deployment revision it was started from), so another process
answering on the same address, or a stale deployment of the same version, never passes for ours.

Holds only serialisable values; the deadline is absolute so a triggerer restart does not extend it.
Yields exactly one event: ``success`` with what was served, or ``timeout`` with the last thing seen
(which fields differ, an HTTP error, connection refused) so the failure says why in one line. Given
the ``pid`` of a local service that is starting (the local deploy), it also yields ``exited`` as soon
as that process is gone: a start-up that failed (its golden set, its package) is not waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from mlops_lifecycle.adapters.local_service import process_alive
from mlops_lifecycle.contract import identity_mismatch


class ServiceVersionTrigger(BaseTrigger):
    def __init__(
        self, url: str, expected: dict[str, str], deadline: float, poll_interval: float = 2.0, pid: int | None = None
    ) -> None:
        super().__init__()
        self.url = url
        self.expected = {k: str(v) for k, v in expected.items()}
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.pid = pid

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "url": self.url,
                "expected": self.expected,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "pid": self.pid,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        endpoint = f"{self.url.rstrip('/')}/version"
        self.log.info("Waiting for %s to report %s", endpoint, self.expected)
        last_seen = "no answer yet"
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                matched, seen = await self._observe(client, endpoint)
                if seen != last_seen:
                    self.log.info("%s: %s", endpoint, seen)
                    last_seen = seen
                if matched:
                    yield TriggerEvent(
                        {
                            "status": "success",
                            "served_version": self.expected.get("model_version"),
                            "url": self.url,
                            "message": f"{endpoint} reports {seen}",
                        }
                    )
                    return
                if self.pid is not None and not process_alive(self.pid):
                    yield TriggerEvent(
                        {
                            "status": "exited",
                            "url": self.url,
                            "message": f"the service process (pid {self.pid}) exited before {endpoint} reported "
                            f"the approved deployment; last seen: {seen}",
                        }
                    )
                    return
                if time.time() >= self.deadline:
                    yield TriggerEvent(
                        {
                            "status": "timeout",
                            "url": self.url,
                            "message": f"{endpoint} did not report the approved deployment in time; last seen: {seen}",
                        }
                    )
                    return
                await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))

    async def _observe(self, client: Any, endpoint: str) -> tuple[bool, str]:
        import httpx

        try:
            response = await client.get(endpoint)
        except httpx.HTTPError as exc:
            return False, f"unreachable ({type(exc).__name__})"
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}"
        try:
            answer = response.json()
        except ValueError:
            return False, "an answer that is not JSON"
        if not isinstance(answer, dict):
            return False, "an answer that is not a JSON object"
        wrong = identity_mismatch(answer, self.expected)
        if wrong:
            return False, "a different deployment: " + ", ".join(wrong)
        return True, f"version {answer.get('model_version')} of {answer.get('model_name')} at revision " + str(
            answer.get("code_revision")
        )
