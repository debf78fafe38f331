"""MLflow tracking and registry, reached through an Airflow connection.

Connection ``mlflow_default`` (any type, e.g. ``http``):
- ``host``/``port``/``schema`` give a tracking server (``schema`` is the URL scheme, default http),
  or ``extra.tracking_uri`` gives any MLflow URI (``sqlite:///...`` for a local file store);
- ``password`` is an access token, handed to MLflow as ``MLFLOW_TRACKING_TOKEN`` and never logged; with a
  ``login`` too, they are basic-auth credentials (MLflow's basic-auth app, as docker-compose runs it);
- basic auth may come as ``user:password@`` in the tracking URI: it is taken out of the URI (which
  is then safe to show, in links and messages) and handed to MLflow as ``MLFLOW_TRACKING_USERNAME``
  and ``MLFLOW_TRACKING_PASSWORD``;
- ``extra.ui_url`` is where people browse it (for links in the Airflow UI); defaults to the
  tracking URI when that is http(s); credentials in it are dropped.
- MLflow on Databricks: ``extra.tracking_uri: databricks``, ``host`` the workspace URL and the
  ``password`` a Databricks token, handed to MLflow as ``DATABRICKS_HOST``/``DATABRICKS_TOKEN``; links
  then point into the workspace.

Registry moves are compare-and-set (read the alias, check, move, read back) and audit tags are
append-only: a tag is written once and never silently changed.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from airflow.sdk import BaseHook

from mlops_lifecycle.exceptions import LifecycleError, RegistryConflict

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

RUN_KEY_TAG = "lifecycle.run_key"


class MlflowSettings(NamedTuple):
    uri: str  # without credentials: safe to show
    token: str | None
    ui: str | None  # where people browse it, without credentials
    user: str | None  # basic auth taken out of the tracking URI
    password: str | None


class MlflowRegistryHook(BaseHook):
    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "http"
    hook_name = "MLflow (lifecycle)"

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    @cached_property
    def _connection_settings(self) -> MlflowSettings:
        """The connection, with credentials taken out of the URLs."""
        from mlops_lifecycle.urls import split_userinfo, without_userinfo

        uri, token, ui, login = self._connection_parts()
        uri, user, password = split_userinfo(uri)
        if login and not self._on_databricks(uri):  # login + password: basic auth, not a token
            user, password, token = login, token, None
        return MlflowSettings(uri, token, without_userinfo(ui) if ui else None, user, password)

    def _connection_parts(self) -> tuple[str, str | None, str | None, str | None]:
        conn = self.get_connection(self.mlflow_conn_id)
        extra = conn.extra_dejson
        uri = extra.get("tracking_uri")
        if not uri:
            if not conn.host:
                raise LifecycleError(
                    f"Connection '{self.mlflow_conn_id}' needs a host or extra.tracking_uri for MLflow"
                )
            host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
            uri = f"{host}:{conn.port}" if conn.port else host
        if self._on_databricks(uri):
            if not conn.host or not conn.password:
                raise LifecycleError(
                    f"Connection '{self.mlflow_conn_id}': tracking_uri {uri} needs host (the workspace URL) and "
                    "password (a Databricks token)"
                )
            workspace = conn.host if "://" in conn.host else f"https://{conn.host}"
            return uri, conn.password, extra.get("ui_url") or workspace.rstrip("/"), None
        ui = extra.get("ui_url") or (uri if uri.startswith(("http://", "https://")) else None)
        return uri, conn.password or None, ui, conn.login or None

    @staticmethod
    def _on_databricks(uri: str) -> bool:
        return uri == "databricks" or uri.startswith("databricks://")

    @property
    def tracks_on_databricks(self) -> bool:
        """MLflow of a Databricks workspace: a cluster there reaches it without our URI or token."""
        return self._on_databricks(self.tracking_uri)

    def _token_env(self) -> dict[str, str]:
        s = self._connection_settings
        basic = {}
        if s.user is not None:
            basic = {"MLFLOW_TRACKING_USERNAME": s.user, "MLFLOW_TRACKING_PASSWORD": s.password or ""}
        token = s.token
        if not token:
            return basic
        if self._on_databricks(s.uri):
            return {"DATABRICKS_HOST": s.ui or "", "DATABRICKS_TOKEN": token}
        return {"MLFLOW_TRACKING_TOKEN": token, **basic}

    @property
    def tracking_uri(self) -> str:
        return self._connection_settings.uri

    def process_env(self) -> dict[str, str]:
        """Environment for a child process (training, service) to reach the same MLflow."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **self._token_env()}

    @cached_property
    def client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        os.environ.update(self._token_env())
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # links -----------------------------------------------------------------------------------
    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        ui = self._connection_settings.ui
        if ui and self.tracks_on_databricks:
            return f"{ui}/ml/experiments/{experiment_id}/runs/{run_id}"
        return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if ui else None

    def model_version_url(self, name: str, version: str) -> str | None:
        ui = self._connection_settings.ui
        if ui and self.tracks_on_databricks:
            return f"{ui}/ml/models/{quote(name)}/versions/{version}"
        return f"{ui.rstrip('/')}/#/models/{quote(name)}/versions/{version}" if ui else None

    # tracking ---------------------------------------------------------------------------------
    def find_run(self, experiment: str, run_key: str, status: str = "FINISHED") -> Run | None:
        """The newest run of ``experiment`` tagged with ``run_key`` in ``status``, if any."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = self.client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and attributes.status = '{status}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    # registry ---------------------------------------------------------------------------------
    def alias_version(self, name: str, alias: str) -> str | None:
        """Version the alias points to, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def aliases(self, name: str) -> dict[str, str]:
        """All aliases of a registered model: {alias: version}."""
        return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags)

    def expect_alias(self, name: str, alias: str, expected: str | None, target: str) -> str | None:
        """Read ``alias``; raise :class:`RegistryConflict` unless it is at ``expected`` or already at ``target``."""
        current = self.alias_version(name, alias)
        if current not in (expected, target):
            raise RegistryConflict(
                f"Registered model '{name}': alias '{alias}' points to v{current}, expected "
                f"v{expected}; someone moved it since this run read it. Nothing was changed: re-run the "
                "lifecycle to gate against the new state."
            )
        return current

    def move_alias(self, name: str, alias: str, version: str, expected: str | None) -> bool:
        """Compare-and-set: move ``alias`` to ``version`` only if it still points to ``expected``.

        Returns False when the alias already points to ``version`` (a retry: nothing to do).
        Raises :class:`RegistryConflict` when it points somewhere unexpected.
        """
        current = self.expect_alias(name, alias, expected, version)
        if current == version:
            return False
        self.client.set_registered_model_alias(name, alias, version)
        after = self.alias_version(name, alias)
        if after != version:
            raise RegistryConflict(
                f"Registered model '{name}': alias '{alias}' moved to v{after} while this run set it to v{version}"
            )
        self.log.info(
            "Registered model '%s': alias '%s' %s -> v%s", name, alias, f"v{current}" if current else "(none)", version
        )
        return True

    def record_event(self, name: str, version: str, event: dict[str, Any]) -> dict[str, Any]:
        """Append ``event`` (with ``event`` and ``by`` keys) to the version's audit events (``mlops_lifecycle.audit``).

        A retry of the step finds the event it recorded first (the latest one) and returns that, so what
        was recorded before an alias moved (``from``) survives any number of retries.
        """
        import json

        from mlops_lifecycle.audit import next_event_tag, retried_event

        tags = self.version_tags(name, version)
        recorded = retried_event(tags, event["event"], event["by"])
        if recorded is not None:
            return recorded
        self.client.set_model_version_tag(name, version, next_event_tag(tags), json.dumps(event, sort_keys=True))
        self.log.info("Audit %s v%s: %s", name, version, event)
        return event

    def add_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        """Append-only audit tags: write keys that are not there yet, never rewrite one that is.

        A retry re-sends the same tags (timestamps included): the first write wins and a differing
        value is logged, not applied, so the record keeps what happened first.
        """
        existing = self.version_tags(name, version)
        for key, value in tags.items():
            value = str(value)
            if key in existing:
                if existing[key] != value:
                    self.log.info("Audit tag %s of %s v%s already recorded; keeping it", key, name, version)
                continue
            self.client.set_model_version_tag(name, version, key, value)
