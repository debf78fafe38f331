"""Deploy what was merged and verify that the service answers with exactly the approved version."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.exceptions import DeploymentFailed
from mlops_lifecycle.links import ServiceVersionLink
from mlops_lifecycle.operators.base import LifecycleOperator
from mlops_lifecycle.operators.review import pin_path
from mlops_lifecycle.triggers.service_version import ServiceVersionTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class LocalDeployOperator(LifecycleOperator):
    """Package the merged pin and start the model microservice on it (embedded stand-in for GitLab CI + Kubernetes)."""

    template_fields = ("candidate", "merge")
    operator_extra_links = (ServiceVersionLink(),)

    def __init__(self, *, candidate: Any, merge: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.merge = merge

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

        c, commit = self.candidate, self.merge["merge_commit"]
        raw = self.deployment_repo.read(commit, pin_path(c["model_line"]))
        pin = yaml.safe_load(raw) if raw else None
        if not pin or str(pin.get("model_version")) != c["model_version"]:
            raise DeploymentFailed(
                f"Merge commit {commit} pins {c['model_line']} to "
                f"{pin.get('model_version') if pin else 'nothing'}, not the approved v{c['model_version']}"
            )
        deployer = LocalServiceDeployer(paths.local_home())
        state = deployer.deploy(
            pin={key: str(pin.get(key)) for key in ("model_line", "model_name", "model_version", "run_id")},
            port=self.config.deploy.port,
            env=self.registry.process_env(),
            revision=commit,
        )
        self.set_link(ServiceVersionLink.key, f"{state.url}/version")
        deployment_id = f"local-process:{state.pid}@{state.url}"
        return {
            "service_url": state.url,
            "revision": commit,
            "deployments": {"production": deployment_id},
            "log_file": state.log_file,
        }


class VerifyServingOperator(LifecycleOperator):
    """Defer until the service's ``/version`` reports the approved version (the wait holds no worker slot)."""

    template_fields = ("candidate", "deployment")
    operator_extra_links = (ServiceVersionLink(),)
    ui_color = "#ece4fb"

    def __init__(self, *, candidate: Any, deployment: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.deployment = deployment

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
                expected={
                    "model_line": c["model_line"],
                    "model_name": c["model_name"],
                    "model_version": c["model_version"],
                    "run_id": c["run_id"],
                    "code_revision": self.deployment["revision"],
                },
                deadline=time.time() + timeout,
                poll_interval=self.config.deploy.poll_interval_seconds,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        self.set_link(ServiceVersionLink.key, f"{self.deployment['service_url']}/version")
        if event.get("status") != "success":
            c = self.candidate
            raise DeploymentFailed(
                f"{event.get('message', event)}. Production alias of {c['model_name']} not moved "
                f"(still v{c['production_version'] or 'none'}); service log: {self.deployment.get('log_file')}"
            )
        self.log.info(event["message"])
        return {"url": event["url"], "served_version": event["served_version"]}
