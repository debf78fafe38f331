"""deploy, ``deploy.backend: local_process`` (the embedded local adapter): the model service as a local process.

It deploys what the review merged: the pin on the merge commit is packaged and served exactly as the
deployment repository's pipeline would (``adapters.local_service``). XCom
:class:`mlops_lifecycle.contract.Deployment`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.config import DeployLocal
from mlops_lifecycle.deployment_repository import pin_path
from mlops_lifecycle.exceptions import DeploymentFailed
from mlops_lifecycle.links import ServiceVersionLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import Candidate, Deployment, Merge


class LocalDeployOperator(LifecycleOperator):
    """Package the merged pin and start the model microservice on it (embedded stand-in for GitLab CI + Kubernetes)."""

    template_fields = ("candidate", "merge")
    operator_extra_links = (ServiceVersionLink(),)

    def __init__(self, *, candidate: Upstream, merge: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.merge: Merge = merge

    def execute(self, context: Context) -> Deployment:
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

        c, commit = self.candidate, self.merge["merge_commit"]
        # before anything is packaged or stopped: production never goes back to an older window
        self.ensure_not_superseded(c["run_key"], c["model_version"])
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
            port=self.section(self.config.deploy, DeployLocal).port,
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
