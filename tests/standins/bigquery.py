"""A local BigQuery REST v2 stand-in on DuckDB, for the real google-cloud-bigquery client and the Google provider.

BigQuery tables ``project.dataset.table`` are DuckDB tables ``"<project>__<dataset>"."<table>"``; query
jobs run their SQL (BigQuery dialect, standard SQL) transpiled with sqlglot, with the fully qualified
table references (backticks or not, ``dataset.table`` with the job's project, or bare names with a
``defaultDataset``) rewritten to those DuckDB tables. Query parameters (``@name``, ``?``) are bound.

Jobs (``jobs.insert``): RUNNING for ``job_seconds``, then the SQL runs once and the job is DONE; the
result goes to the destination table per ``writeDisposition`` (WRITE_TRUNCATE, WRITE_APPEND, WRITE_EMPTY
— the API default) and ``createDisposition``. A job id already used in the project and location is a
409 ``duplicate``; a job is found with its location or with none given. A SQL error ends the job with
``errorResult.reason`` ``invalidQuery``, a missing table or dataset (or one in another location) with
``notFound``; ``jobs.cancel`` of a RUNNING job ends it ``stopped`` without running the SQL. Error answers
are in Google's format, so the client raises ``Conflict``/``NotFound``/``BadRequest``. ``query_executions``
counts the SQL that reached DuckDB; ``jobs`` holds every job by (project, location, job id), in memory.

Credentials without patching: ``POST /token`` is an OAuth2 token endpoint for service-account JWTs signed
by a key from :meth:`BigQueryStandIn.service_account_info` (whose ``token_uri`` points here). With
``require_auth=True`` the API answers 401 unless the request carries a token it issued.

How the clients find it (they read ``BIGQUERY_EMULATOR_HOST`` differently):

- google-cloud-bigquery uses the value as the API endpoint, scheme included: ``BIGQUERY_EMULATOR_HOST=
  http://127.0.0.1:PORT`` (:attr:`BigQueryStandIn.emulator_host`); that covers the provider's
  ``BigQueryHook``, ``BigQueryInsertJobOperator`` and ``BigQueryInsertJobTrigger.run`` (the trigger polls
  through the sync hook);
- gcloud-aio-bigquery builds ``http://{value}/bigquery/v2``, so it needs ``127.0.0.1:PORT``
  (:attr:`BigQueryStandIn.aio_emulator_host`) and then sends no credentials. In the provider it is used only
  by ``BigQueryAsyncHook.cancel_job`` (the trigger's ``on_kill``) and ``get_job_output``: with one process
  environment, only one of the two sides can be pointed here.

Usage::

    standin = BigQueryStandIn(project="test-project").start()
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", standin.emulator_host)
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", standin.airflow_connection_json())
    standin.load_table("test-project.sales.orders", frame)  # creates dataset ``sales`` (US) if needed

Streaming inserts (``tabledata.insertAll``) append rows, dropping a repeated ``insertId``.

Control: ``create_dataset``, ``load_table`` (DataFrame or parquet file/folder), ``finish_job`` (run a RUNNING
job now), ``inject`` (faults, from the base). Inspection: ``table_rows``/``table_frame``/``table_exists``,
``jobs``/``job(id)``/``wait_job``, ``query_executions``, ``tokens`` (issued access tokens -> client_email).
With ``database`` (a DuckDB file) datasets and tables survive a new instance; jobs do not.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import json
import math
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .base import Request, Response, StandIn

API = "/bigquery/v2"
P = r"/projects/(?P<project>[^/]+)"
JOB_RESULTS_SCHEMA = "_standin_jobs"
META_SCHEMA = "_standin"
DEFAULT_LOCATION = "US"
DEFAULT_PAGE_ROWS = 10_000
MAX_WAIT_MS = 10_000  # getQueryResults hangs at most this long for a running job (BigQuery's default)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    500: "INTERNAL",
}
# the HTTP status getQueryResults answers with for a job that failed with this reason
_REASON_STATUS = {"invalidQuery": 400, "invalid": 400, "notFound": 404, "duplicate": 409, "stopped": 400}

# DuckDB column type -> BigQuery (legacy names, as the API reports them)
_BQ_TYPES = [
    (
        re.compile(r"^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|UHUGEINT)$"),
        "INTEGER",
    ),
    (re.compile(r"^(FLOAT|REAL|DOUBLE)$"), "FLOAT"),
    (re.compile(r"^DECIMAL\((\d+),(\d+)\)$"), "NUMERIC"),
    (re.compile(r"^(VARCHAR|UUID|ENUM.*)$"), "STRING"),
    (re.compile(r"^BOOLEAN$"), "BOOLEAN"),
    (re.compile(r"^DATE$"), "DATE"),
    (re.compile(r"^TIME$"), "TIME"),
    (re.compile(r"^TIMESTAMP WITH TIME ZONE$"), "TIMESTAMP"),
    (re.compile(r"^TIMESTAMP(_NS|_MS|_S)?$"), "DATETIME"),  # naive: BigQuery's DATETIME
    (re.compile(r"^BLOB$"), "BYTES"),
    (re.compile(r"^JSON$"), "JSON"),
]
# BigQuery type (tables.insert schema) -> DuckDB
_DUCK_TYPES = {
    "INTEGER": "BIGINT",
    "INT64": "BIGINT",
    "FLOAT": "DOUBLE",
    "FLOAT64": "DOUBLE",
    "NUMERIC": "DECIMAL(38,9)",
    "BIGNUMERIC": "DECIMAL(38,9)",
    "STRING": "VARCHAR",
    "BYTES": "BLOB",
    "BOOLEAN": "BOOLEAN",
    "BOOL": "BOOLEAN",
    "DATE": "DATE",
    "DATETIME": "TIMESTAMP",
    "TIMESTAMP": "TIMESTAMPTZ",
    "TIME": "TIME",
    "JSON": "VARCHAR",
}


class ApiError(Exception):
    """An error answer in Google's format (``google.api_core.exceptions.from_http_response`` reads it)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def response(self) -> Response:
        return Response(
            self.status,
            {
                "error": {
                    "code": self.status,
                    "message": self.message,
                    "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
                    "status": _STATUS_NAMES.get(self.status, "UNKNOWN"),
                }
            },
        )


class JobFailed(Exception):
    """The job ends DONE with this ``errorResult``."""

    def __init__(self, reason: str, message: str, location: str | None = None) -> None:
        super().__init__(message)
        self.error = {"reason": reason, "message": message, **({"location": location} if location else {})}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _flag(value: Any) -> bool:
    return str(value).lower() in ("true", "1")


@dataclass
class Dataset:
    project: str
    dataset: str
    location: str
    labels: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    created_ms: int = field(default_factory=_now_ms)
    modified_ms: int = field(default_factory=_now_ms)


@dataclass
class TableMeta:
    project: str
    dataset: str
    table: str
    labels: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    created_ms: int = field(default_factory=_now_ms)
    modified_ms: int = field(default_factory=_now_ms)
    expiration_ms: int | None = None  # BigQuery deletes the table at this time


@dataclass
class Job:
    """A query job; ``resource()`` is its ``jobs.get`` representation."""

    project: str
    location: str
    job_id: str
    configuration: dict[str, Any]
    user_email: str
    state: str = "RUNNING"
    created_ms: int = field(default_factory=_now_ms)
    started_ms: int | None = None
    ended_ms: int | None = None
    error_result: dict[str, Any] | None = None
    result_table: str | None = None  # DuckDB table holding the query's rows
    schema: list[dict[str, Any]] = field(default_factory=list)
    total_rows: int = 0
    total_bytes: int = 0
    timer: threading.Timer | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.project, self.location, self.job_id)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.configuration.get("labels") or {})

    @property
    def reference(self) -> dict[str, str]:
        return {"projectId": self.project, "jobId": self.job_id, "location": self.location}

    def resource(self, base_url: str) -> dict[str, Any]:
        status: dict[str, Any] = {"state": self.state}
        if self.error_result:
            status["errorResult"] = self.error_result
            status["errors"] = [self.error_result]
        statistics: dict[str, Any] = {"creationTime": str(self.created_ms)}
        if self.started_ms is not None:
            statistics["startTime"] = str(self.started_ms)
        if self.state == "DONE":
            statistics["endTime"] = str(self.ended_ms)
            statistics["totalBytesProcessed"] = str(self.total_bytes)
            statistics["query"] = {
                "totalBytesProcessed": str(self.total_bytes),
                "totalBytesBilled": str(self.total_bytes),
                "totalSlotMs": str(max(1, (self.ended_ms or 0) - (self.started_ms or 0))),
                "cacheHit": False,
                "statementType": "SELECT",
            }
        return {
            "kind": "bigquery#job",
            "etag": f'"{self.state}-{self.ended_ms}"',
            "id": f"{self.project}:{self.location}.{self.job_id}",
            "selfLink": f"{base_url}{API}/projects/{self.project}/jobs/{self.job_id}?location={self.location}",
            "user_email": self.user_email,
            "jobReference": self.reference,
            "configuration": {**self.configuration, "jobType": "QUERY"},
            "statistics": statistics,
            "status": status,
        }


class BigQueryStandIn(StandIn):
    """BigQuery REST v2 (datasets, tables, tabledata.list, query jobs) over DuckDB, plus an OAuth2 token endpoint."""

    name = "bigquery"

    def __init__(
        self,
        project: str = "test-project",
        job_seconds: float = 0.3,
        database: Path | None = None,
        require_auth: bool = False,
    ) -> None:
        super().__init__()
        import duckdb

        self.project = project
        self.job_seconds = job_seconds
        self.database = database
        self.require_auth = require_auth
        self.jobs: dict[tuple[str, str, str], Job] = {}
        self.query_executions = 0
        self.inserted_rows = 0  # rows written by tabledata.insertAll (duplicates of a seen insertId not counted)
        self._insert_ids: dict[tuple[str, str, str], set[str]] = {}
        self.tokens: dict[str, str] = {}  # access token -> client_email
        self._changed = threading.Condition(self.lock)
        self._datasets: dict[tuple[str, str], Dataset] = {}
        self._tables: dict[tuple[str, str, str], TableMeta] = {}
        self._keys: dict[str, tuple[str, str, str]] = {}  # client_email -> (key id, private PEM, public PEM)
        self._result_seq = 0
        self._db = duckdb.connect(str(database) if database else ":memory:")
        self._db.execute("SET TimeZone = 'UTC'")
        # jobs live in memory only: results left in a database file by an earlier instance are dropped
        self._db.execute(f"DROP SCHEMA IF EXISTS {_q(JOB_RESULTS_SCHEMA)} CASCADE")
        for schema in (JOB_RESULTS_SCHEMA, META_SCHEMA):
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(schema)}")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {_q(META_SCHEMA)}.meta (kind VARCHAR, body VARCHAR)")
        self._load_meta()

        self.route("POST", "/token", self._token)
        api = self._api
        api("POST", f"{P}/jobs", self._insert_job)
        api("GET", f"{P}/jobs", self._list_jobs)
        api("GET", f"{P}/jobs/(?P<job_id>[^/]+)", self._get_job)
        api("POST", f"{P}/jobs/(?P<job_id>[^/]+)/cancel", self._cancel_job)
        api("DELETE", f"{P}/jobs/(?P<job_id>[^/]+)/delete", self._delete_job)
        api("POST", f"{P}/queries", self._query)
        api("GET", f"{P}/queries/(?P<job_id>[^/]+)", self._get_query_results)
        api("GET", f"{P}/datasets", self._list_datasets)
        api("POST", f"{P}/datasets", self._insert_dataset)
        api("GET", f"{P}/datasets/(?P<dataset>[^/]+)", self._get_dataset)
        api("DELETE", f"{P}/datasets/(?P<dataset>[^/]+)", self._delete_dataset)
        api("GET", f"{P}/datasets/(?P<dataset>[^/]+)/tables", self._list_tables)
        api("POST", f"{P}/datasets/(?P<dataset>[^/]+)/tables", self._insert_table)
        api("GET", f"{P}/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", self._get_table)
        api("DELETE", f"{P}/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", self._delete_table)
        api("PATCH", f"{P}/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)", self._patch_table)
        api("GET", f"{P}/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)/data", self._list_rows)
        api("POST", f"{P}/datasets/(?P<dataset>[^/]+)/tables/(?P<table>[^/]+)/insertAll", self._insert_all)

    # -- lifecycle, addresses, credentials -----------------------------------------------------
    def stop(self) -> None:
        with self.lock:
            for job in self.jobs.values():
                if job.timer is not None:
                    job.timer.cancel()
        super().stop()
        with self.lock:
            self._db.close()

    @property
    def emulator_host(self) -> str:
        """``BIGQUERY_EMULATOR_HOST`` for google-cloud-bigquery (and so the provider's sync hook and trigger)."""
        return self.url

    @property
    def aio_emulator_host(self) -> str:
        """``BIGQUERY_EMULATOR_HOST`` for gcloud-aio-bigquery, which prepends ``http://`` itself."""
        return f"127.0.0.1:{self.port}"

    def service_account_info(self, client_email: str | None = None) -> dict[str, str]:
        """A service-account key (RSA, generated here) whose ``token_uri`` is this stand-in's ``/token``."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        email = client_email or f"standin@{self.project}.iam.gserviceaccount.com"
        with self.lock:
            if email not in self._keys:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                private = key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode()
                public = (
                    key.public_key()
                    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                    .decode()
                )
                self._keys[email] = (secrets.token_hex(20), private, public)
            key_id, private, _ = self._keys[email]
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key_id,
            "private_key": private,
            "client_email": email,
            "client_id": str(100_000_000_000 + len(self._keys)),
            "auth_uri": f"{self.url}/auth",
            "token_uri": f"{self.url}/token",
            "universe_domain": "googleapis.com",
        }

    def service_account_file(self, path: Path, client_email: str | None = None) -> Path:
        """Write :meth:`service_account_info` as a JSON key (for ``key_path`` or GOOGLE_APPLICATION_CREDENTIALS)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.service_account_info(client_email), indent=2))
        return path

    def airflow_connection_json(self, key_path: Path | None = None, **extra: Any) -> str:
        """A ``google_cloud_platform`` connection: ``key_path`` if given, else the key inline (``keyfile_dict``)."""
        credentials = {"key_path": str(key_path)} if key_path else {"keyfile_dict": self.service_account_info()}
        return json.dumps(
            {
                "conn_type": "google_cloud_platform",
                "extra": {"project": self.project, "use_legacy_sql": False, **credentials, **extra},
            }
        )

    # -- control and inspection for tests ------------------------------------------------------
    def create_dataset(self, dataset: str, location: str = DEFAULT_LOCATION, project: str | None = None) -> None:
        project = project or self.project
        with self.lock:
            if (project, dataset) not in self._datasets:
                self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self._schema(project, dataset))}")
                self._datasets[(project, dataset)] = Dataset(project, dataset, location)
                self._save_meta()

    def load_table(self, fqn: str, data: Any, labels: dict[str, str] | None = None) -> int:
        """Replace ``project.dataset.table`` with a DataFrame or parquet file/folder/glob; returns the row count.

        The dataset is created (location US) when missing.
        """
        project, dataset, table = self._split(fqn)
        self.create_dataset(dataset, project=project)
        target = f"{_q(self._schema(project, dataset))}.{_q(table)}"
        with self.lock:
            if isinstance(data, (str, Path)):
                source = Path(data)
                pattern = str(source / "*.parquet") if source.is_dir() else str(source)
                self._db.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM read_parquet(?)", [pattern])
            else:
                self._db.register("_standin_load", data)
                try:
                    self._db.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM _standin_load")
                finally:
                    self._db.unregister("_standin_load")
            self._tables[(project, dataset, table)] = TableMeta(project, dataset, table, dict(labels or {}))
            self._save_meta()
            return self._db.execute(f"SELECT count(*) FROM {target}").fetchall()[0][0]

    def table_rows(self, fqn: str) -> list[dict[str, Any]]:
        """The table's rows as dicts of Python values, in stored order."""
        project, dataset, table = self._split(fqn)
        with self.lock:
            self._require_table(project, dataset, table)
            cursor = self._db.execute(f"SELECT * FROM {_q(self._schema(project, dataset))}.{_q(table)} ORDER BY rowid")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def table_frame(self, fqn: str) -> Any:
        """The table as a pandas DataFrame."""
        project, dataset, table = self._split(fqn)
        with self.lock:
            self._require_table(project, dataset, table)
            return self._db.execute(
                f"SELECT * FROM {_q(self._schema(project, dataset))}.{_q(table)} ORDER BY rowid"
            ).df()

    def table_exists(self, fqn: str) -> bool:
        with self.lock:
            return self._split(fqn) in self._tables

    def dataset_location(self, dataset: str, project: str | None = None) -> str | None:
        with self.lock:
            found = self._datasets.get((project or self.project, dataset))
            return found.location if found else None

    def job(self, job_id: str, project: str | None = None) -> Job:
        """The job with this id (any location)."""
        with self.lock:
            matches = [j for j in self.jobs.values() if j.job_id == job_id and j.project == (project or self.project)]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} jobs with id {job_id}")
        return matches[0]

    def finish_job(self, job_id: str) -> Job:
        """Run a RUNNING job now instead of when its ``job_seconds`` are up (no-op once it is DONE)."""
        with self.lock:
            job = self.job(job_id)
            if job.state == "RUNNING":
                if job.timer is not None:
                    job.timer.cancel()
                self._run(job)
            return job

    def wait_job(self, job_id: str, timeout: float = 10.0) -> Job:
        """Block until the job is DONE."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.job(job_id).state != "DONE":
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"job {job_id} still {self.job(job_id).state} after {timeout} s")
                self._changed.wait(left)
            return self.job(job_id)

    # -- plumbing --------------------------------------------------------------------------------
    def _api(self, method: str, pattern: str, handler: Any) -> None:
        def wrapped(req: Request, **groups: str) -> Response:
            try:
                user = self._authenticate(req)
                return handler(req, user=user, **groups)
            except ApiError as exc:
                return exc.response()

        self.route(method, API + pattern, wrapped)

    def _authenticate(self, req: Request) -> str:
        header = req.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        with self.lock:
            email = self.tokens.get(token)
        if email is None and token.count(".") == 2:
            email = self._verify_jwt(token, audience=None)  # a self-signed JWT used as the bearer
        if email is None and self.require_auth:
            raise ApiError(
                401,
                "authError" if token else "required",
                "Request had invalid authentication credentials."
                if token
                else "Request is missing required authentication credential.",
            )
        return email or f"anonymous@{self.project}.iam.gserviceaccount.com"

    def _verify_jwt(self, assertion: str, audience: list[str] | None) -> str | None:
        from google.auth import jwt

        try:
            claims = jwt.decode(assertion, verify=False)
        except ValueError:
            return None
        with self.lock:
            known = self._keys.get(claims.get("iss", ""))
        if known is None:
            return None
        try:
            jwt.decode(assertion, certs=known[2], audience=audience, verify=True)
        except ValueError:
            return None
        return claims["iss"]

    def _token(self, req: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
        if form.get("grant_type") != JWT_BEARER or not form.get("assertion"):
            return Response(400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."})
        # google-auth signs for Google's token endpoint whatever token_uri it posts to; gcloud-aio-auth for token_uri
        email = self._verify_jwt(form["assertion"], audience=[f"{self.url}/token", GOOGLE_TOKEN_URI])
        if email is None:
            return Response(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        token = f"ya29.standin-{secrets.token_urlsafe(24)}"
        with self.lock:
            self.tokens[token] = email
        return Response(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    @staticmethod
    def _schema(project: str, dataset: str) -> str:
        return f"{project}__{dataset}"

    def _split(self, fqn: str) -> tuple[str, str, str]:
        parts = fqn.replace(":", ".").strip("`").split(".")
        if len(parts) == 2:
            parts = [self.project, *parts]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"expected project.dataset.table, got {fqn!r}")
        return parts[0], parts[1], parts[2]

    def _require_dataset(self, project: str, dataset: str, location: str | None = None) -> Dataset:
        found = self._datasets.get((project, dataset))
        if found is None or (location and found.location.lower() != location.lower()):
            where = f" was not found in location {location}" if location else ""
            raise ApiError(404, "notFound", f"Not found: Dataset {project}:{dataset}{where}")
        return found

    def _require_table(self, project: str, dataset: str, table: str) -> TableMeta:
        self._require_dataset(project, dataset)
        found = self._tables.get((project, dataset, table))
        if found is not None and found.expiration_ms is not None and found.expiration_ms <= _now_ms():
            self._db.execute(f"DROP TABLE {_q(self._schema(project, dataset))}.{_q(table)}")  # expired
            del self._tables[(project, dataset, table)]
            found = None
        if found is None:
            raise ApiError(404, "notFound", f"Not found: Table {project}:{dataset}.{table}")
        return found

    def _save_meta(self) -> None:
        rows = [("dataset", json.dumps(dataclasses.asdict(d))) for d in self._datasets.values()]
        rows += [("table", json.dumps(dataclasses.asdict(t))) for t in self._tables.values()]
        self._db.execute(f"DELETE FROM {_q(META_SCHEMA)}.meta")
        if rows:
            self._db.executemany(f"INSERT INTO {_q(META_SCHEMA)}.meta VALUES (?, ?)", rows)

    def _load_meta(self) -> None:
        for kind, body in self._db.execute(f"SELECT kind, body FROM {_q(META_SCHEMA)}.meta").fetchall():
            values = json.loads(body)
            if kind == "dataset":
                self._datasets[(values["project"], values["dataset"])] = Dataset(**values)
            else:
                self._tables[(values["project"], values["dataset"], values["table"])] = TableMeta(**values)

    def _find_job(self, project: str, job_id: str, location: str | None) -> Job:
        for job in self.jobs.values():
            if job.project == project and job.job_id == job_id:
                if not location or job.location.lower() == location.lower():
                    return job
        where = f"{location}." if location else ""
        raise ApiError(404, "notFound", f"Not found: Job {project}:{where}{job_id}")

    # -- SQL ---------------------------------------------------------------------------------------
    def _translate(
        self, sql: str, project: str, default_dataset: dict[str, str] | None
    ) -> tuple[str, list[tuple[str, str, str]]]:
        """BigQuery SQL -> (DuckDB SQL, referenced tables); raises JobFailed(invalidQuery)."""
        import sqlglot
        from sqlglot import exp

        try:
            statements = [s for s in sqlglot.parse(sql, read="bigquery") if s is not None]
        except sqlglot.errors.ParseError as exc:
            first = exc.errors[0] if exc.errors else {}
            where = f" at [{first.get('line')}:{first.get('col')}]" if first.get("line") else ""
            raise JobFailed("invalidQuery", f"Syntax error: {first.get('description', exc)}{where}", "query") from None
        except sqlglot.errors.SqlglotError as exc:
            raise JobFailed("invalidQuery", f"Syntax error: {exc}", "query") from None
        unsupported = (exp.DML, exp.DDL, exp.Command, exp.Merge, exp.Drop, exp.Alter)
        if len(statements) != 1 or isinstance(statements[0], unsupported):
            raise JobFailed(
                "invalidQuery",
                "The stand-in runs one query (SELECT) per job: DML, DDL and scripts are not supported",
                "query",
            )
        tree = statements[0]  # anything else that is not a query fails in DuckDB with its syntax error
        ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
        refs: list[tuple[str, str, str]] = []
        for table in list(tree.find_all(exp.Table)):
            name = table.name
            if not name:
                continue
            if table.db:
                ref = (table.catalog or project, table.db, name)
            elif name in ctes:
                continue
            elif default_dataset:
                ref = (default_dataset.get("projectId") or project, default_dataset["datasetId"], name)
            else:
                raise JobFailed(
                    "invalidQuery", f'Table "{name}" must be qualified with a dataset (e.g. dataset.table).', "query"
                )
            if "INFORMATION_SCHEMA" in (ref[1].upper(), ref[2].upper()):
                raise JobFailed("invalidQuery", "INFORMATION_SCHEMA is not supported by the stand-in", "query")
            refs.append(ref)
            table.set("catalog", None)
            table.set("db", exp.to_identifier(self._schema(ref[0], ref[1]), quoted=True))
            table.set("this", exp.to_identifier(ref[2], quoted=True))
        # BigQuery's DATE_ADD/DATE_SUB/DATE_TRUNC return a DATE; DuckDB's date arithmetic a TIMESTAMP
        tree = tree.transform(
            lambda node: (
                exp.cast(node, exp.DataType.build("date"))
                if isinstance(node, (exp.DateAdd, exp.DateSub, exp.DateTrunc)) and not isinstance(node.parent, exp.Cast)
                else node
            )
        )
        return tree.sql(dialect="duckdb"), refs

    @staticmethod
    def _parameters(query: dict[str, Any]) -> dict[str, Any] | list[Any] | None:
        params = query.get("queryParameters") or []
        if not params:
            return None
        values = [
            (p.get("name"), _param_value(p.get("parameterType", {}), p.get("parameterValue", {}))) for p in params
        ]
        if query.get("parameterMode", "NAMED" if values[0][0] else "POSITIONAL").upper() == "POSITIONAL":
            return [v for _, v in values]
        return {name: v for name, v in values}

    def _bq_schema(self, relation: str) -> list[dict[str, Any]]:
        rows = self._db.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
        return [_bq_field(name, duck_type) for name, duck_type, *_ in rows]

    def _execute(self, job: Job) -> None:
        """Run the job's SQL once and write its destination; raises JobFailed."""
        query = job.configuration["query"]
        if _flag(query.get("useLegacySql", True)):
            raise JobFailed(
                "invalidQuery",
                "Legacy SQL is not supported by the stand-in (BigQuery's default when useLegacySql is not "
                "set): send useLegacySql: false",
                "query",
            )
        duck_sql, refs = self._translate(query.get("query", ""), job.project, query.get("defaultDataset"))
        for project, dataset, table in refs:
            try:
                self._require_dataset(project, dataset, job.location)
            except ApiError:
                raise JobFailed(
                    "notFound", f"Not found: Dataset {project}:{dataset} was not found in location {job.location}"
                ) from None
            if (project, dataset, table) not in self._tables:
                raise JobFailed(
                    "notFound", f"Not found: Table {project}:{dataset}.{table} was not found in location {job.location}"
                )
        destination = query.get("destinationTable")
        dest_meta: TableMeta | None = None
        if destination:
            d_project = destination.get("projectId") or job.project
            d_dataset, d_table = destination["datasetId"], destination["tableId"]
            try:
                self._require_dataset(d_project, d_dataset, job.location)
            except ApiError:
                raise JobFailed(
                    "notFound", f"Not found: Dataset {d_project}:{d_dataset} was not found in location {job.location}"
                ) from None
            dest_meta = self._tables.get((d_project, d_dataset, d_table))
            if dest_meta is None and query.get("createDisposition", "CREATE_IF_NEEDED") == "CREATE_NEVER":
                raise JobFailed("notFound", f"Not found: Table {d_project}:{d_dataset}.{d_table}")
        self._result_seq += 1
        result = f"{_q(JOB_RESULTS_SCHEMA)}.{_q(f'job_{self._result_seq}')}"
        self.query_executions += 1
        import duckdb

        self._db.execute("BEGIN TRANSACTION")
        try:
            try:
                self._db.execute(f"CREATE TABLE {result} AS {duck_sql}", self._parameters(query))
            except duckdb.Error as exc:
                raise JobFailed("invalidQuery", f"{type(exc).__name__}: {exc}", "query") from None
            if destination:
                self._write_destination(job, result, d_project, d_dataset, d_table, dest_meta)
            job.result_table = result
            job.schema = self._bq_schema(result)
            job.total_rows = self._db.execute(f"SELECT count(*) FROM {result}").fetchall()[0][0]
            job.total_bytes = 8 * job.total_rows * max(1, len(job.schema))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if destination:
            self._save_meta()

    def _write_destination(
        self, job: Job, result: str, project: str, dataset: str, table: str, meta: TableMeta | None
    ) -> None:
        import duckdb

        query = job.configuration["query"]
        disposition = query.get("writeDisposition", "WRITE_EMPTY")
        target = f"{_q(self._schema(project, dataset))}.{_q(table)}"
        if meta is not None and disposition == "WRITE_EMPTY":
            if self._db.execute(f"SELECT count(*) FROM {target}").fetchall()[0][0]:
                raise JobFailed("duplicate", f"Already Exists: Table {project}:{dataset}.{table}")
        if meta is not None and disposition == "WRITE_APPEND":
            try:
                self._db.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {result}")
            except duckdb.Error as exc:
                raise JobFailed("invalid", f"Cannot append to {project}:{dataset}.{table}: {exc}") from None
        else:
            self._db.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM {result}")
        props = query.get("destinationTableProperties") or {}
        now = _now_ms()
        if meta is None:
            meta = TableMeta(project, dataset, table, created_ms=now)
            self._tables[(project, dataset, table)] = meta
        meta.modified_ms = now
        if "labels" in props:
            meta.labels = dict(props["labels"])
        if "description" in props:
            meta.description = props["description"]
        if props.get("expirationTime") is not None:
            meta.expiration_ms = int(props["expirationTime"])

    def _rows(
        self, relation: str, schema: list[dict[str, Any]], start: int, count: int, int64_timestamps: bool
    ) -> list[dict[str, Any]]:
        if count <= 0:
            return []
        columns = [
            f"epoch_us({_q(f['name'])})" if f["type"] == "TIMESTAMP" and f["mode"] != "REPEATED" else _q(f["name"])
            for f in schema
        ]
        data = self._db.execute(
            f"SELECT {', '.join(columns)} FROM {relation} ORDER BY rowid LIMIT {int(count)} OFFSET {int(start)}"
        ).fetchall()
        return [
            {"f": [{"v": _cell(value, f, int64_timestamps)} for value, f in zip(row, schema, strict=True)]}
            for row in data
        ]

    def _page(self, req: Request, relation: str, schema: list[dict[str, Any]], total: int, body: dict | None = None):
        """(rows, next page token) for tabledata.list / getQueryResults paging arguments."""
        args = body or {}
        token = req.arg("pageToken") or args.get("pageToken")
        start = int(token) if token else int(req.arg("startIndex") or args.get("startIndex") or 0)
        max_results = req.arg("maxResults") if req.arg("maxResults") is not None else args.get("maxResults")
        count = DEFAULT_PAGE_ROWS if max_results is None else int(max_results)
        int64 = _flag(req.arg("formatOptions.useInt64Timestamp", "false")) or _flag(
            (args.get("formatOptions") or {}).get("useInt64Timestamp", False)
        )
        rows = self._rows(relation, schema, start, count, int64)
        end = start + len(rows)
        return rows, (str(end) if rows and end < total else None)

    # -- jobs ----------------------------------------------------------------------------------------
    def _new_job(self, project: str, body: dict[str, Any], user: str) -> Job:
        reference = body.get("jobReference") or {}
        configuration = body.get("configuration") or {}
        if "query" not in configuration:
            kinds = sorted(set(configuration) - {"labels", "dryRun", "jobTimeoutMs"})
            raise ApiError(400, "invalid", f"The stand-in runs query jobs only, got {kinds or 'no job type'}")
        job_id = reference.get("jobId") or f"job_{uuid.uuid4().hex}"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,1024}", job_id):
            raise ApiError(
                400,
                "invalid",
                f'Invalid job ID "{job_id}". Job IDs must be alphanumeric (plus underscores and dashes) '
                "and must be at most 1024 characters long.",
            )
        location = reference.get("location") or self._infer_location(project, configuration["query"])
        for existing in self.jobs.values():
            if (existing.project, existing.job_id) == (
                project,
                job_id,
            ) and existing.location.lower() == location.lower():
                raise ApiError(409, "duplicate", f"Already Exists: Job {project}:{existing.location}.{job_id}")
        return Job(project, location, job_id, json.loads(json.dumps(configuration)), user)

    def _infer_location(self, project: str, query: dict[str, Any]) -> str:
        candidates = []
        try:
            _, refs = self._translate(query.get("query", ""), project, query.get("defaultDataset"))
            candidates = [(p, d) for p, d, _ in refs]
        except JobFailed:
            pass
        if query.get("destinationTable"):
            dest = query["destinationTable"]
            candidates.append((dest.get("projectId") or project, dest.get("datasetId")))
        for key in candidates:
            if key in self._datasets:
                return self._datasets[key].location
        return DEFAULT_LOCATION

    def _run(self, job: Job) -> None:
        try:
            self._execute(job)
        except JobFailed as exc:
            job.error_result = exc.error
        job.state = "DONE"
        job.ended_ms = _now_ms()
        job.timer = None
        self._changed.notify_all()

    def _finish_later(self, key: tuple[str, str, str]) -> None:
        with self.lock:
            job = self.jobs.get(key)
            if job is not None and job.state == "RUNNING":
                self._run(job)

    def _insert_job(self, req: Request, user: str, project: str) -> Response:
        body = req.json() or {}
        with self.lock:
            job = self._new_job(project, body, user)
            if _flag(body.get("configuration", {}).get("dryRun", False)):
                return Response(200, self._dry_run(job))
            job.started_ms = _now_ms()
            self.jobs[job.key] = job
            if self.job_seconds > 0:
                job.timer = threading.Timer(self.job_seconds, self._finish_later, args=(job.key,))
                job.timer.daemon = True
                job.timer.start()
            else:
                self._run(job)
            return Response(200, job.resource(self.url))

    def _dry_run(self, job: Job) -> dict[str, Any]:
        try:
            self._translate(job.configuration["query"].get("query", ""), job.project, None)
        except JobFailed as exc:
            raise ApiError(400, exc.error["reason"], exc.error["message"]) from None
        job.state, job.started_ms, job.ended_ms = "DONE", _now_ms(), _now_ms()
        resource = job.resource(self.url)
        resource["jobReference"].pop("jobId", None)
        return resource

    def _list_jobs(self, req: Request, user: str, project: str) -> Response:
        states = {s.upper() for s in req.query.get("stateFilter", [])}
        with self.lock:
            found = [j for j in self.jobs.values() if j.project == project and (not states or j.state in states)]
            found.sort(key=lambda j: j.created_ms, reverse=True)
            start = int(req.arg("pageToken") or 0)
            size = int(req.arg("maxResults") or 1000)
            page = found[start : start + size]
            body: dict[str, Any] = {
                "kind": "bigquery#jobList",
                "jobs": [{**j.resource(self.url), "state": j.state} for j in page],
            }
            if start + size < len(found):
                body["nextPageToken"] = str(start + size)
            return Response(200, body)

    def _get_job(self, req: Request, user: str, project: str, job_id: str) -> Response:
        with self.lock:
            return Response(200, self._find_job(project, job_id, req.arg("location")).resource(self.url))

    def _cancel_job(self, req: Request, user: str, project: str, job_id: str) -> Response:
        with self.lock:
            job = self._find_job(project, job_id, req.arg("location"))
            if job.state != "DONE":
                if job.timer is not None:
                    job.timer.cancel()
                    job.timer = None
                job.error_result = {
                    "reason": "stopped",
                    "message": "Job execution was cancelled: User requested cancellation",
                }
                job.state, job.ended_ms = "DONE", _now_ms()
                self._changed.notify_all()
            return Response(200, {"kind": "bigquery#jobCancelResponse", "job": job.resource(self.url)})

    def _delete_job(self, req: Request, user: str, project: str, job_id: str) -> Response:
        with self.lock:
            job = self._find_job(project, job_id, req.arg("location"))
            if job.state != "DONE":
                raise ApiError(400, "invalid", f"Job {project}:{job.location}.{job_id} is not done: cancel it first")
            del self.jobs[job.key]
            return Response(204, b"")

    def _results_body(self, req: Request, job: Job, body: dict | None = None) -> dict[str, Any]:
        if job.error_result:
            reason = job.error_result["reason"]
            raise ApiError(_REASON_STATUS.get(reason, 400), reason, job.error_result["message"])
        rows, token = self._page(req, job.result_table or "", job.schema, job.total_rows, body)
        result: dict[str, Any] = {
            "kind": "bigquery#getQueryResultsResponse",
            "etag": f'"{job.job_id}"',
            "jobReference": job.reference,
            "schema": {"fields": job.schema},
            "totalRows": str(job.total_rows),
            "totalBytesProcessed": str(job.total_bytes),
            "jobComplete": True,
            "cacheHit": False,
        }
        if rows:
            result["rows"] = rows
        if token:
            result["pageToken"] = token
        return result

    def _get_query_results(self, req: Request, user: str, project: str, job_id: str) -> Response:
        wait_ms = min(int(req.arg("timeoutMs") or MAX_WAIT_MS), MAX_WAIT_MS)
        deadline = time.monotonic() + wait_ms / 1000
        with self._changed:
            job = self._find_job(project, job_id, req.arg("location"))
            while job.state != "DONE" and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            if job.state != "DONE":
                return Response(
                    200,
                    {"kind": "bigquery#getQueryResultsResponse", "jobReference": job.reference, "jobComplete": False},
                )
            return Response(200, self._results_body(req, job))

    def _query(self, req: Request, user: str, project: str) -> Response:
        """jobs.query: a job run at once; the answer carries the first page of rows."""
        body = req.json() or {}
        query = {
            k: body[k]
            for k in ("query", "useLegacySql", "defaultDataset", "queryParameters", "parameterMode")
            if k in body
        }
        request = {
            "jobReference": {"location": body.get("location")},
            "configuration": {"query": query, **({"labels": body["labels"]} if body.get("labels") else {})},
        }
        with self.lock:
            job = self._new_job(project, request, user)
            if _flag(body.get("dryRun", False)):
                return Response(200, {**self._dry_run(job), "kind": "bigquery#queryResponse"})
            job.started_ms = _now_ms()
            self.jobs[job.key] = job
            self._run(job)
            result = self._results_body(req, job, body)
            return Response(200, {**result, "kind": "bigquery#queryResponse", "queryId": job.job_id})

    # -- datasets and tables ---------------------------------------------------------------------
    def _dataset_resource(self, d: Dataset) -> dict[str, Any]:
        return {
            "kind": "bigquery#dataset",
            "etag": f'"{d.modified_ms}"',
            "id": f"{d.project}:{d.dataset}",
            "selfLink": f"{self.url}{API}/projects/{d.project}/datasets/{d.dataset}",
            "datasetReference": {"projectId": d.project, "datasetId": d.dataset},
            "location": d.location,
            "labels": d.labels,
            **({"description": d.description} if d.description else {}),
            "creationTime": str(d.created_ms),
            "lastModifiedTime": str(d.modified_ms),
            "type": "DEFAULT",
        }

    def _list_datasets(self, req: Request, user: str, project: str) -> Response:
        with self.lock:
            items = [
                {
                    k: v
                    for k, v in self._dataset_resource(d).items()
                    if k in ("kind", "id", "datasetReference", "labels", "location")
                }
                for d in self._datasets.values()
                if d.project == project
            ]
        return Response(200, {"kind": "bigquery#datasetList", "etag": '"list"', "datasets": items})

    def _insert_dataset(self, req: Request, user: str, project: str) -> Response:
        body = req.json() or {}
        dataset = (body.get("datasetReference") or {}).get("datasetId")
        if not dataset or not re.fullmatch(r"[A-Za-z0-9_]{1,1024}", dataset):
            raise ApiError(400, "invalid", f'Invalid dataset ID "{dataset}".')
        with self.lock:
            if (project, dataset) in self._datasets:
                raise ApiError(409, "duplicate", f"Already Exists: Dataset {project}:{dataset}")
            self.create_dataset(dataset, body.get("location") or DEFAULT_LOCATION, project)
            created = self._datasets[(project, dataset)]
            created.labels = dict(body.get("labels") or {})
            created.description = body.get("description")
            self._save_meta()
            return Response(200, self._dataset_resource(created))

    def _get_dataset(self, req: Request, user: str, project: str, dataset: str) -> Response:
        with self.lock:
            return Response(200, self._dataset_resource(self._require_dataset(project, dataset)))

    def _delete_dataset(self, req: Request, user: str, project: str, dataset: str) -> Response:
        with self.lock:
            self._require_dataset(project, dataset)
            tables = [k for k in self._tables if k[:2] == (project, dataset)]
            if tables and not _flag(req.arg("deleteContents", "false")):
                raise ApiError(400, "resourceInUse", f"Dataset {project}:{dataset} is still in use")
            self._db.execute(f"DROP SCHEMA {_q(self._schema(project, dataset))} CASCADE")
            for key in tables:
                del self._tables[key]
            del self._datasets[(project, dataset)]
            self._save_meta()
            return Response(204, b"")

    def _table_resource(self, t: TableMeta) -> dict[str, Any]:
        relation = f"{_q(self._schema(t.project, t.dataset))}.{_q(t.table)}"
        schema = self._bq_schema(relation)
        rows = self._db.execute(f"SELECT count(*) FROM {relation}").fetchall()[0][0]
        return {
            "kind": "bigquery#table",
            "etag": f'"{t.modified_ms}"',
            "id": f"{t.project}:{t.dataset}.{t.table}",
            "selfLink": f"{self.url}{API}/projects/{t.project}/datasets/{t.dataset}/tables/{t.table}",
            "tableReference": {"projectId": t.project, "datasetId": t.dataset, "tableId": t.table},
            "schema": {"fields": schema},
            "numRows": str(rows),
            "numBytes": str(8 * rows * max(1, len(schema))),
            "creationTime": str(t.created_ms),
            "lastModifiedTime": str(t.modified_ms),
            "type": "TABLE",
            "location": self._datasets[(t.project, t.dataset)].location,
            "labels": t.labels,
            **({"description": t.description} if t.description else {}),
            **({"expirationTime": str(t.expiration_ms)} if t.expiration_ms is not None else {}),
        }

    def _list_tables(self, req: Request, user: str, project: str, dataset: str) -> Response:
        with self.lock:
            self._require_dataset(project, dataset)
            tables = [
                {
                    "kind": "bigquery#table",
                    "id": f"{project}:{dataset}.{t.table}",
                    "tableReference": {"projectId": project, "datasetId": dataset, "tableId": t.table},
                    "type": "TABLE",
                    "labels": t.labels,
                    "creationTime": str(t.created_ms),
                }
                for key, t in sorted(self._tables.items())
                if key[:2] == (project, dataset)
            ]
        return Response(
            200, {"kind": "bigquery#tableList", "etag": '"list"', "tables": tables, "totalItems": len(tables)}
        )

    def _insert_table(self, req: Request, user: str, project: str, dataset: str) -> Response:
        body = req.json() or {}
        table = (body.get("tableReference") or {}).get("tableId")
        fields = (body.get("schema") or {}).get("fields") or []
        with self.lock:
            self._require_dataset(project, dataset)
            if not table:
                raise ApiError(400, "invalid", "tableReference.tableId is required")
            if (project, dataset, table) in self._tables:
                raise ApiError(409, "duplicate", f"Already Exists: Table {project}:{dataset}.{table}")
            if not fields:
                raise ApiError(400, "invalid", "The stand-in needs a schema to create a table")
            columns = []
            for f in fields:
                duck = _DUCK_TYPES.get(str(f.get("type", "")).upper())
                if duck is None:
                    raise ApiError(
                        400, "invalid", f"Field {f.get('name')}: type {f.get('type')} is not supported by the stand-in"
                    )
                columns.append(f"{_q(f['name'])} {duck}{'[]' if f.get('mode') == 'REPEATED' else ''}")
            self._db.execute(f"CREATE TABLE {_q(self._schema(project, dataset))}.{_q(table)} ({', '.join(columns)})")
            meta = TableMeta(project, dataset, table, dict(body.get("labels") or {}), body.get("description"))
            self._tables[(project, dataset, table)] = meta
            self._save_meta()
            return Response(200, self._table_resource(meta))

    def _insert_all(self, req: Request, user: str, project: str, dataset: str, table: str) -> Response:
        """tabledata.insertAll (streaming): rows as JSON objects of the table's columns; a row whose ``insertId``
        was seen before is dropped (BigQuery's best-effort de-duplication, exact here). Rows that do not fit
        the schema come back in ``insertErrors`` and none of the request is written, as with
        ``skipInvalidRows: false``."""
        body = req.json() or {}
        with self.lock:
            self._require_table(project, dataset, table)
            target = f"{_q(self._schema(project, dataset))}.{_q(table)}"
            columns = [row[0] for row in self._db.execute(f"DESCRIBE {target}").fetchall()]
            seen = self._insert_ids.setdefault((project, dataset, table), set())
            fresh, errors = [], []
            for index, row in enumerate(body.get("rows") or []):
                values = row.get("json") or {}
                unknown = sorted(set(values) - set(columns))
                if unknown:
                    problem = {"reason": "invalid", "message": f"no such field: {unknown[0]}"}
                    errors.append({"index": index, "errors": [problem]})
                    continue
                if row.get("insertId") in seen:
                    continue
                fresh.append((row.get("insertId"), [values.get(c) for c in columns]))
            if errors:
                return Response(200, {"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors})
            if fresh:
                marks = ", ".join("?" for _ in columns)
                self._db.executemany(f"INSERT INTO {target} VALUES ({marks})", [values for _, values in fresh])
                seen.update(insert_id for insert_id, _ in fresh if insert_id)
            self.inserted_rows += len(fresh)
            return Response(200, {"kind": "bigquery#tableDataInsertAllResponse"})

    def _get_table(self, req: Request, user: str, project: str, dataset: str, table: str) -> Response:
        with self.lock:
            return Response(200, self._table_resource(self._require_table(project, dataset, table)))

    def _patch_table(self, req: Request, user: str, project: str, dataset: str, table: str) -> Response:
        """tables.patch: description, labels and expirationTime (null: never expires)."""
        body = req.json() or {}
        with self.lock:
            meta = self._require_table(project, dataset, table)
            if "expirationTime" in body:
                value = body["expirationTime"]
                meta.expiration_ms = None if value is None else int(value)
            if "description" in body:
                meta.description = body["description"]
            if "labels" in body:
                meta.labels = {k: v for k, v in {**meta.labels, **(body["labels"] or {})}.items() if v is not None}
            meta.modified_ms = _now_ms()
            self._save_meta()
            return Response(200, self._table_resource(meta))

    def _delete_table(self, req: Request, user: str, project: str, dataset: str, table: str) -> Response:
        with self.lock:
            self._require_table(project, dataset, table)
            self._db.execute(f"DROP TABLE {_q(self._schema(project, dataset))}.{_q(table)}")
            del self._tables[(project, dataset, table)]
            self._save_meta()
            return Response(204, b"")

    def _list_rows(self, req: Request, user: str, project: str, dataset: str, table: str) -> Response:
        with self.lock:
            self._require_table(project, dataset, table)
            relation = f"{_q(self._schema(project, dataset))}.{_q(table)}"
            schema = self._bq_schema(relation)
            selected = req.arg("selectedFields")
            if selected:
                wanted = [name.strip() for name in selected.split(",")]
                schema = [f for f in schema if f["name"] in wanted]
            total = self._db.execute(f"SELECT count(*) FROM {relation}").fetchall()[0][0]
            rows, token = self._page(req, relation, schema, total)
        body: dict[str, Any] = {"kind": "bigquery#tableDataList", "etag": f'"{total}"', "totalRows": str(total)}
        if rows:
            body["rows"] = rows
        if token:
            body["pageToken"] = token
        return Response(200, body)


# -- value conversion -------------------------------------------------------------------------------
def _bq_field(name: str, duck_type: str) -> dict[str, Any]:
    mode = "NULLABLE"
    if duck_type.endswith("[]"):
        mode, duck_type = "REPEATED", duck_type[:-2]
    bq_type = "STRING"
    for pattern, candidate in _BQ_TYPES:
        match = pattern.match(duck_type)
        if match:
            bq_type = candidate
            if candidate == "NUMERIC" and (int(match.group(1)) > 38 or int(match.group(2)) > 9):
                bq_type = "BIGNUMERIC"
            break
    return {"name": name, "type": bq_type, "mode": mode}


def _cell(value: Any, f: dict[str, Any], int64_timestamps: bool) -> Any:
    """A Python value from DuckDB as BigQuery's JSON wire format writes it (strings; nested ``v`` for arrays)."""
    if value is None:
        return None
    if f["mode"] == "REPEATED":
        return [{"v": _cell(item, {**f, "mode": "NULLABLE"}, int64_timestamps)} for item in value]
    kind = f["type"]
    if kind == "BOOLEAN":
        return "true" if value else "false"
    if kind == "FLOAT":
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(float(value))
    if kind == "TIMESTAMP":
        if isinstance(value, dt.datetime):  # inside an array: no epoch_us() there
            value = int(value.timestamp() * 1_000_000)
        return str(int(value)) if int64_timestamps else repr(int(value) / 1_000_000)
    if kind in ("NUMERIC", "BIGNUMERIC"):
        return format(decimal.Decimal(value), "f")
    if kind == "BYTES":
        return base64.b64encode(bytes(value)).decode()
    if kind in ("DATE", "TIME", "DATETIME"):
        return value.isoformat()
    return str(value)


def _param_value(ptype: dict[str, Any], pvalue: dict[str, Any]) -> Any:
    kind = str(ptype.get("type", "STRING")).upper()
    if kind == "ARRAY":
        return [_param_value(ptype.get("arrayType", {}), v) for v in pvalue.get("arrayValues") or []]
    raw = pvalue.get("value")
    if raw is None:
        return None
    converters = {
        "INT64": int,
        "INTEGER": int,
        "FLOAT64": float,
        "FLOAT": float,
        "NUMERIC": decimal.Decimal,
        "BIGNUMERIC": decimal.Decimal,
        "BOOL": _flag,
        "BOOLEAN": _flag,
        "DATE": dt.date.fromisoformat,
        "DATETIME": lambda v: dt.datetime.fromisoformat(v.replace(" ", "T")),
        "TIMESTAMP": lambda v: dt.datetime.fromisoformat(v.replace(" ", "T").replace("Z", "+00:00")),
        "TIME": dt.time.fromisoformat,
        "BYTES": base64.b64decode,
    }
    return converters.get(kind, str)(raw)
