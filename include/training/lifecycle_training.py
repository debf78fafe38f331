"""Shared plumbing of the training entrypoints: CLI, MLflow run, reference profile and sample, production
baseline and registration.

An entrypoint states only what is specific to its model line (features, estimator, metrics) as a
:class:`ModelLine` and calls :func:`main`. Everything the lifecycle reads downstream (run tags,
metric names, the reference profile and sample, the registered version and its tags, the final JSON
line) is produced here, the same way for every line.

It runs as a plain process, locally or on a Databricks cluster, so it imports nothing from Airflow.
The MLflow tracking URI and token come from ``MLFLOW_TRACKING_URI`` / ``MLFLOW_TRACKING_TOKEN``.
mlflow is imported inside functions: it costs seconds and the profile/metric helpers do not need it.

stdout carries exactly one line, the result JSON; progress goes to stderr. Exit codes: 0 success,
1 unexpected error (may be transient), 2 the inputs cannot train this model (bad arguments, missing
columns, empty split): retrying will not help. SIGTERM ends the MLflow run as KILLED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("lifecycle_training")

EXIT_INPUT_ERROR = 2
DATE_COLUMN = "date"
PREDICTION_COLUMN = "prediction"
MODEL_ARTIFACT = "model"
PROFILE_ARTIFACT = "reference_profile.json"
PROFILE_SCHEMA_VERSION = 2  # 2: the profile names its raw sample ("sample") and each column's kind ("kinds")
REFERENCE_SAMPLE_ARTIFACT = "reference_sample.parquet"  # raw training rows beside the profile, for drift tests
REFERENCE_SAMPLE_ROWS = 50_000
REFERENCE_SAMPLE_SEED = 0
GOLDEN_SET_ARTIFACT = "golden_set.json"  # read by the deployment repository's package and smoke steps
GOLDEN_SET_ROWS = 20
PROFILE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
PROFILE_BINS = 10
REGISTRATION_TIMEOUT_SECONDS = 300


class InputError(Exception):
    """The arguments or the snapshot cannot train this model; the process exits with code 2."""


@dataclass(frozen=True)
class ModelLine:
    """What differs between model lines; :func:`main` does everything else.

    ``build`` turns the effective hyperparameters into an unfitted sklearn pipeline whose final
    step is an ``estimator``; ``metrics`` maps (holdout truth, holdout scores) to named values.
    Scores are predicted values for regression and the probability of class 1 for classification.
    """

    task: Literal["regression", "classification"]
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    estimator: type
    default_params: Mapping[str, Any]
    build: Callable[[dict[str, Any]], Any]
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    metric_names: tuple[str, ...] = ()  # the entrypoint's METRICS: what ``metrics`` must return

    @property
    def features(self) -> list[str]:
        return [*self.categorical, *self.numeric]

    @property
    def pyfunc_predict_fn(self) -> str:
        """pyfunc ``predict`` of a classifier returns ``predict_proba``: an (n, 2) array."""
        return "predict_proba" if self.task == "classification" else "predict"

    def model_output(self, model: Any, features: pd.DataFrame) -> np.ndarray:
        """What the logged model's pyfunc ``predict`` returns for ``features``."""
        return getattr(model, self.pyfunc_predict_fn)(features)

    def scores(self, output: Any) -> np.ndarray:
        """Metric scores from a model output: values, or the last column (class 1) of probabilities.

        Also accepts a production model's pyfunc output, whatever container it comes in.
        """
        values = np.asarray(output.to_numpy() if hasattr(output, "to_numpy") else output, dtype=float)
        if self.task == "classification" and values.ndim == 2:
            return values[:, -1]
        return values.reshape(len(values))


# --- command line -----------------------------------------------------------------------------


def _iso_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


def parse_args(line: ModelLine, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the entrypoint CLI; every flag but ``--result-file`` is required.

    Malformed arguments and unknown hyperparameters exit with code 2 here, before MLflow is touched.
    """
    parser = argparse.ArgumentParser(
        description="Train one model line on a data-window snapshot, log it to MLflow and register it."
    )
    add = parser.add_argument
    add("--snapshot", required=True, help="Parquet file or bq://project.dataset.table: date, features, target.")
    add("--run-key", required=True, help="Deterministic key of this lifecycle step (idempotency).")
    add("--model-line", required=True)
    add("--experiment", required=True, help="MLflow experiment name; created if missing.")
    add("--registered-model", required=True)
    add("--production-alias", required=True, help="Alias of the model to compare against.")
    add("--holdout-start", required=True, type=_iso_date, help="Rows on/after this date are the holdout.")
    add("--window-start", required=True, type=_iso_date)
    add("--window-end", required=True, type=_iso_date, help="Exclusive end of the data window.")
    add("--target", required=True, help="Target column of the snapshot.")
    add("--params", required=True, type=_json_object, help="JSON object of hyperparameter overrides.")
    add("--tags", required=True, type=_json_object, help="JSON object of extra MLflow run tags.")
    add("--result-file", type=Path, help="Also write the result JSON here.")
    add("--backtest-id", help="Backtest mode: evaluate on the horizon after the window, register nothing.")
    add("--horizon-end", type=_iso_date, help="Backtest mode: exclusive end of the horizon after --window-end.")
    args = parser.parse_args(argv)
    if args.window_start >= args.window_end:
        parser.error(f"--window-start {args.window_start} must be before --window-end {args.window_end}")
    if (args.backtest_id is None) != (args.horizon_end is None):
        parser.error("--backtest-id and --horizon-end go together (backtest mode)")
    if args.horizon_end is not None and args.horizon_end <= args.window_end:
        parser.error(f"--horizon-end {args.horizon_end} must be after --window-end {args.window_end}")
    if any(char in args.run_key for char in "'\"\\"):
        parser.error(f"--run-key must not contain quotes or backslashes: {args.run_key!r}")
    valid = line.estimator().get_params()
    unknown = sorted(set(args.params) - set(valid))
    if unknown:
        name = line.estimator.__name__
        parser.error(f"--params: unknown hyperparameters {unknown} for {name}; valid: {sorted(valid)}")
    return args


# --- progress ---------------------------------------------------------------------------------


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Log how long a phase took, so slow steps stand out in the Airflow task log."""
    started = time.monotonic()
    yield
    log.info("%s: %.1f s", name, time.monotonic() - started)


def _safe_uri(uri: str) -> str:
    """The tracking URI without credentials, fit for a log line."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
    return uri


def _thread_limit() -> contextlib.AbstractContextManager[Any]:
    """One OpenMP/BLAS thread unless ``OMP_NUM_THREADS`` says otherwise.

    On a shared worker OpenMP threads spin-wait for busy cores: fitting the demand model took
    53 s with 2 threads on a loaded 2-core machine and 1.8 s with one. The data sets are small, so
    parallelism buys little; set ``OMP_NUM_THREADS`` on a dedicated machine to use more cores.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --- data -------------------------------------------------------------------------------------


def load_snapshot(uri: str) -> pd.DataFrame:
    """A parquet file (local adapter) or ``bq://project.dataset.table`` (BigQuery snapshot table).

    BigQuery is read with google-cloud-bigquery and the cluster's default credentials (on
    Databricks: the cluster's service account); ``BIGQUERY_EMULATOR_HOST`` points it at a stand-in.
    """
    if uri.startswith("bq://"):
        from google.cloud import bigquery

        table = uri.removeprefix("bq://")
        project = table.split(".", 1)[0]
        client = bigquery.Client(project=project)
        try:
            return client.list_rows(table).to_dataframe(create_bqstorage_client=False)
        except Exception as exc:
            if type(exc).__name__ == "NotFound":
                raise InputError(f"snapshot table {table} does not exist") from None
            raise
    try:
        return pd.read_parquet(uri)
    except FileNotFoundError:
        raise InputError(f"snapshot {uri} does not exist") from None


def read_snapshot(line: ModelLine, args: argparse.Namespace) -> pd.DataFrame:
    """Read the snapshot, check it has what the model needs and normalise column types.

    Integers become int64 and reals float64, because the model signature is inferred from them and
    MLflow's schema enforcement accepts int64 for a long column but refuses int64 for a double one
    (and floats for a long one). Text becomes str. Rows outside the window and rows without a
    target are dropped (logged).
    """
    frame = load_snapshot(args.snapshot)
    log.info("read %d rows, %d columns from %s", len(frame), frame.shape[1], args.snapshot)
    missing = [c for c in (DATE_COLUMN, *line.features, args.target) if c not in frame.columns]
    if missing:
        raise InputError(
            f"snapshot {args.snapshot} lacks columns {missing} needed by model line {args.model_line}; "
            f"it has {list(frame.columns)}"
        )
    frame = frame[[DATE_COLUMN, *line.features, args.target]].copy()
    frame[DATE_COLUMN] = pd.to_datetime(frame[DATE_COLUMN])
    end = args.horizon_end or args.window_end  # backtest mode reads the horizon after the window too
    inside = (frame[DATE_COLUMN] >= pd.Timestamp(args.window_start)) & (frame[DATE_COLUMN] < pd.Timestamp(end))
    if not inside.all():
        log.warning("dropping %d rows outside [%s, %s)", (~inside).sum(), args.window_start, end)
    unlabelled = frame[args.target].isna()
    if unlabelled.any():
        log.info("dropping %d rows without a target", unlabelled.sum())
    frame = frame[inside & ~unlabelled].reset_index(drop=True)
    for column in [*line.features, args.target]:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
            frame[column] = values.astype("float64" if values.isna().any() else "int64")
        elif pd.api.types.is_numeric_dtype(values):
            frame[column] = values.astype("float64")
        elif column in line.categorical:
            frame[column] = values.astype("str")
        else:
            raise InputError(f"column {column} must be numeric, got dtype {values.dtype}")
    nulls = {c: int(n) for c, n in frame[line.features].isna().sum().items() if n}
    if nulls:
        log.info("null feature values (left to the model): %s", nulls)
    return frame


def split(frame: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Time-based split: train before ``--holdout-start``, holdout from it on (to the window's end)."""
    frame = frame[frame[DATE_COLUMN] < pd.Timestamp(args.window_end)]
    in_holdout = frame[DATE_COLUMN] >= pd.Timestamp(args.holdout_start)
    train, holdout = frame[~in_holdout], frame[in_holdout]
    dates = (
        f"snapshot dates {frame[DATE_COLUMN].min():%Y-%m-%d}..{frame[DATE_COLUMN].max():%Y-%m-%d}"
        if len(frame)
        else "the snapshot has no usable rows"
    )
    hint = f"window [{args.window_start}, {args.window_end}), holdout start {args.holdout_start}"
    if train.empty:
        raise InputError(f"training split is empty: no row before the holdout start ({dates}; {hint})")
    if holdout.empty:
        raise InputError(f"holdout is empty: no row on or after the holdout start ({dates}; {hint})")
    return train, holdout


# --- metrics and profile ------------------------------------------------------------------------


def mean_absolute_percentage_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """MAPE as a fraction, with the denominator floored at 1 so days with zero sales stay finite."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    return float(np.mean(np.abs(y_true - y_pred) / np.maximum(np.abs(y_true), 1.0)))


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def column_profile(values: pd.Series, categorical: bool) -> dict[str, Any]:
    """Summary of one column for drift monitoring: counts, and either moments, quantiles and a
    10-bin histogram (numeric) or relative category frequencies (categorical)."""
    present = values.dropna()
    profile: dict[str, Any] = {
        "kind": "categorical" if categorical else "numeric",
        "dtype": str(values.dtype),
        "count": int(len(present)),
        "null_count": int(len(values) - len(present)),
    }
    if categorical:
        counts = present.astype(str).value_counts().sort_index()
        profile["frequencies"] = {str(k): float(v) / max(len(present), 1) for k, v in counts.items()}
        return profile
    numbers = present.to_numpy(dtype=float)
    if len(numbers) == 0:
        return profile | {
            "mean": None,
            "std": None,
            "min": None,
            "max": None,
            "quantiles": {},
            "histogram": None,
        }
    counts, edges = np.histogram(numbers, bins=PROFILE_BINS)
    return profile | {
        "mean": float(numbers.mean()),
        "std": float(numbers.std(ddof=1)) if len(numbers) > 1 else 0.0,
        "min": float(numbers.min()),
        "max": float(numbers.max()),
        "quantiles": {str(q): float(np.quantile(numbers, q)) for q in PROFILE_QUANTILES},
        "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
    }


def reference_profile(
    line: ModelLine, features: pd.DataFrame, target: pd.Series, scores: np.ndarray, sample_rows: int
) -> dict[str, Any]:
    """Profile of the training split (features, target, prediction): the drift reference.

    ``sample`` names the raw sample logged beside it (``sample_rows`` of the split's rows) and ``kinds``
    says how the monitor compares each feature and the prediction: as numbers or as categories.
    """
    columns = {name: column_profile(features[name], name in line.categorical) for name in line.features}
    columns[str(target.name)] = column_profile(target, categorical=False)
    columns[PREDICTION_COLUMN] = column_profile(pd.Series(scores, name=PREDICTION_COLUMN), categorical=False)
    kinds = {name: "categorical" if name in line.categorical else "numeric" for name in line.features}
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "split": "train",
        "rows": int(len(features)),
        "features": line.features,
        "categorical": list(line.categorical),
        "target": str(target.name),
        "prediction": PREDICTION_COLUMN,
        "quantiles": list(PROFILE_QUANTILES),
        "columns": columns,
        "kinds": kinds | {PREDICTION_COLUMN: "numeric"},
        "sample": {"artifact": REFERENCE_SAMPLE_ARTIFACT, "rows": int(sample_rows), "of_rows": int(len(features))},
    }


def reference_sample(line: ModelLine, features: pd.DataFrame, target: pd.Series, scores: np.ndarray) -> pd.DataFrame:
    """At most ``REFERENCE_SAMPLE_ROWS`` rows of the training split, in their order: the line's features and
    the target with their training dtypes, and the model's score of each row (``prediction``).

    Drift tests need raw values (a 10-bin profile cannot be tested against); the rows are drawn with a fixed
    seed, so retraining on the same data logs the same sample. ``scores`` are those of every training row.
    """
    rows = len(features)
    if rows > REFERENCE_SAMPLE_ROWS:
        rng = np.random.default_rng(REFERENCE_SAMPLE_SEED)
        picked = np.sort(rng.choice(rows, size=REFERENCE_SAMPLE_ROWS, replace=False))
    else:
        picked = np.arange(rows)
    sample = pd.concat([features[line.features], target], axis=1).iloc[picked].reset_index(drop=True)
    sample[PREDICTION_COLUMN] = np.asarray(scores, dtype=float)[picked]
    return sample


# --- MLflow -----------------------------------------------------------------------------------


def skops_trusted_types(model: Any) -> list[str]:
    """Types skops does not trust by default but this model needs (HistGradientBoosting's
    ``TreePredictor``, SimpleImputer's ``numpy.dtype``). Only scikit-learn and numpy types are
    accepted, so anything else fails here, at training time, not when the service loads the model.
    """
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    foreign = [name for name in untrusted if not name.startswith(("sklearn.", "numpy."))]
    if foreign:
        raise ValueError(f"the model holds types skops cannot load safely: {foreign}")
    return untrusted


def model_format() -> Any:
    """``include/deployment/model_service/model_format.py``: the one check of what may be loaded, shared
    with the model service and its packaging (this file's folder sits beside ``deployment/``)."""
    deployment = str(Path(__file__).resolve().parents[1] / "deployment")
    if deployment not in sys.path:
        sys.path.append(deployment)
    from model_service import model_format as checks

    return checks


def source_run(model_uri: str) -> str | None:
    """The run that trained ``model_uri`` (a registered version, a logged model or a run's artifact)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    ref = model_uri.removeprefix("models:/")
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if ref.startswith("m-"):
        return mlflow.get_logged_model(ref.split("/")[0]).source_run_id
    name, _, version = ref.rpartition("/")
    return MlflowClient().get_model_version(name, version).run_id if version.isdigit() else None


def load_checked_model(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model``, only for a model in the one format training writes, whose files are
    the ones recorded at training (a model registered by anyone else is never loaded: loading runs code)."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    checks = model_format()
    run_id = source_run(model_uri)
    expected = MlflowClient().get_run(run_id).data.tags.get(checks.MODEL_DIGEST_TAG) if run_id else None
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder))
        checks.check_model_dir(local, expected, label=model_uri)
        return mlflow.pyfunc.load_model(str(local))


def log_model(line: ModelLine, model: Any, holdout: pd.DataFrame) -> Any:
    """Log the fitted pipeline as the run's ``model`` (skops format, signature, input example) and record
    its files' digest on the run (``model_format.MODEL_DIGEST_TAG``), checked wherever it is loaded.

    skops is chosen explicitly (on Databricks MLflow would default to cloudpickle) so the artifact is
    the same wherever it was trained. Pip requirements are given rather than inferred: inference
    reloads the model in a subprocess and costs ~8 s.
    """
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    info = mlflow.sklearn.log_model(
        model,
        name=MODEL_ARTIFACT,
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=skops_trusted_types(model) or None,
        pyfunc_predict_fn=line.pyfunc_predict_fn,
        signature=infer_signature(holdout, line.model_output(model, holdout)),
        input_example=holdout.head(5),
        pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
    )
    checks = model_format()
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=folder))
        checks.check_model_dir(local, label="the trained model")
        mlflow.set_tag(checks.MODEL_DIGEST_TAG, checks.model_digest(local))
    return info


def golden_set(line: ModelLine, model: Any, holdout: pd.DataFrame) -> dict[str, Any]:
    """Holdout rows as a service receives them (JSON records) and the predictions made for them here.

    The deployment's smoke tests and the service's start-up compare what is served with these.
    """
    rows = holdout.sample(n=min(GOLDEN_SET_ROWS, len(holdout)), random_state=0)
    records = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows.to_dict("records")]
    return {"rows": records, "predictions": [float(p) for p in line.scores(line.model_output(model, rows))]}


def log_reference_sample(sample: pd.DataFrame) -> None:
    """Log ``sample`` as the run's ``reference_sample.parquet`` (written to a temporary folder first)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="mlops-sample-") as folder:
        path = Path(folder) / REFERENCE_SAMPLE_ARTIFACT
        sample.to_parquet(path, index=False)
        mlflow.log_artifact(str(path))


def production_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or None when the model or the alias does not exist.

    Reads the alias map of the registered model instead of a by-alias lookup: a missing alias is
    reported as INVALID_PARAMETER_VALUE there, indistinguishable from a malformed request.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (registered.aliases or {}).get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def compare_with_production(
    line: ModelLine, client: MlflowClient, args: argparse.Namespace, features: pd.DataFrame, truth: pd.Series
) -> tuple[str | None, dict[str, float]]:
    """Score the production model on the same holdout; log its metrics as ``production.<name>``.

    A production model that cannot score these features (its signature predates a feature change)
    gets ``lifecycle.production_error`` and no metrics, so a relative gate fails closed on it.
    Errors loading the model propagate: they may be transient and deserve a retry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    current = production_version(client, args.registered_model, args.production_alias)
    if current is None:
        log.info("no %s@%s: nothing to compare with", args.registered_model, args.production_alias)
        mlflow.set_tag("lifecycle.production_version", "none")
        return None, {}
    version = str(current.version)
    mlflow.set_tags({"lifecycle.production_version": version, "lifecycle.production_run_id": current.run_id or ""})
    model = load_checked_model(f"models:/{args.registered_model}/{version}")
    try:
        output = model.predict(features)
    except (MlflowException, KeyError, ValueError, TypeError) as exc:
        log.warning("production version %s cannot score this holdout: %s", version, exc)
        mlflow.set_tag("lifecycle.production_error", str(exc)[:4000])
        return version, {}
    metrics = {
        f"production.{name}": value for name, value in line.metrics(truth.to_numpy(), line.scores(output)).items()
    }
    mlflow.log_metrics(metrics)
    log.info("production version %s on the same holdout: %s", version, _format_metrics(metrics))
    return version, metrics


def register(client: MlflowClient, model_uri: str, args: argparse.Namespace) -> str:
    """Register the logged model, wait until the version is READY and tag the run with it."""
    import mlflow

    created = mlflow.register_model(
        model_uri,
        args.registered_model,
        tags={
            "lifecycle.run_key": args.run_key,
            "lifecycle.model_line": args.model_line,
            "lifecycle.window_start": args.window_start.isoformat(),
            "lifecycle.window_end": args.window_end.isoformat(),
            "lifecycle.snapshot": str(args.snapshot),
        },
    )
    version = str(created.version)
    deadline = time.monotonic() + REGISTRATION_TIMEOUT_SECONDS
    while (status := client.get_model_version(args.registered_model, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {args.registered_model}/{version} is {status}, not READY")
        time.sleep(1)
    mlflow.set_tag("lifecycle.registered_version", version)
    return version


def previous_result(client: MlflowClient, args: argparse.Namespace) -> dict[str, Any] | None:
    """The result of a finished run with the same run key whose version still exists, if any.

    A retried Airflow task then reports what the first try made instead of registering a duplicate.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`lifecycle.run_key` = '{args.run_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if args.backtest_id is not None:  # nothing registered in backtest mode: the finished run is the result
            return {
                "run_id": run.info.run_id,
                "model_version": None,
                "metrics": run.data.metrics,
                "production_version": None,
                "horizon": run.data.tags.get("backtest.horizon"),
            }
        version = run.data.tags.get("lifecycle.registered_version")
        if version is None:
            continue
        try:
            client.get_model_version(args.registered_model, version)
        except MlflowException:
            continue
        production = run.data.tags.get("lifecycle.production_version")
        return {
            "run_id": run.info.run_id,
            "model_version": version,
            "metrics": run.data.metrics,
            "production_version": None if production in (None, "none") else production,
        }
    return None


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def _log_split(line: ModelLine, name: str, part: pd.DataFrame, target: str) -> None:
    first, last = part[DATE_COLUMN].min(), part[DATE_COLUMN].max()
    rate = f", positive rate {part[target].mean():.3f}" if line.task == "classification" else ""
    log.info("%s: %d rows, %s..%s%s", name, len(part), f"{first:%Y-%m-%d}", f"{last:%Y-%m-%d}", rate)


# --- the run ----------------------------------------------------------------------------------


def train_and_register(line: ModelLine, args: argparse.Namespace, client: MlflowClient) -> dict[str, Any]:
    """Steps 2-7 inside the active MLflow run; returns the result JSON as a dict."""
    import mlflow

    with phase("read snapshot"):
        frame = read_snapshot(line, args)
        train, holdout = split(frame, args)
    _log_split(line, "train", train, args.target)
    _log_split(line, "holdout", holdout, args.target)
    x_train, y_train = train[line.features], train[args.target]
    x_holdout, y_holdout = holdout[line.features], holdout[args.target]
    if line.task == "classification" and y_train.nunique() < 2:
        raise InputError(f"the training split has a single class of {args.target}: {y_train.unique().tolist()}")

    params = {**line.default_params, **args.params}
    mlflow.log_params(
        params
        | {
            "model_class": f"{line.estimator.__module__}.{line.estimator.__name__}",
            "train_rows": len(train),
            "holdout_rows": len(holdout),
            "features": ",".join(line.features),
            "target": args.target,
        }
    )

    with phase("fit"):
        model = line.build(params).fit(x_train, y_train)
    with phase("evaluate"):
        metrics = line.metrics(y_holdout.to_numpy(), line.scores(line.model_output(model, x_holdout)))
        if line.metric_names and sorted(metrics) != sorted(line.metric_names):
            raise ValueError(
                f"metrics() returned {sorted(metrics)} but the entrypoint declares METRICS {sorted(line.metric_names)}"
            )
        mlflow.log_metrics(metrics)
    log.info("holdout metrics: %s", _format_metrics(metrics))

    if args.backtest_id is not None:
        return backtest_result(line, args, model, frame, metrics)
    with phase("log model"):
        model_info = log_model(line, model, x_holdout)
        mlflow.log_dict(golden_set(line, model, x_holdout), GOLDEN_SET_ARTIFACT)
    with phase("reference profile and sample"):
        train_scores = line.scores(line.model_output(model, x_train))
        sample = reference_sample(line, x_train, y_train, train_scores)
        mlflow.log_dict(reference_profile(line, x_train, y_train, train_scores, len(sample)), PROFILE_ARTIFACT)
        log_reference_sample(sample)
    with phase("production baseline"):
        production, production_metrics = compare_with_production(line, client, args, x_holdout, y_holdout)
    with phase("register"):
        # The logged model's own URI: `runs:/<id>/model` resolves to it too in MLflow 3, with a warning.
        version = register(client, model_info.model_uri, args)
    log.info("registered %s version %s", args.registered_model, version)
    return {
        "run_id": mlflow.active_run().info.run_id,
        "model_version": version,
        "metrics": metrics | production_metrics,
        "production_version": production,
    }


HORIZON_PREFIX = "horizon."


def horizon_of(frame: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    """The horizon's rows, and whether the data covers it to its last day (``complete``) or not (``missing``)."""
    part = frame[frame[DATE_COLUMN] >= pd.Timestamp(args.window_end)]
    last_day = pd.Timestamp(args.horizon_end) - pd.Timedelta(days=1)
    complete = not part.empty and part[DATE_COLUMN].max() >= last_day
    return part, "complete" if complete else "missing"


def backtest_result(
    line: ModelLine, args: argparse.Namespace, model: Any, frame: pd.DataFrame, metrics: dict[str, float]
) -> dict[str, Any]:
    """Backtest mode: log the model (a later window may score it as its champion) and its horizon metrics."""
    import mlflow

    horizon, status = horizon_of(frame, args)
    with phase("log model"):
        example = horizon[line.features] if not horizon.empty else frame[line.features].tail(5)
        info = log_model(line, model, example)
    mlflow.set_tags(
        {"backtest.horizon": status, "backtest.horizon_rows": str(len(horizon)), "backtest.model_uri": info.model_uri}
    )
    horizon_metrics: dict[str, float] = {}
    if status == "complete":
        with phase("evaluate horizon"):
            scores = line.scores(line.model_output(model, horizon[line.features]))
            horizon_metrics = {
                f"{HORIZON_PREFIX}{k}": v for k, v in line.metrics(horizon[args.target].to_numpy(), scores).items()
            }
            mlflow.log_metrics(horizon_metrics)
        log.info("horizon %s..%s: %s", args.window_end, args.horizon_end, _format_metrics(horizon_metrics))
    else:
        log.info(
            "horizon %s..%s is not in the data yet (%d rows): reported, not failed",
            args.window_end,
            args.horizon_end,
            len(horizon),
        )
    return {
        "run_id": mlflow.active_run().info.run_id,
        "model_version": None,
        "metrics": metrics | horizon_metrics,
        "production_version": None,
        "horizon": status,
    }


class Scorer:
    """Scores logged models on date ranges of snapshots with the line's metrics, loading each model once.

    Used by the backtest report to score each window's champion on that window's horizon, in the report
    task's own process (``score_main`` is the same as a command).
    """

    def __init__(self, line: ModelLine, target: str) -> None:
        self.line, self.target = line, target
        self.models: dict[str, Any] = {}

    def score(self, model_uri: str, snapshot: str, start: date, end: date) -> dict[str, float]:
        """Metrics of ``model_uri`` on the labelled rows of ``snapshot`` in [start, end); {} if it cannot score."""
        from mlflow.exceptions import MlflowException

        # the same reading, typing and filtering as training
        window = argparse.Namespace(
            snapshot=snapshot, model_line="?", target=self.target, window_start=start, window_end=end, horizon_end=None
        )
        rows = read_snapshot(self.line, window)
        if rows.empty:
            return {}
        if model_uri not in self.models:
            self.models[model_uri] = load_checked_model(model_uri)
        try:
            output = self.models[model_uri].predict(rows[self.line.features])
        except (MlflowException, KeyError, ValueError, TypeError) as exc:
            log.warning("%s cannot score %s [%s, %s): %s", model_uri, snapshot, start, end, exc)
            return {}
        return self.line.metrics(rows[self.target].to_numpy(), self.line.scores(output))


def score_main(line: ModelLine, request_file: Path, result_file: Path) -> int:
    """``<entrypoint> score REQUEST RESULT``: score logged models on snapshot date ranges with the line's metrics.

    REQUEST is JSON ``{"target": col, "pairs": [{"key", "model_uri", "snapshot", "start", "end"}]}``; RESULT
    gets ``{key: {metric: value}}`` (``{}`` for a model that cannot score those rows).
    """
    request = json.loads(request_file.read_text())
    scorer = Scorer(line, request["target"])
    out = {
        pair["key"]: scorer.score(
            pair["model_uri"], pair["snapshot"], date.fromisoformat(pair["start"]), date.fromisoformat(pair["end"])
        )
        for pair in request["pairs"]
    }
    result_file.write_text(json.dumps(out))
    log.info("scored %d pair(s) with %d model(s)", len(out), len(scorer.models))
    return 0


def emit(result: dict[str, Any], result_file: Path | None, stdout: TextIO) -> None:
    """Write the result as one JSON line to stdout (and to ``result_file``); NaN/inf become null."""
    result = result | {"metrics": {k: _finite_or_none(v) for k, v in sorted(result["metrics"].items())}}
    text = json.dumps(result, allow_nan=False)
    if result_file is not None:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(text + "\n")
    print(text, file=stdout, flush=True)


def main(line: ModelLine, argv: list[str] | None = None) -> int:
    """Run the whole training step; return the process exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        if len(argv) != 3:
            print("usage: <entrypoint> score REQUEST.json RESULT.json", file=sys.stderr)
            return EXIT_INPUT_ERROR
        with contextlib.redirect_stdout(sys.stderr), _thread_limit():
            return score_main(line, Path(argv[1]), Path(argv[2]))
    args = parse_args(line, argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    stdout = sys.stdout
    # Libraries print to stdout (e.g. "Successfully registered model"): keep it for the result line.
    with contextlib.redirect_stdout(sys.stderr):
        code, result = _run(line, args)
    if result is not None:
        emit(result, args.result_file, stdout)
    return code


def _run(line: ModelLine, args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """Steps 1 and 8: find or start the MLflow run, train inside it, end it with the right status."""
    started = time.monotonic()
    with phase("import mlflow"):
        import mlflow
        from mlflow import MlflowClient
    log.info(
        "model line %s, run key %s, tracking %s",
        args.model_line,
        args.run_key,
        _safe_uri(mlflow.get_tracking_uri()),
    )
    client = MlflowClient()
    try:
        previous = previous_result(client, args)
        if previous is not None:
            log.info("run %s already trained run key %s: reusing it", previous["run_id"], args.run_key)
            return 0, previous | {"reused": True}
        mlflow.set_experiment(args.experiment)
    except Exception as exc:
        log.exception("cannot use the MLflow tracking server")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None

    tags = {str(k): str(v) for k, v in args.tags.items()} | {
        "lifecycle.run_key": args.run_key,
        "lifecycle.model_line": args.model_line,
        "lifecycle.window_start": args.window_start.isoformat(),
        "lifecycle.window_end": args.window_end.isoformat(),
        "lifecycle.holdout_start": args.holdout_start.isoformat(),
        "lifecycle.snapshot": str(args.snapshot),
    }
    if args.backtest_id is not None:
        tags |= {"backtest.id": args.backtest_id, "backtest.horizon_end": args.horizon_end.isoformat()}
    run = mlflow.start_run(run_name=f"{args.model_line}-{args.window_start}_{args.window_end}", tags=tags)
    log.info("MLflow run %s in experiment %s", run.info.run_id, args.experiment)
    status = "FAILED"
    try:
        with _thread_limit():
            result = train_and_register(line, args, client)
        status = "FINISHED"
        return 0, result | {"reused": False}
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR, None
    except Exception as exc:
        log.exception("training failed")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None
    except BaseException:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        log.info("run %s ended %s after %.1f s", run.info.run_id, status, time.monotonic() - started)
