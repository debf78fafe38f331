"""housekeeping: what a line accumulates is bounded, and nothing an audit record names is ever deleted.

Every lifecycle run trains and registers a version, writes a snapshot and may build a model package;
without this they grow forever. After each promotion (so a failed run deletes nothing, and a streak of
rejected candidates is tidied at the next promotion) the line keeps (``retention`` in the YAML):

- registered versions: those an alias points to (production, staging, previous production), those with
  an audit record (``audit.event.*``: staged, promoted, replaced...), and the newest
  ``retention.keep_candidates``; the others (gate-rejected candidates, long superseded) are deleted from
  the registry. Their MLflow runs (params, metrics, model files) stay in the experiment;
- snapshots (local parquet files of this line): those a kept version's run or any audit record names,
  and any younger than ``retention.snapshot_days``;
- local model packages and service logs (``services/<line>-v<N>.log``): those of kept versions;
- BigQuery snapshot tables (which expire ``snapshot_days`` after they are written): every one a kept
  version or an audit record names has its expiration taken off.

Each deletion is logged with its reason. A backfill (a backtest) never runs it.
"""

from __future__ import annotations

import re
import shutil
import time
from typing import TYPE_CHECKING, Any

from mlops_lifecycle import paths
from mlops_lifecycle.audit import EVENT_PREFIX
from mlops_lifecycle.operators.base import LifecycleOperator

if TYPE_CHECKING:
    from pathlib import Path

    from airflow.sdk import Context


class HousekeepingOperator(LifecycleOperator):
    """Delete the line's registered versions, snapshots and packages that retention no longer keeps."""

    ui_color = "#eeeeee"

    def execute(self, context: Context) -> dict[str, Any]:
        kept, deleted = self.registered_versions()
        snapshots = self.local_snapshots(kept)
        packages = self.local_packages({v for v, _ in kept})
        pinned = self.bigquery_snapshots(kept) if self.config.extract.warehouse == "bigquery" else []
        summary = {
            "versions_kept": sorted((v for v, _ in kept), key=int),
            "versions_deleted": deleted,
            "snapshots_deleted": snapshots,
            "packages_deleted": packages,
            "bigquery_snapshots_kept": pinned,
        }
        self.log.info(
            "Housekeeping of %s: kept %d registered version(s), deleted %d; deleted %d snapshot(s), %d package(s)",
            self.config.model_line,
            len(kept),
            len(deleted),
            len(snapshots),
            len(packages),
        )
        return summary

    # --- registry -----------------------------------------------------------------------------------
    def registered_versions(self) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
        """(kept versions with their run tags, deleted version numbers)."""
        reg, name = self.registry, self.config.registry.model_name
        versions = sorted(reg.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        if not versions:
            return [], []
        aliased = set(reg.aliases(name).values())
        newest = {str(v.version) for v in versions[-self.config.retention.keep_candidates :]}
        kept, deleted = [], []
        for found in versions:
            version = str(found.version)
            audited = any(key.startswith(EVENT_PREFIX) for key in found.tags)
            why = "an alias" if version in aliased else "its audit record" if audited else None
            why = why or ("one of the newest" if version in newest else None)
            if why:
                kept.append((version, self.run_tags(found.run_id) | dict(found.tags)))
                continue
            self.log.info(
                "Deleting %s v%s from the registry (no alias, no audit record, not among the newest %d; "
                "its MLflow run %s stays)",
                name,
                version,
                self.config.retention.keep_candidates,
                found.run_id,
            )
            reg.client.delete_model_version(name, version)
            deleted.append(version)
        return kept, deleted

    def run_tags(self, run_id: str | None) -> dict[str, str]:
        if not run_id:
            return {}
        try:
            return dict(self.registry.get_run(run_id).data.tags)
        except Exception:  # noqa: BLE001 - a deleted run: nothing of it to keep
            return {}

    # --- local files --------------------------------------------------------------------------------
    def local_snapshots(self, kept: list[tuple[str, dict[str, str]]]) -> list[str]:
        """Delete this line's local snapshot files that nothing kept names, once older than snapshot_days."""
        folder = paths.local_home() / "warehouse" / "snapshots"
        named = self.named_snapshots(kept)
        cutoff = time.time() - self.config.retention.snapshot_days * 86400
        deleted = []
        for path in sorted(folder.glob(f"{self.config.model_line}__*.parquet")):
            if str(path) in named or path.stat().st_mtime > cutoff:
                continue
            self.log.info(
                "Deleting snapshot %s (older than %d days, named by no kept version or audit record)",
                path,
                self.config.retention.snapshot_days,
            )
            path.unlink(missing_ok=True)
            deleted.append(path.name)
        return deleted

    def named_snapshots(self, kept: list[tuple[str, dict[str, str]]]) -> set[str]:
        """Every snapshot URI a kept version's run or audit record names (every audited version is kept)."""
        named = {tags.get(key, "") for _, tags in kept for key in ("audit.snapshot", "lifecycle.snapshot")}
        return named - {""}

    def bigquery_snapshots(self, kept: list[tuple[str, dict[str, str]]]) -> list[str]:
        """Take the expiration off every named BigQuery snapshot table (BigQuery deletes the rest in time)."""
        from google.api_core.exceptions import NotFound

        from mlops_lifecycle.adapters.bigquery_snapshots import BigQuerySnapshots
        from mlops_lifecycle.config import ExtractBigQuery

        cfg = self.section(self.config.extract, ExtractBigQuery)
        client = BigQuerySnapshots(cfg.gcp_conn_id, cfg.project, cfg.location, self.log).client()
        pinned = []
        for uri in sorted(u for u in self.named_snapshots(kept) if u.startswith("bq://")):
            try:
                table = client.get_table(uri.removeprefix("bq://"))
            except NotFound:
                self.log.warning("Snapshot %s named by an audit record no longer exists", uri)
                continue
            if table.expires is not None:
                table.expires = None
                client.update_table(table, ["expires"])
                self.log.info("Snapshot %s is named by a kept version or audit record: it no longer expires", uri)
            pinned.append(uri)
        return pinned

    def local_packages(self, kept_versions: set[str]) -> list[str]:
        """Delete model packages (with their pin files) and service logs of versions no longer kept."""
        home: Path = paths.local_home()
        deleted = []
        prefix = f"{self.config.model_line}-v"
        for path in sorted([*(home / "packages").glob(f"{prefix}*"), *(home / "services").glob(f"{prefix}*.log")]):
            version = re.match(r"\d*", path.name.removeprefix(prefix)).group()  # type: ignore[union-attr]
            if not version or version in kept_versions:
                continue
            self.log.info("Deleting %s (v%s is no longer kept)", path, version)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            deleted.append(path.name)
        return deleted
