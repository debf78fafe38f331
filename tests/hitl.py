"""Answer Airflow human-in-the-loop requests as a reviewer would: through the public REST API."""

from __future__ import annotations

import threading
import time

from conftest import REVIEWER, REVIEWER_PASSWORD


class Reviewer(threading.Thread):
    """Waits for an open approval of ``dag_id`` and answers it with ``choice`` (once)."""

    def __init__(self, dag_id: str, choice: str, timeout: float = 600) -> None:
        super().__init__(daemon=True)
        self.dag_id, self.choice, self.timeout = dag_id, choice, timeout
        self.answered: dict | None = None
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            from airflow.api_fastapi.app import create_app
            from fastapi.testclient import TestClient

            client = TestClient(create_app())
            token = client.post("/auth/token", json={"username": REVIEWER, "password": REVIEWER_PASSWORD})
            token.raise_for_status()
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and not self._stop_event.is_set():
                listing = client.get(
                    f"/api/v2/dags/{self.dag_id}/dagRuns/~/hitlDetails",
                    params={"response_received": False},
                    headers=headers,
                )
                listing.raise_for_status()
                for detail in listing.json()["hitl_details"]:
                    ti = detail["task_instance"]
                    response = client.patch(
                        f"/api/v2/dags/{self.dag_id}/dagRuns/{ti['dag_run_id']}/taskInstances/"
                        f"{ti['task_id']}/{ti['map_index']}/hitlDetails",
                        json={"chosen_options": [self.choice], "params_input": {}},
                        headers=headers,
                    )
                    response.raise_for_status()
                    self.answered = {"subject": detail["subject"], "body": detail["body"], **response.json()}
                    return
                time.sleep(1)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
