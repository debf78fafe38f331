"""One exceptions module for the lifecycle.

Every error names the entity, its state and, where one exists, a link. Errors that are decisions
(a gate that rejected a model, a review that was rejected) derive from ``AirflowFailException`` so
Airflow does not retry them; errors that may be transient derive from ``AirflowException``.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class LifecycleError(AirflowException):
    """Base error of the lifecycle package (retryable unless a subclass says otherwise)."""


class ModelLineConfigError(ValueError):
    """A model-line YAML file is invalid: the message names the file, the field path and a hint.

    Raised at DAG-parse time, before any external call, so it is a plain ``ValueError``.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid model-line config {path}:\n{lines}")


class LifecycleDecision(AirflowFailException):
    """A deliberate stop of the lifecycle (not a flake): never retried."""


class GateRejected(LifecycleDecision):
    """The candidate model failed its gate rules; the registry is left untouched."""


class ReviewRejected(LifecycleDecision):
    """The reviewer rejected the change; nothing is merged, deployed or promoted."""


class ReviewTimedOut(LifecycleDecision):
    """Nobody decided on the review before its deadline; nothing is merged, deployed or promoted."""


class RegistryConflict(LifecycleDecision):
    """An alias moved under us (compare-and-set failed): re-run to re-gate against the new state."""


class TrainingInputError(LifecycleDecision):
    """The entrypoint rejected its input (exit code 2: bad parameter, missing column, empty split).

    Retrying the same window with the same config cannot help, so it is not retried.
    """


class Superseded(LifecycleDecision):
    """Production already serves a model of a later (or the same) data window: this run deploys nothing."""


class BacktestRequestInvalid(LifecycleDecision):
    """A backfill's run conf asks for a backtest the line does not declare (an unknown variant or key)."""


class MonitorRequestInvalid(LifecycleDecision):
    """A manual monitor run asked to check an interval that cannot be checked (run conf since/until)."""


class MergeConflict(LifecycleDecision):
    """A review branch conflicts with main: the merge is aborted and the repository left as it was."""


class DeliveryFailed(LifecycleDecision):
    """The deployment repository's pipeline or a deployment failed: a new merge is needed, not a retry."""


class DeploymentFailed(LifecycleError):
    """The deployment did not come up serving the approved version in time."""


class SnapshotError(LifecycleError):
    """The data snapshot for a window could not be produced (or is empty)."""


class TrainingFailed(LifecycleError):
    """The training entrypoint failed; the message carries the tail of its output."""
