"""Wait, in the triggerer, until a service's ``/version`` reports the expected model version.

Holds only serialisable values; the deadline is absolute so a triggerer restart does not extend it.
Yields exactly one event: ``success`` with what was served, or ``timeout`` with the last thing seen
(wrong version, error, connection refused) so the failure says why in one line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class ServiceVersionTrigger(BaseTrigger):
    def __init__(self, url: str, expected_version: str, deadline: float, poll_interval: float = 2.0) -> None:
        super().__init__()
        self.url = url
        self.expected_version = str(expected_version)
        self.deadline = deadline
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "url": self.url,
                "expected_version": self.expected_version,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        endpoint = f"{self.url.rstrip('/')}/version"
        self.log.info("Waiting for %s to report model version %s", endpoint, self.expected_version)
        last_seen = "no answer yet"
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                seen = await self._observe(client, endpoint)
                if seen != last_seen:
                    self.log.info("%s: %s", endpoint, seen)
                    last_seen = seen
                if seen == f"version {self.expected_version}":
                    yield TriggerEvent(
                        {
                            "status": "success",
                            "served_version": self.expected_version,
                            "url": self.url,
                            "message": f"{endpoint} reports version {self.expected_version}",
                        }
                    )
                    return
                if time.time() >= self.deadline:
                    yield TriggerEvent(
                        {
                            "status": "timeout",
                            "url": self.url,
                            "message": (
                                f"{endpoint} did not report version {self.expected_version} in time; "
                                f"last seen: {last_seen}"
                            ),
                        }
                    )
                    return
                await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))

    @staticmethod
    async def _observe(client: Any, endpoint: str) -> str:
        import httpx

        try:
            response = await client.get(endpoint)
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        try:
            return f"version {response.json()['model_version']}"
        except (ValueError, KeyError, TypeError):
            return "an answer without model_version"
