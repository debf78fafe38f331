"""The stage contract: what flows between the lifecycle's tasks, and what a backend must provide.

Each stage of a model line's lifecycle has a production backend and an embedded local one
(``docs/architecture.md``). Whatever the backend, a stage hands the next ones the same value, declared
here as a ``TypedDict`` (XCom stores it as plain JSON, readable in the Airflow UI; ``mypy`` checks every
read of it). Fields a backend may leave out are ``NotRequired`` and read with ``.get``.

    route    -> (the branch)      extract  -> Snapshot          train  -> Candidate         gate -> GateOutcome
    stage    -> Staging           open_review -> Review         approve (+ merge) -> Approval, Merge
    deploy   -> Deployment (GitLab CI: CIPipeline first)  verify -> Verification   promote -> Promotion

The deployment repository (where reviews, version pins and changelogs live) is a protocol with two
implementations in ``mlops_lifecycle.deployment_repository``: a local git repository, and a GitLab
project. This module imports nothing but the standard library, so anything may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NotRequired, Protocol, TypedDict


class Snapshot(TypedDict):
    """extract: the window's feature snapshot, where training reads it. No data, only its address."""

    uri: str  # a parquet path (DuckDB) or bq://project.dataset.table (BigQuery)
    rows: int
    reused: bool  # an earlier try of this window made it
    model_line: str
    run_key: str
    interval_start: str  # the Airflow data interval (ISO)
    interval_end: str
    train_start: str  # the training data [train_start, window_end), holdout from holdout_start
    holdout_start: str
    window_end: str
    data_end: NotRequired[str]  # a backtest's snapshot runs past window_end to the end of the horizon
    table: NotRequired[str]  # BigQuery: the snapshot table
    job_id: NotRequired[str]  # BigQuery: the query job that wrote it


class Candidate(TypedDict):
    """train: the registered model version trained on the snapshot, and what it was compared with."""

    model_line: str
    model_name: str
    model_version: str
    run_id: str
    experiment_id: str
    run_key: str
    production_version: str | None  # production when training scored it on the same holdout; None: none yet
    code_revision: str
    snapshot: str  # the snapshot's uri
    window: str  # human-readable training window
    holdout_start: str


class BacktestRun(TypedDict):
    """backtest_train: a model trained on the window and evaluated on the horizon after it."""

    backtest_id: str
    baseline_id: str  # the backtest of the line's own configuration it is compared with (itself, for the baseline)
    variant: str
    run_id: str
    experiment_id: str
    run_key: str  # <window run key>@<backtest id>
    window_end: str  # ISO date: end of the training window, start of the horizon
    horizon_end: str  # ISO date, exclusive
    horizon: str  # complete | missing (not in the data yet: reported, not failed)
    snapshot: str  # holds the window and the horizon


class RuleOutcome(TypedDict):
    """One gate rule applied to one metric (``mlops_lifecycle.gate.RuleResult`` as JSON)."""

    metric: str
    rule: str  # "threshold" or "regression"
    value: float | None
    limit: float | None
    passed: bool
    reason: str
    baseline: float | None
    applicable: bool


class GateOutcome(TypedDict):
    """gate: a passing verdict (a rejection fails the task instead), every rule and the run's metrics."""

    passed: bool
    production_version: str | None
    results: list[RuleOutcome]
    metrics: dict[str, float]


class Staging(TypedDict):
    """stage: the staging alias now points at the candidate; ``previous`` is what it pointed at before."""

    alias: str
    version: str
    previous: str | None


class Review(TypedDict):
    """open_review: the proposal (changelog entry + version pin) committed for review."""

    review_id: str  # the review branch (local git) or group/project!iid (GitLab)
    branch: str
    commit: str
    repository: str  # path or web URL of the deployment repository
    mr_iid: NotRequired[int]  # GitLab
    web_url: NotRequired[str]  # GitLab: the merge request


class Approval(TypedDict):
    """The review's approval: who approved, and when (ISO). A rejection fails the task instead."""

    decision: Literal["approved"]
    approved_by: list[str]
    approved_at: str


class Merge(TypedDict):
    """The approved review merged into the deployment repository's main branch."""

    merge_commit: str
    review_id: str


class MergedReview(Approval, Merge):
    """GitLab: approval and merge are one event (people merge the merge request)."""

    merged_by: str | None
    web_url: str


class CIPipeline(TypedDict):
    """GitLab CI: the merge commit's pipeline on the target branch succeeded (between merge and deployments)."""

    pipeline_id: int
    web_url: str
    sha: str


class Deployment(TypedDict):
    """deploy: the merge commit runs in each environment; production answers at ``service_url``."""

    service_url: str
    revision: str  # the deployment repository's commit the service was built from
    deployments: dict[str, str]  # environment -> deployment id, in deployment order
    pipeline_id: NotRequired[int]  # GitLab CI
    log_file: NotRequired[str]  # local service: its log


class Verification(TypedDict):
    """verify_serving: production's ``/version`` reported exactly the candidate's identity."""

    url: str
    served_version: str


class Promotion(TypedDict):
    """promote: the production alias moved (or already was there) and the changelog records it."""

    model_name: str
    production_version: str
    previous_production_version: str | None
    changelog_commit: str
    moved: bool


class StagingRestored(TypedDict):
    """restore_staging: the staging alias put back after a later step failed."""

    alias: str
    restored_to: str | None
    was: str
    because: str


# --------------------------------------------------------------------------------------------------
# What /version must report: the serving identity, checked once, here.
# --------------------------------------------------------------------------------------------------
IDENTITY_FIELDS = ("model_line", "model_name", "model_version", "run_id", "code_revision")


def serving_identity(candidate: Candidate, revision: str) -> dict[str, str]:
    """The identity production must report for ``candidate`` deployed from ``revision``."""
    return {
        "model_line": candidate["model_line"],
        "model_name": candidate["model_name"],
        "model_version": candidate["model_version"],
        "run_id": candidate["run_id"],
        "code_revision": revision,
    }


def identity_mismatch(answer: Mapping[str, object], expected: Mapping[str, str]) -> list[str]:
    """Fields of a ``/version`` answer that differ from ``expected``, as ``field X (expected Y)`` parts."""
    return [
        f"{field} {answer.get(field)!s} (expected {value})"
        for field, value in expected.items()
        if str(answer.get(field)) != str(value)
    ]


# --------------------------------------------------------------------------------------------------
# The deployment repository.
# --------------------------------------------------------------------------------------------------
class DeploymentRepository(Protocol):
    """Where reviews, version pins (``models/<line>.yaml``) and changelogs (``changelog/<line>.md``) live.

    Every write is idempotent: a retry finds the branch, the commit or the entry the first try made.
    Changelog entries are identified by their first (heading) line and never written twice.
    """

    @property
    def location(self) -> str:
        """Where it is, for people: a path or a web URL."""
        ...

    def read(self, ref: str, path: str) -> str | None:
        """The file at ``ref`` (branch or commit), or None if absent."""
        ...

    def open_review(self, branch: str, replace: Mapping[str, str], append: Mapping[str, str], message: str) -> str:
        """Commit ``replace`` files and ``append`` entries on ``branch`` (made from main); its head commit."""
        ...

    def append_on_main(self, path: str, entry: str, message: str) -> str:
        """Append ``entry`` to ``path`` on main (skipped if already there); the resulting head commit."""
        ...


class MergingRepository(DeploymentRepository, Protocol):
    """A deployment repository in which the lifecycle merges approved reviews itself (the local adapter).

    On GitLab people merge the merge request and the lifecycle waits for it instead.
    """

    def is_merged(self, branch: str) -> bool:
        """The review branch exists and is part of main."""
        ...

    def merge(self, branch: str, message: str) -> str:
        """Merge ``branch`` into main; the merge commit (a retry returns the existing one)."""
        ...
