"""verify_serving, for every deploy backend: production's ``/version`` reports exactly the candidate.

The identity (``contract.serving_identity``: line, registered name, version, MLflow run and the
deployment revision) is awaited in the triggerer, so the wait holds no worker slot. XCom
:class:`mlops_lifecycle.contract.Verification`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.contract import serving_identity
from mlops_lifecycle.exceptions import DeploymentFailed
from mlops_lifecycle.links import ServiceVersionLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream
from mlops_lifecycle.triggers.service_version import ServiceVersionTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import Candidate, Deployment, Verification


class VerifyServingOperator(LifecycleOperator):
    """Defer until the service's ``/version`` reports the approved version (the wait holds no worker slot)."""

    template_fields = ("candidate", "deployment")
    operator_extra_links = (ServiceVersionLink(),)
    ui_color = "#ece4fb"

    def __init__(self, *, candidate: Upstream, deployment: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.deployment: Deployment = deployment

    def execute(self, context: Context) -> None:
        url = self.deployment["service_url"]
        self.set_link(ServiceVersionLink.key, f"{url}/version")
        timeout = self.config.deploy.verify_timeout_seconds
        self.log.info(
            "Deferring: waiting up to %d s for %s/version to report v%s", timeout, url, self.candidate["model_version"]
        )
        c = self.candidate
        self.defer(
            trigger=ServiceVersionTrigger(
                url=url,
                expected=serving_identity(c, self.deployment["revision"]),
                deadline=time.time() + timeout,
                poll_interval=self.config.deploy.poll_interval_seconds,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Verification:
        self.set_link(ServiceVersionLink.key, f"{self.deployment['service_url']}/version")
        if event.get("status") != "success":
            c = self.candidate
            raise DeploymentFailed(
                f"{event.get('message', event)}. Production alias of {c['model_name']} not moved "
                f"(still v{c['production_version'] or 'none'}); service log: {self.deployment.get('log_file')}"
            )
        self.log.info(event["message"])
        return {"url": event["url"], "served_version": event["served_version"]}
