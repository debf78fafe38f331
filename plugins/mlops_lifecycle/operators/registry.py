"""gate, stage, promote, restore_staging: the MLflow side of the lifecycle, the same for every backend.

The gate reads metrics only and writes its verdict to the *run* (tracking), never to the registry,
so a rejected model leaves the registry exactly as it was. Staging and promotion move aliases with
compare-and-set and write the append-only audit tags (``docs/architecture.md``, "The audit record").
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.audit import find_event, latest_event
from mlops_lifecycle.deployment_repository import changelog_path
from mlops_lifecycle.exceptions import GateRejected, LifecycleError
from mlops_lifecycle.gate import evaluate_gate
from mlops_lifecycle.links import MlflowModelVersionLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import (
        Approval,
        Candidate,
        Deployment,
        GateOutcome,
        Merge,
        Promotion,
        Review,
        Staging,
        StagingRestored,
        Verification,
    )

BASELINE_PREFIX = "production."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class GateOperator(LifecycleOperator):
    """Apply the line's gate rules to the candidate's run; a rejection fails the task without retry."""

    template_fields = ("candidate",)
    operator_extra_links = (MlflowRunLink(),)
    ui_color = "#fde2e2"

    def __init__(self, *, candidate: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate

    def execute(self, context: Context) -> GateOutcome:
        c = self.candidate
        run = self.registry.get_run(c["run_id"])
        self.set_link(MlflowRunLink.key, self.registry.run_url(c["experiment_id"], c["run_id"]))
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith(BASELINE_PREFIX)}
        baseline = {
            k.removeprefix(BASELINE_PREFIX): v for k, v in run.data.metrics.items() if k.startswith(BASELINE_PREFIX)
        }
        verdict = evaluate_gate(self.config.gate.metrics, metrics, baseline, c["production_version"])
        for result in verdict.results:
            self.log.info("%s %-10s %s", "PASS" if result.passed else "FAIL", result.rule, result.reason)
        self.registry.set_run_tags(
            c["run_id"], {"gate.verdict": "passed" if verdict.passed else "rejected", "gate.summary": verdict.summary()}
        )
        if not verdict.passed:
            raise GateRejected(
                f"Gate rejected {c['model_name']} v{c['model_version']} (run {c['run_id']}): "
                f"{verdict.summary()}. Registry unchanged; not retried."
            )
        self.log.info("Gate %s", verdict.summary())
        return {**verdict.as_dict(), "metrics": metrics}  # type: ignore[typeddict-item]


class StageOperator(LifecycleOperator):
    """Point the staging alias at the gated candidate and write its audit record."""

    template_fields = ("candidate", "verdict")
    operator_extra_links = (MlflowModelVersionLink(),)

    def __init__(self, *, candidate: Upstream, verdict: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.verdict: GateOutcome = verdict

    def execute(self, context: Context) -> Staging:
        c, reg = self.candidate, self.config.registry
        if not self.verdict.get("passed"):
            raise GateRejected(f"{c['model_name']} v{c['model_version']} has no passing gate verdict")
        self.ensure_not_superseded(c["run_key"], c["model_version"])
        self.registry.add_version_tags(
            c["model_name"],
            c["model_version"],
            {
                "audit.model_line": c["model_line"],
                "audit.run_id": c["run_id"],
                "audit.run_key": c["run_key"],
                "audit.code_revision": c["code_revision"],
                "audit.config_sha256": self.config.fingerprint,
                "audit.data_window": c["window"],
                "audit.holdout_start": c["holdout_start"],
                "audit.snapshot": c["snapshot"],
                "audit.metrics": json.dumps(self.verdict["metrics"], sort_keys=True),
                "audit.gate": json.dumps(
                    [
                        {k: r[k] for k in ("metric", "rule", "value", "baseline", "limit", "passed")}
                        for r in self.verdict["results"]
                    ]
                ),
                "audit.gate_verdict": "passed",
                "audit.gated_against_production": c["production_version"] or "none",
            },
        )
        name, version, by = c["model_name"], c["model_version"], self.run_ref(context)
        self.set_link(MlflowModelVersionLink.key, self.model_version_url(version))
        current = self.registry.alias_version(name, reg.staging_alias)
        if current == version:
            # staged already, by an earlier try of this run or by an earlier run: nothing moves, nothing to
            # record; what staging pointed to before is in the event that moved it
            earlier = latest_event(self.registry.version_tags(name, version), "staged")
            self.log.info("Alias '%s' already points at v%s: nothing to move", reg.staging_alias, version)
            return {"alias": reg.staging_alias, "version": version, "previous": earlier["from"] if earlier else None}
        # what staging pointed to is recorded before it moves, so a retry (or restore_staging) never loses it
        staged = self.registry.record_event(
            name,
            version,
            {"event": "staged", "by": by, "at": _now(), "alias": reg.staging_alias, "from": current, "to": version},
        )
        self.registry.move_alias(name, reg.staging_alias, version, expected=current)
        return {"alias": reg.staging_alias, "version": version, "previous": staged["from"]}


class RestoreStagingOperator(LifecycleOperator):
    """After a rejected review or a failed deployment, put the staging alias back where it was.

    Runs only when something downstream of staging failed (trigger rule ``one_failed``). It moves the
    alias back only if it still points at this run's candidate (compare-and-set), so a later run's
    staging is never undone. The run still ends failed.
    """

    ui_color = "#f4f4f4"

    def execute(self, context: Context) -> StagingRestored | None:
        ti = context["ti"]
        candidate: Candidate | None = ti.xcom_pull(task_ids="train")
        name, by = self.config.registry.model_name, self.run_ref(context)
        # this run's own record of what it staged (written before the alias moved), not its XCom
        staged = (
            find_event(self.registry.version_tags(name, candidate["model_version"]), "staged", by)
            if candidate
            else None
        )
        if not candidate or not staged:
            self.log.info("Staging was not moved by this run: nothing to restore")
            return None
        alias, ours, previous = staged["alias"], staged["to"], staged["from"]
        if self.registry.alias_version(name, self.config.registry.production_alias) == ours:
            self.log.info("v%s already reached production: staging stays", ours)
            return None
        if self.registry.alias_version(name, alias) != ours:
            self.log.info("Alias '%s' no longer points at v%s: leaving it", alias, ours)
            return None
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=sorted(self.upstream_task_ids))
        failed = sorted(t for t, state in states.get(ti.run_id, {}).items() if state == "failed")
        reason = f"{', '.join(failed) or 'a later step'} failed in airflow:{ti.dag_id}/{ti.run_id}"
        if previous is None:
            self.registry.client.delete_registered_model_alias(name, alias)
            self.log.info("Removed alias '%s' from v%s (it pointed nowhere before this run)", alias, ours)
        else:
            self.registry.move_alias(name, alias, previous, expected=ours)
        # the version did reach staging: its audit record says so, and why it was withdrawn
        self.registry.record_event(
            name,
            ours,
            {"event": "staging_withdrawn", "by": by, "at": _now(), "alias": alias, "to": previous, "because": reason},
        )
        self.log.info("Staging withdrawn from v%s (back to %s): %s", ours, previous or "none", reason)
        return {"alias": alias, "restored_to": previous, "was": ours, "because": reason}


class PromoteOperator(LifecycleOperator):
    """Move production to the verified version (compare-and-set) and complete the audit record.

    The alias must still point where it pointed when the candidate was gated; otherwise someone
    promoted in between and this run stops without touching the registry. The replaced version keeps
    the previous-production alias, so rollback has a target.
    """

    template_fields = ("candidate", "review", "approval", "merge", "deployment", "verification")
    operator_extra_links = (MlflowModelVersionLink(),)
    ui_color = "#d9f2d9"

    def __init__(
        self,
        *,
        candidate: Upstream,
        review: Upstream,
        approval: Upstream,
        merge: Upstream,
        deployment: Upstream,
        verification: Upstream,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.review: Review = review
        self.approval: Approval = approval
        self.merge: Merge = merge
        self.deployment: Deployment = deployment
        self.verification: Verification = verification

    def execute(self, context: Context) -> Promotion:
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        try:
            return self._promote(context)
        except (MlflowException, RequestException) as exc:
            c, reg = self.candidate, self.config.registry
            raise LifecycleError(
                f"MLflow did not answer while promoting {c['model_name']} v{c['model_version']}: production already "
                f"serves it (verified at {self.verification['url']}), but the '{reg.production_alias}' alias may "
                f"still say v{c['production_version'] or 'none'}. Retried; once MLflow is back, clearing promote "
                f"finishes it (nothing else needs to run again). Cause: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc

    def _promote(self, context: Context) -> Promotion:
        from mlops_lifecycle.changelog import render_promotion

        c, reg = self.candidate, self.config.registry
        name, version, expected = c["model_name"], c["model_version"], c["production_version"]
        self.ensure_not_superseded(c["run_key"], version)
        promoted_by = self.run_ref(context)
        promoted_at = _now()
        pipeline_id, review_url = self.deployment.get("pipeline_id"), self.review.get("web_url")
        # check before writing anything, then the record, then the move: a promotion never lacks
        # its audit trail, and a conflict leaves the registry untouched
        current = self.registry.expect_alias(name, reg.production_alias, expected, version)
        self.registry.add_version_tags(
            name,
            version,
            {
                "audit.review_id": self.review["review_id"],
                "audit.approved_by": ",".join(self.approval["approved_by"]),
                "audit.approved_at": self.approval["approved_at"],
                "audit.merge_commit": self.merge["merge_commit"],
                "audit.deployments": json.dumps(self.deployment["deployments"]),  # in deployment order
                **({"audit.pipeline_id": str(pipeline_id)} if pipeline_id is not None else {}),
                **({"audit.review_url": review_url} if review_url else {}),
                "audit.verified": f"{self.verification['url']} reported v{version}",
                "audit.previous_production_version": expected or "none",
                "audit.promoted_by": promoted_by,
                "audit.promoted_at": promoted_at,
            },
        )
        if current == version:
            # a retry after the move, or a re-run of this window: finish what the promoting run began, no more
            earlier = latest_event(self.registry.version_tags(name, version), "promoted")
            finishing = earlier is not None and earlier["by"] == promoted_by
            promoted_at = earlier["at"] if earlier else promoted_at
        else:
            finishing = True
            promoted_at = self.registry.record_event(
                name,
                version,
                {
                    "event": "promoted",
                    "by": promoted_by,
                    "at": promoted_at,
                    "alias": reg.production_alias,
                    "from": expected,
                    "to": version,
                    "approved_by": self.approval["approved_by"],
                    "approved_at": self.approval["approved_at"],
                    "review_id": self.review["review_id"],
                    "merge_commit": self.merge["merge_commit"],
                    "deployments": self.deployment["deployments"],
                    "verified": self.verification["url"],
                },
            )["at"]
        moved = self.registry.move_alias(name, reg.production_alias, version, expected=expected)
        if expected and finishing:
            current_previous = self.registry.alias_version(name, reg.previous_production_alias)
            self.registry.move_alias(name, reg.previous_production_alias, expected, expected=current_previous)
            self.registry.record_event(
                name,
                expected,
                {
                    "event": "replaced",
                    "by": promoted_by,
                    "at": promoted_at,
                    "alias": reg.production_alias,
                    "by_version": version,
                    "kept_as": reg.previous_production_alias,
                },
            )
        entry = render_promotion(
            model_line=c["model_line"],
            model_version=version,
            previous_version=expected,
            approvers=self.approval["approved_by"],
            approved_at=self.approval["approved_at"],
            review_ref=self.review["review_id"],
            merge_commit=self.merge["merge_commit"],
            deployments=self.deployment["deployments"],
            served_by=self.verification["url"],
            promoted_by=promoted_by,
            promoted_at=promoted_at,
        )
        changelog_commit = self.deployment_repo.append_on_main(
            changelog_path(c["model_line"]), entry, f"{c['model_line']}: v{version} promoted to production"
        )
        self.set_link(MlflowModelVersionLink.key, self.model_version_url(version))
        self.log.info(
            "%s v%s is production (%s); previous production: %s; changelog commit %s",
            name,
            version,
            "moved now" if moved else "already there",
            expected or "none",
            changelog_commit,
        )
        return {
            "model_name": name,
            "production_version": version,
            "previous_production_version": expected,
            "changelog_commit": changelog_commit,
            "moved": moved,
        }
