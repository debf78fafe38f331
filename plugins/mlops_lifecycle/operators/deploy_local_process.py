"""deploy, ``deploy.backend: local_process`` (the embedded local adapter): the model service as a local process.

It deploys what the review merged: the pin on the merge commit is packaged and served exactly as the
deployment repository's pipeline would (``adapters.local_service``), blue/green behind the line's front
on the stable port: the new version starts beside the serving one, the task defers (no worker slot)
until the new one reports the approved identity on ``/version``, then the front switches to it and the
old one stops. A new version that does not come up in ``deploy.verify_timeout_seconds`` is stopped and
the old one keeps serving. XCom :class:`mlops_lifecycle.contract.Deployment` (``service_url``: the
stable URL, which then answers as the new version).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.config import DeployLocal
from mlops_lifecycle.contract import serving_identity
from mlops_lifecycle.deployment_repository import pin_path
from mlops_lifecycle.exceptions import DeploymentFailed
from mlops_lifecycle.links import ServiceVersionLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream
from mlops_lifecycle.triggers.service_version import ServiceVersionTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.adapters.local_service import ServiceState
    from mlops_lifecycle.contract import Candidate, Deployment, Merge


class LocalDeployOperator(LifecycleOperator):
    """Package the merged pin and switch the line's service to it, blue/green (stand-in for GitLab CI + Kubernetes)."""

    template_fields = ("candidate", "merge")
    operator_extra_links = (ServiceVersionLink(),)

    def __init__(self, *, candidate: Upstream, merge: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.merge: Merge = merge

    def execute(self, context: Context) -> Deployment:
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer, PackagingFailed, still_serving

        c, commit = self.candidate, self.merge["merge_commit"]
        # before anything is packaged or started: production never goes back to an older window
        self.ensure_not_superseded(c["run_key"], c["model_version"])
        raw = self.deployment_repo.read(commit, pin_path(c["model_line"]))
        pin = yaml.safe_load(raw) if raw else None
        if not pin or str(pin.get("model_version")) != c["model_version"]:
            raise DeploymentFailed(
                f"Merge commit {commit} pins {c['model_line']} to "
                f"{pin.get('model_version') if pin else 'nothing'}, not the approved v{c['model_version']}"
            )
        deploy = self.section(self.config.deploy, DeployLocal)
        deployer = LocalServiceDeployer(paths.local_home())
        try:
            rollout = deployer.start(
                pin={key: str(pin.get(key)) for key in ("model_line", "model_name", "model_version", "run_id")},
                port=deploy.port,
                env=self.registry.process_env(),
                revision=commit,
            )
        except PackagingFailed as exc:
            serving = deployer.current(c["model_line"])
            raise DeploymentFailed(
                f"v{c['model_version']} could not be packaged: {exc}. "
                f"{still_serving(serving, f'http://127.0.0.1:{deploy.port}')}"
            ) from None
        self.set_link(ServiceVersionLink.key, f"{rollout.url}/version")
        if rollout.reused:
            return self._deployment(rollout.new, rollout.url)
        self.log.info(
            "Deferring: waiting up to %d s for v%s at %s to pass its start-up checks and report its identity; "
            "%s meanwhile",
            deploy.verify_timeout_seconds,
            c["model_version"],
            rollout.new.url,
            still_serving(rollout.serving, rollout.url),
        )
        self.defer(
            trigger=ServiceVersionTrigger(
                url=rollout.new.url,
                expected=serving_identity(c, commit),
                deadline=time.time() + deploy.verify_timeout_seconds,
                poll_interval=deploy.poll_interval_seconds,
                pid=rollout.new.pid,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Deployment:
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer, ServiceFailed, still_serving

        c = self.candidate
        url = f"http://127.0.0.1:{self.section(self.config.deploy, DeployLocal).port}"
        self.set_link(ServiceVersionLink.key, f"{url}/version")
        deployer = LocalServiceDeployer(paths.local_home())
        # the new service is found by its side URL in the line's state file (what the trigger polled)
        new = deployer.backend(c["model_line"], str(event.get("url")))
        failure = str(event.get("message", event))
        if event.get("status") == "success":
            self.log.info(failure)
            if new is None:
                failure = f"{event.get('url')} reported v{c['model_version']}, but its process is gone"
            else:
                try:
                    return self._deployment(deployer.switch(c["model_line"], new), url)
                except ServiceFailed as exc:
                    failure = str(exc)
        serving = deployer.abandon(c["model_line"], str(event.get("url")))
        raise DeploymentFailed(
            f"v{c['model_version']} did not come up: {failure}. It was stopped: {still_serving(serving, url)}. "
            f"New service's log: {deployer.log_file(c['model_line'], c['model_version'])}"
        )

    def _deployment(self, service: ServiceState, url: str) -> Deployment:
        self.log.info("%s serves v%s (pid %d at %s)", url, service.model_version, service.pid, service.url)
        return {
            "service_url": url,
            "revision": service.revision,
            "deployments": {"production": f"local-process:{service.pid}@{service.url}"},
            "log_file": service.log_file,
        }
