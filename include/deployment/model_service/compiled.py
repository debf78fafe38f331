"""Fitted scikit-learn pipelines turned into plain numpy code: the same predictions, far less overhead.

Why: one ``predict`` call of the demand-forecast pipeline costs ~5 ms for a single row, nearly all of
it per-call overhead (pandas and ColumnTransformer bookkeeping, then one Python-level call per tree).
That rules out a p99 under 10 ms. ``compile_model`` reads the fitted attributes of a supported
pipeline once and builds a :class:`CompiledModel` that computes the same numbers with a few numpy
operations: the one-hot encoding is a dictionary or ``searchsorted`` lookup, and the boosted trees
are flattened into node arrays and walked level by level for all rows and trees at once.

Only what is listed below compiles; anything else returns ``(None, reason)`` and the caller keeps
using scikit-learn. Semantics follow scikit-learn 1.9 (read from its source): thresholds compare
with ``<=`` going left, NaN follows each node's ``missing_go_to_left``, raw scores start at
``_baseline_prediction`` and add the trees in order (so results are usually bit-identical).

Supported:

* ``Pipeline`` (nested pipelines are flattened; ``"passthrough"`` steps skipped) whose last step is
  the estimator; a bare estimator also compiles.
* ``ColumnTransformer`` as the first step: fitted ``transformers_``, selections by name, index, int
  slice or boolean mask, ``"passthrough"``/``"drop"`` transformers and remainder, dense output.
* Inside it (or as pipeline steps): ``OneHotEncoder`` (dense, ``drop=None``, ``handle_unknown``
  ``"ignore"`` or ``"error"``, no infrequent categories), ``SimpleImputer`` (numeric, NaN as the
  missing value, mean/median/most_frequent/constant, no indicator), ``StandardScaler`` and nested
  ``Pipeline`` of those.
* Estimators: ``HistGradientBoostingRegressor`` with ``predict`` (identity or log link: squared
  error, absolute error, quantile, Poisson, gamma, ...), ``HistGradientBoostingClassifier`` (binary)
  and ``LogisticRegression`` (binary) with ``predict_proba``. Trees with categorical splits are not
  supported.

This module imports numpy only (scipy's ``expit`` is imported lazily when a classifier compiles, so
probabilities match scikit-learn bit for bit; scikit-learn itself is never imported).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["CompiledModel", "compile_model"]

# Batch size up to which the compiled path beats scikit-learn (callers use scikit-learn above it).
# Trees: measured on the demand-forecast pipeline (300 trees of 31 leaves, OMP_NUM_THREADS=1), where
# the two cross between 1500 and 2000 rows; 1000 keeps a margin. Linear models: the compiled path
# was faster at every size measured (4x at 10,000 rows), so no limit in practice.
MAX_ROWS_FASTER_TREES = 1000
MAX_ROWS_FASTER_LINEAR = 1_000_000


# Rows walked through the trees together: bigger batches are split (measured: 128 is near best).
_WALK_CHUNK_ROWS = 128


class _Unsupported(Exception):
    """Raised while compiling: the model uses something this module does not reproduce."""


def _is_sklearn(obj: Any, name: str) -> bool:
    """Exactly scikit-learn's class ``name`` (a subclass may override what we reproduce)."""
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.startswith("sklearn.")


def _label(obj: Any) -> str:
    return obj if isinstance(obj, str) else type(obj).__name__


def _is_scalar_nan(value: Any) -> bool:
    """scikit-learn's ``is_scalar_nan``: a real-number NaN (not None, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Data between steps.
# --------------------------------------------------------------------------------------------------
class _Table:
    """A step's input: the frame's own columns (each keeps its dtype, as pandas does) or a 2-D array."""

    __slots__ = ("array", "cols", "n")

    def __init__(self, n: int, cols: list[np.ndarray] | None = None, array: np.ndarray | None = None) -> None:
        self.n = n
        self.cols = cols
        self.array = array

    def columns(self) -> list[np.ndarray]:
        if self.cols is not None:
            return self.cols
        assert self.array is not None
        return [self.array[:, j] for j in range(self.array.shape[1])]

    def matrix(self) -> np.ndarray:
        """What ``np.asarray(DataFrame)`` gives: columns side by side in their common dtype."""
        if self.array is not None:
            return self.array
        assert self.cols is not None
        if not self.cols:
            return np.empty((self.n, 0))
        if len(self.cols) == 1:
            return self.cols[0].reshape(-1, 1)
        return np.column_stack(self.cols)


_FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))


def _float_matrix(table: _Table) -> np.ndarray:
    """check_array(dtype=FLOAT_DTYPES): float arrays keep their precision, anything else -> float64.

    Steps never modify their input in place, so no copy is made (the arrays may be the caller's).
    """
    x = table.matrix()
    return x if x.dtype in _FLOAT_DTYPES else x.astype(np.float64)


def _reject_infinite(x: np.ndarray, what: str) -> None:
    """scikit-learn's ``ensure_all_finite="allow-nan"``: infinity is an error, NaN is not."""
    if x.dtype.kind == "f" and x.size and np.isinf(x).any():
        raise ValueError(f"Input X contains infinity or a value too large for dtype('{x.dtype}') ({what}).")


# --------------------------------------------------------------------------------------------------
# Transformers.
# --------------------------------------------------------------------------------------------------
class _CategoryCodes:
    """Index of each value in one feature's ``categories_``, with OneHotEncoder's equality rules.

    Numeric input against numeric categories compares values (``searchsorted``, NaN matches a NaN
    category). Anything else compares Python objects (``1 == 1.0 == True``, ``"1" != 1``), None and
    NaN only matching themselves, as scikit-learn's ``_check_unknown``/``_encode`` do.
    """

    def __init__(self, categories: np.ndarray) -> None:
        self.categories = categories
        self.size = len(categories)
        self.numeric = categories.dtype.kind in "iuf"
        self.has_nan = self.numeric and categories.dtype.kind == "f" and bool(np.isnan(categories).any())
        values = categories.tolist()
        self.table: dict[Any, int] = {}
        self.none_code: int | None = None
        self.nan_code: int | None = None
        for code, value in enumerate(values):
            if value is None:
                self.none_code = code
            elif _is_scalar_nan(value):
                self.nan_code = code
            else:
                self.table[value] = code  # later duplicates win, like scikit-learn's dict

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, known) for one column; codes of unknown values are meaningless."""
        if x.dtype.kind in "iuf":
            if not self.numeric:
                # scikit-learn fails the same way (np.isnan on object categories)
                raise TypeError("OneHotEncoder: numeric input for a feature whose categories are not numeric")
            codes = np.searchsorted(self.categories, x)
            np.minimum(codes, self.size - 1, out=codes)
            known = self.categories[codes] == x
            if self.has_nan and x.dtype.kind == "f":
                known |= np.isnan(x)
            return codes, known
        values = x.tolist()
        if x.dtype.kind == "O" and _pandas_infers_str(values):
            values = [math.nan if v is None else v for v in values]
        codes_list: list[int] = []
        known_list: list[bool] = []
        table, none_code, nan_code = self.table, self.none_code, self.nan_code
        for v in values:
            if v is None:
                code = none_code
            elif _is_scalar_nan(v):
                code = nan_code
            else:
                code = table.get(v)
            codes_list.append(0 if code is None else code)
            known_list.append(code is not None)
        return np.asarray(codes_list, dtype=np.intp), np.asarray(known_list, dtype=bool)


def _pandas_infers_str(values: list[Any]) -> bool:
    """pandas 3 turns an object column of strings and missing values into ``str`` dtype, None -> NaN."""
    if not any(v is None for v in values):
        return False
    has_str = False
    for v in values:
        if isinstance(v, str):
            has_str = True
        elif not (v is None or _is_scalar_nan(v)):
            return False
    return has_str


class _OneHot:
    """OneHotEncoder(sparse_output=False, drop=None), handle_unknown 'ignore' (zeros) or 'error'."""

    def __init__(self, encoder: Any, n_in: int) -> None:
        if getattr(encoder, "sparse_output", True):
            raise _Unsupported("OneHotEncoder with sparse_output=True (only dense output is supported)")
        if encoder.drop is not None or getattr(encoder, "drop_idx_", None) is not None:
            raise _Unsupported(f"OneHotEncoder with drop={encoder.drop!r} (only drop=None is supported)")
        if encoder.handle_unknown not in ("ignore", "error"):
            raise _Unsupported(
                f"OneHotEncoder with handle_unknown={encoder.handle_unknown!r} (only 'ignore' or 'error')"
            )
        if getattr(encoder, "_infrequent_enabled", False) or any(
            getattr(encoder, name, None) is not None for name in ("max_categories", "min_frequency")
        ):
            raise _Unsupported("OneHotEncoder with infrequent categories (max_categories/min_frequency)")
        self.dtype = np.dtype(encoder.dtype)
        if self.dtype.kind not in "fiu":
            raise _Unsupported(f"OneHotEncoder with dtype={self.dtype} (only numeric output)")
        categories = list(encoder.categories_)
        if len(categories) != n_in:
            raise _Unsupported(f"OneHotEncoder fitted on {len(categories)} columns but given {n_in}")
        self.features = [_CategoryCodes(np.asarray(c)) for c in categories]
        if any(f.size == 0 for f in self.features):
            raise _Unsupported("OneHotEncoder with an empty category list")
        self.offsets = np.cumsum([0] + [f.size for f in self.features])
        self.n_out = int(self.offsets[-1])
        self.error_on_unknown = encoder.handle_unknown == "error"

    def __call__(self, table: _Table) -> np.ndarray:
        n = table.n
        out = np.zeros((n, self.n_out), dtype=self.dtype)
        rows = np.arange(n)
        for i, (feature, x) in enumerate(zip(self.features, table.columns(), strict=True)):
            _reject_infinite(x, "OneHotEncoder")
            codes, known = feature.encode(x)
            if known.all():
                out[rows, codes + self.offsets[i]] = 1
                continue
            if self.error_on_unknown:
                unknown = list(dict.fromkeys(np.asarray(x, dtype=object)[~known].tolist()))
                raise ValueError(f"Found unknown categories {unknown} in column {i} during transform")
            out[rows[known], codes[known] + self.offsets[i]] = 1
        return out


class _Impute:
    """SimpleImputer on numeric data with NaN as the missing value: NaN -> ``statistics_``."""

    def __init__(self, imputer: Any, n_in: int) -> None:
        if imputer.strategy not in ("mean", "median", "most_frequent", "constant"):
            raise _Unsupported(f"SimpleImputer with strategy={imputer.strategy!r}")
        if not _is_scalar_nan(imputer.missing_values):
            raise _Unsupported(f"SimpleImputer with missing_values={imputer.missing_values!r} (only NaN)")
        if imputer.add_indicator:
            raise _Unsupported("SimpleImputer with add_indicator=True")
        fit_dtype = np.dtype(getattr(imputer, "_fit_dtype", np.float64))
        statistics = np.asarray(imputer.statistics_)
        if statistics.dtype.kind == "O" and all(_is_number(v) for v in statistics.tolist()):
            statistics = statistics.astype(np.float64)  # strategy="constant" keeps fill_value as an object
        if fit_dtype.kind not in "iuf" or statistics.dtype.kind not in "iuf":
            raise _Unsupported("SimpleImputer fitted on non-numeric data")
        if len(statistics) != n_in:
            raise _Unsupported(f"SimpleImputer fitted on {len(statistics)} columns but given {n_in}")
        self.keep = None
        if not imputer.keep_empty_features and np.isnan(statistics).any():
            self.keep = np.flatnonzero(~np.isnan(statistics))  # features all-missing at fit are dropped
            statistics = statistics[self.keep]
        self.statistics = statistics.astype(fit_dtype)
        self.float_only = imputer.strategy in ("mean", "median")  # others keep an integer dtype
        self.n_out = len(statistics)

    def __call__(self, table: _Table) -> np.ndarray:
        x = _float_matrix(table) if self.float_only else table.matrix()
        if x.dtype.kind == "O":
            x = x.astype(np.float64)
        _reject_infinite(x, "SimpleImputer")
        if self.keep is not None:
            x = x[:, self.keep]
        if x.dtype.kind != "f":
            return x  # an integer array has no NaN to fill
        missing = np.isnan(x)
        return np.where(missing, self.statistics.astype(x.dtype), x) if missing.any() else x


class _Scale:
    """StandardScaler: ``(x - mean_) / scale_`` in the input's float precision, like scikit-learn."""

    def __init__(self, scaler: Any, n_in: int) -> None:
        self.mean = np.asarray(scaler.mean_) if scaler.with_mean else None
        self.scale = np.asarray(scaler.scale_) if scaler.with_std else None
        n = scaler.n_features_in_
        if n != n_in:
            raise _Unsupported(f"StandardScaler fitted on {n} columns but given {n_in}")
        self.n_out = n

    def __call__(self, table: _Table) -> np.ndarray:
        x = _float_matrix(table)
        _reject_infinite(x, "StandardScaler")
        if self.mean is not None:
            x = x - self.mean.astype(x.dtype)
        if self.scale is not None:
            x = x / self.scale.astype(x.dtype)
        return x


class _Chain:
    """A nested Pipeline of transformers: each step's output is the next one's input."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.n_out = steps[-1].n_out

    def __call__(self, table: _Table) -> np.ndarray:
        out = self.steps[0](table)
        for step in self.steps[1:]:
            out = step(_Table(table.n, array=out))
        return out


class _Passthrough:
    """'passthrough': the selected columns as they are (a DataFrame slice, to numpy in hstack)."""

    def __init__(self, n_in: int) -> None:
        self.n_out = n_in

    def __call__(self, table: _Table) -> np.ndarray:
        return table.matrix()


def _compile_transformer(obj: Any, n_in: int) -> Any:
    """A fitted transformer as a step taking ``n_in`` columns, or _Unsupported naming it."""
    if isinstance(obj, str):
        if obj == "passthrough":
            return _Passthrough(n_in)
        raise _Unsupported(f"transformer {obj!r}")
    if _is_sklearn(obj, "OneHotEncoder"):
        return _OneHot(obj, n_in)
    if _is_sklearn(obj, "SimpleImputer"):
        return _Impute(obj, n_in)
    if _is_sklearn(obj, "StandardScaler"):
        return _Scale(obj, n_in)
    if _is_sklearn(obj, "Pipeline"):
        steps = []
        width = n_in
        for name, step in obj.steps:
            if step is None or (isinstance(step, str) and step == "passthrough"):
                continue
            try:
                compiled = _compile_transformer(step, width)
            except _Unsupported as exc:
                raise _Unsupported(f"in nested Pipeline step {name!r}: {exc}") from None
            steps.append(compiled)
            width = compiled.n_out
        return _Chain(steps) if steps else _Passthrough(n_in)
    raise _Unsupported(f"transformer {_label(obj)} is not supported")


# --------------------------------------------------------------------------------------------------
# ColumnTransformer.
# --------------------------------------------------------------------------------------------------
class _Columns:
    """ColumnTransformer: each part gets its columns of the input frame; outputs side by side."""

    def __init__(self, parts: list[tuple[list[int], Any]]) -> None:
        self.parts = parts
        self.n_out = sum(step.n_out for _, step in parts)

    def __call__(self, table: _Table) -> np.ndarray:
        cols = table.columns()
        blocks = [step(_Table(table.n, cols=[cols[i] for i in positions])) for positions, step in self.parts]
        if not blocks:
            return np.zeros((table.n, 0))
        return blocks[0] if len(blocks) == 1 else np.hstack(blocks)


def _selection(spec: Any, n_features: int, feature_names: list[str] | None) -> list[int]:
    """Indices into the fitted input features of a column selection (names, ints, slice, mask)."""
    if isinstance(spec, str | int | np.integer):
        raise _Unsupported(f"scalar column selection {spec!r} (use a list)")
    if isinstance(spec, slice):
        if not all(v is None or isinstance(v, int | np.integer) for v in (spec.start, spec.stop, spec.step)):
            raise _Unsupported(f"column selection by label slice {spec!r}")
        return list(range(n_features))[spec]
    if callable(spec):
        raise _Unsupported("callable column selection")
    items = list(np.asarray(spec, dtype=object).ravel()) if not isinstance(spec, list | tuple) else list(spec)
    if not items:
        return []
    if all(isinstance(v, bool | np.bool_) for v in items):
        if len(items) != n_features:
            raise _Unsupported("boolean column mask of the wrong length")
        return [i for i, keep in enumerate(items) if keep]
    if all(isinstance(v, str) for v in items):
        if feature_names is None:
            raise _Unsupported("columns selected by name but the ColumnTransformer was fitted without names")
        index = {name: i for i, name in enumerate(feature_names)}
        missing = [v for v in items if v not in index]
        if missing:
            raise _Unsupported(f"selected columns {missing} were not seen in fit")
        return [index[v] for v in items]
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in items):
        return [int(v) + n_features if int(v) < 0 else int(v) for v in items]
    raise _Unsupported(f"column selection {spec!r}")


def _column_transformer(ct: Any, columns: list[str]) -> tuple[_Columns, list[str]]:
    """The compiled ColumnTransformer and the input column names it reads, in the order it reads them."""
    if not hasattr(ct, "transformers_"):
        raise _Unsupported("ColumnTransformer is not fitted")
    if getattr(ct, "sparse_output_", False):
        raise _Unsupported("ColumnTransformer with sparse output")
    if ct.transformer_weights:
        raise _Unsupported("ColumnTransformer with transformer_weights")
    names_in = [str(v) for v in ct.feature_names_in_] if hasattr(ct, "feature_names_in_") else None
    n_in = int(ct.n_features_in_)
    # without names seen in fit, a DataFrame is selected by position: signature order
    frame_names = names_in if names_in is not None else list(columns)[:n_in]
    if names_in is None and len(columns) < n_in:
        raise _Unsupported(f"ColumnTransformer expects {n_in} columns, the signature has {len(columns)}")
    resolved = getattr(ct, "_transformer_to_input_indices", {})

    specs = list(ct.transformers)
    fitted = list(ct.transformers_)
    entries: list[tuple[str, Any, Any, Any]] = []  # name, original spec, fitted transformer, columns
    for (name, original, _), (fitted_name, trans, cols) in zip(specs, fitted, strict=False):
        if fitted_name != name:
            raise _Unsupported("ColumnTransformer transformers_ do not match transformers")
        entries.append((name, original, trans, cols))
    if len(fitted) == len(specs) + 1:
        name, trans, cols = fitted[-1]
        entries.append((name, ct.remainder, trans, cols))
    elif len(fitted) != len(specs):
        raise _Unsupported("ColumnTransformer transformers_ do not match transformers")

    parts: list[tuple[list[str], Any]] = []
    for name, original, trans, cols in entries:
        if isinstance(original, str) and original == "drop":
            continue
        if isinstance(trans, str) and trans == "drop":
            continue
        indices = _selection(cols, n_in, names_in)
        if name in resolved and sorted(indices) != sorted(int(i) for i in resolved[name]):
            raise _Unsupported(f"could not resolve the columns of ColumnTransformer part {name!r}")
        if not indices:
            continue  # scikit-learn skips empty selections
        if isinstance(original, str) and original == "passthrough":
            step: Any = _Passthrough(len(indices))
        else:
            try:
                step = _compile_transformer(trans, len(indices))
            except _Unsupported as exc:
                raise _Unsupported(f"ColumnTransformer part {name!r}: {exc}") from None
        parts.append(([frame_names[i] for i in indices], step))

    missing = sorted({c for names, _ in parts for c in names} - set(columns))
    if missing:
        raise _Unsupported(f"ColumnTransformer reads columns {missing} that are not in the signature")
    inputs = list(dict.fromkeys(c for names, _ in parts for c in names))
    position = {c: i for i, c in enumerate(inputs)}
    return _Columns([([position[c] for c in names], step) for names, step in parts]), inputs


# --------------------------------------------------------------------------------------------------
# Estimators.
# --------------------------------------------------------------------------------------------------
def _load_expit() -> Callable[[np.ndarray], np.ndarray]:
    """scipy's expit, which scikit-learn uses (bit-identical probabilities); numpy if scipy is absent."""
    try:
        from scipy.special import expit

        return expit  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return lambda x: 1.0 / (1.0 + np.exp(-x))


def _float64(table: _Table, n_features: int, name: str) -> np.ndarray:
    x = table.matrix()
    if x.shape[1] != n_features:
        raise ValueError(f"X has {x.shape[1]} features, but {name} is expecting {n_features} features as input.")
    return x if x.dtype == np.float64 else x.astype(np.float64)


class _Trees:
    """HistGradientBoosting raw scores: baseline + every tree's leaf value, walked with numpy.

    All trees' nodes live in flat arrays with each node's two children stored side by side, so one
    step of the walk is ``node = first_child[node] + (x[feature] > threshold)`` for every (tree, row)
    pair at once. Leaves point to themselves. Trees are sorted deepest first so each level only
    touches the trees still walking (a prefix). NaN routing (``missing_go_to_left``) is folded into
    the data: a node reads the feature with NaN replaced by -inf (NaN goes left) or +inf (NaN goes
    right); a "split on NaN" node (threshold +inf, NaN right) reads a 0/1 NaN indicator instead.
    """

    def __init__(self, model: Any) -> None:
        if getattr(model, "_preprocessor", None) is not None:
            raise _Unsupported(f"{type(model).__name__} with categorical features")
        is_categorical = getattr(model, "is_categorical_", None)
        if is_categorical is not None and np.asarray(is_categorical).any():
            raise _Unsupported(f"{type(model).__name__} with categorical features")
        if model.n_trees_per_iteration_ != 1:
            raise _Unsupported(f"{type(model).__name__} with {model.n_trees_per_iteration_} trees per iteration")
        self.n_features = int(model.n_features_in_)
        self.name = type(model).__name__
        self.baseline = float(np.asarray(model._baseline_prediction).ravel()[0])
        trees = [predictor.nodes for iteration in model._predictors for predictor in iteration]
        if any(np.asarray(nodes["is_categorical"]).any() for nodes in trees):
            raise _Unsupported(f"{self.name} with categorical splits")
        self.n_trees = len(trees)
        depths = np.array([int(nodes["depth"].max()) for nodes in trees], dtype=np.intp)
        order = np.argsort(-depths, kind="stable")
        self.restore = np.argsort(order)  # sorted position -> original tree order, for the sum
        p = self.n_features
        columns, thresholds, children, values, roots = [], [], [], [], []
        offset = 0
        for t in order:
            column, threshold, child, value = _flatten_tree(trees[t], p)
            columns.append(column)
            thresholds.append(threshold)
            children.append(child + offset)
            values.append(value)
            roots.append(offset)
            offset += len(column)
        self.column = np.concatenate(columns) if columns else np.zeros(0, np.intp)
        self.threshold = np.concatenate(thresholds) if thresholds else np.zeros(0)
        self.child = np.concatenate(children) if children else np.zeros(0, np.intp)
        self.value = np.concatenate(values) if values else np.zeros(0)
        self.roots = np.asarray(roots, dtype=np.intp)
        sorted_depths = depths[order]
        self.active = [int((sorted_depths > level).sum()) for level in range(int(depths.max(initial=0)))]
        self.uses_indicator = bool((self.column >= 2 * p).any())

    def raw(self, table: _Table) -> np.ndarray:
        """Raw scores, shape (n,): the trees summed in their order after the baseline."""
        x = _float64(table, self.n_features, self.name)
        if x.shape[0] <= _WALK_CHUNK_ROWS:
            return self._raw(x)
        # the walk's working set is (trees x rows): chunks keep it in cache
        chunks = [self._raw(x[i : i + _WALK_CHUNK_ROWS]) for i in range(0, x.shape[0], _WALK_CHUNK_ROWS)]
        return np.concatenate(chunks)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        missing = np.isnan(x)
        if missing.any():
            parts = [np.where(missing, -np.inf, x), np.where(missing, np.inf, x)]
        else:
            parts = [x, x]
        if self.uses_indicator:
            parts.append(missing)
        data = np.concatenate(parts, axis=1).ravel()
        column, threshold, child = self.column, self.threshold, self.child
        if n == 1:
            # one row: decide every node once (a few vectorised ops over all nodes), then each
            # level of the walk is a single lookup
            following = child + (data.take(column) > threshold)
            node = self.roots.copy()
            for k in self.active:
                node[:k] = following.take(node[:k])
            terms = np.empty(self.n_trees + 1)
            terms[0] = self.baseline
            self.value.take(node[self.restore], out=terms[1:])
            return np.cumsum(terms)[-1:]  # sequential, as scikit-learn adds tree by tree
        row_start = np.arange(n) * (len(parts) * self.n_features)
        node = np.repeat(self.roots[:, None], n, axis=1)  # (trees, rows)
        for k in self.active:
            current = node[:k]
            index = column.take(current)
            index += row_start
            right = data.take(index) > threshold.take(current)
            np.add(child.take(current), right, out=current)
        terms = np.empty((self.n_trees + 1, n))
        terms[0] = self.baseline
        self.value.take(node[self.restore], out=terms[1:])
        return terms.sum(axis=0)  # reducing the outer axis adds row after row: sequential too


def _flatten_tree(nodes: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One tree renumbered breadth first so siblings are adjacent: (column, threshold, child, value).

    ``column`` indexes the walk's data row [x with NaN->-inf | x with NaN->+inf | isnan(x)].
    """
    size = len(nodes)
    is_leaf = np.asarray(nodes["is_leaf"]).astype(bool)
    left = np.asarray(nodes["left"]).astype(np.intp)
    right = np.asarray(nodes["right"]).astype(np.intp)
    new_id = np.full(size, -1, dtype=np.intp)
    new_id[0] = 0
    queue = deque([0])
    next_id = 1
    while queue:
        i = queue.popleft()
        if not is_leaf[i]:
            new_id[left[i]], new_id[right[i]] = next_id, next_id + 1
            next_id += 2
            queue.extend((left[i], right[i]))
    if next_id != size or (new_id < 0).any():
        raise _Unsupported("a HistGradientBoosting tree is not a proper binary tree")
    old_id = np.empty(size, dtype=np.intp)
    old_id[new_id] = np.arange(size)
    tree = nodes[old_id]
    leaf = is_leaf[old_id]
    feature = np.asarray(tree["feature_idx"]).astype(np.intp)
    threshold = np.asarray(tree["num_threshold"]).astype(np.float64)
    nan_left = np.asarray(tree["missing_go_to_left"]).astype(bool)
    if ((feature < 0) | (feature >= n_features))[~leaf].any():
        raise _Unsupported("a HistGradientBoosting node splits on a feature out of range")
    column = np.where(nan_left, feature, n_features + feature)
    nan_split = ~nan_left & np.isposinf(threshold)  # NaN right, every number (even +inf) left
    column = np.where(nan_split, 2 * n_features + feature, column)
    threshold = np.where(nan_split, 0.5, threshold)
    child = np.arange(size, dtype=np.intp)
    child[~leaf] = new_id[left[old_id][~leaf]]
    column[leaf] = 0
    threshold[leaf] = np.inf  # nothing is > +inf: a leaf stays where it is
    value = np.where(leaf, np.asarray(tree["value"]).astype(np.float64), 0.0)
    return column.astype(np.intp), threshold, child, value


class _TreeRegressor:
    """HistGradientBoostingRegressor.predict: inverse link of the raw score."""

    def __init__(self, model: Any) -> None:
        link = type(model._loss.link).__name__
        if link not in ("IdentityLink", "LogLink"):
            raise _Unsupported(f"HistGradientBoostingRegressor with loss {model.loss!r} ({link})")
        self.trees = _Trees(model)
        self.log_link = link == "LogLink"
        self.n_features = self.trees.n_features

    def __call__(self, table: _Table) -> np.ndarray:
        raw = self.trees.raw(table)
        return np.exp(raw) if self.log_link else raw


class _TreeClassifier:
    """Binary HistGradientBoostingClassifier.predict_proba: [1 - expit(raw), expit(raw)]."""

    def __init__(self, model: Any) -> None:
        if len(model.classes_) != 2:
            raise _Unsupported(f"HistGradientBoostingClassifier with {len(model.classes_)} classes (binary only)")
        loss, link = type(model._loss).__name__, type(model._loss.link).__name__
        if loss != "HalfBinomialLoss" or link != "LogitLink":
            raise _Unsupported(f"HistGradientBoostingClassifier with loss {loss} ({link})")
        self.trees = _Trees(model)
        self.expit = _load_expit()
        self.n_features = self.trees.n_features

    def __call__(self, table: _Table) -> np.ndarray:
        raw = self.trees.raw(table)
        proba = np.empty((raw.shape[0], 2))
        proba[:, 1] = self.expit(raw)
        proba[:, 0] = 1 - proba[:, 1]
        return proba


class _Logistic:
    """Binary LogisticRegression.predict_proba: expit(X @ coef_.T + intercept_), as [1 - p, p]."""

    def __init__(self, model: Any) -> None:
        if len(model.classes_) != 2:
            raise _Unsupported(f"LogisticRegression with {len(model.classes_)} classes (binary only)")
        self.coef_t = np.asarray(model.coef_).T
        self.intercept = np.asarray(model.intercept_)
        if self.coef_t.ndim != 2 or self.coef_t.shape[1] != 1:
            raise _Unsupported(f"LogisticRegression with coef_ of shape {np.shape(model.coef_)}")
        self.n_features = self.coef_t.shape[0]
        self.expit = _load_expit()

    def __call__(self, table: _Table) -> np.ndarray:
        x = _float64(table, self.n_features, "LogisticRegression")
        if not np.isfinite(x).all():
            raise ValueError("Input X contains NaN or infinity (LogisticRegression).")
        p = self.expit((x @ self.coef_t + self.intercept).reshape(-1))
        return np.stack([1 - p, p], axis=1)


_ESTIMATORS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "HistGradientBoostingRegressor": ("predict", _TreeRegressor),
    "HistGradientBoostingClassifier": ("predict_proba", _TreeClassifier),
    "LogisticRegression": ("predict_proba", _Logistic),
}


# --------------------------------------------------------------------------------------------------
# The compiled model.
# --------------------------------------------------------------------------------------------------
class CompiledModel:
    """A compiled pipeline: ``predict`` takes one 1-D array per input column, returns what
    ``getattr(model, predict_fn)(pandas.DataFrame(data))`` returns. Stateless, thread-safe.

    ``max_rows_faster``: above this many rows scikit-learn is as fast or faster; use it there.
    """

    def __init__(self, inputs: list[str], steps: list[Any], head: Any, description: str) -> None:
        self.inputs = inputs  # the columns read, in the order the first step reads them
        self._steps = steps
        self._head = head
        self.description = description
        trees = isinstance(head, _TreeRegressor | _TreeClassifier)
        self.max_rows_faster = MAX_ROWS_FASTER_TREES if trees else MAX_ROWS_FASTER_LINEAR

    def __repr__(self) -> str:
        return f"CompiledModel({self.description})"

    def predict(self, data: Mapping[str, np.ndarray]) -> np.ndarray:
        arrays = [np.asarray(data[name]) for name in self.inputs]
        n = len(arrays[0]) if arrays else _rows(data)
        if n == 0:
            raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required.")
        for name, array in zip(self.inputs, arrays, strict=True):
            if array.ndim != 1 or len(array) != n:
                raise ValueError(f"column {name!r} must be a 1-D array of {n} values, got shape {array.shape}")
        table = _Table(n, cols=arrays)
        for step in self._steps:
            table = _Table(n, array=step(table))
        return self._head(table)  # type: ignore[no-any-return]


def _rows(data: Mapping[str, Any]) -> int:
    for value in data.values():
        return len(value)
    raise ValueError("no input columns")


def _flatten_steps(model: Any) -> list[tuple[str, Any]]:
    """Top-level steps with nested pipelines inlined and 'passthrough'/None steps dropped."""
    if not _is_sklearn(model, "Pipeline"):
        return [(type(model).__name__, model)]
    steps: list[tuple[str, Any]] = []
    for name, step in model.steps:
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        steps.extend(_flatten_steps(step) if _is_sklearn(step, "Pipeline") else [(name, step)])
    return steps


def _compile(model: Any, predict_fn: str, columns: list[str]) -> CompiledModel:
    steps = _flatten_steps(model)
    if not steps:
        raise _Unsupported("empty Pipeline")
    est_name, estimator = steps[-1]
    kind = type(estimator).__name__
    if kind not in _ESTIMATORS or not _is_sklearn(estimator, kind):
        raise _Unsupported(f"estimator {_label(estimator)} (step {est_name!r}) is not supported")
    expected_fn, make_head = _ESTIMATORS[kind]
    if predict_fn != expected_fn:
        raise _Unsupported(f"{kind}.{predict_fn} (only {expected_fn} is supported)")

    compiled_steps: list[Any] = []
    described: list[str] = []
    inputs: list[str]
    width: int
    first_name, first = steps[0]
    if _is_sklearn(first, "ColumnTransformer"):
        ct, inputs = _column_transformer(first, columns)
        compiled_steps.append(ct)
        described.append(f"ColumnTransformer({len(ct.parts)} parts)")
        width = ct.n_out
        rest = steps[1:-1]
    else:
        if hasattr(first, "feature_names_in_"):
            inputs = [str(v) for v in first.feature_names_in_]
        else:
            n_in = int(getattr(first, "n_features_in_", len(columns)))
            inputs = list(columns)[:n_in]
        missing = sorted(set(inputs) - set(columns))
        if missing:
            raise _Unsupported(f"step {first_name!r} reads columns {missing} that are not in the signature")
        width = len(inputs)
        rest = steps[:-1]
    for name, step in rest:
        if _is_sklearn(step, "ColumnTransformer"):
            raise _Unsupported(f"ColumnTransformer as step {name!r} (only as the first step)")
        try:
            compiled = _compile_transformer(step, width)
        except _Unsupported as exc:
            raise _Unsupported(f"step {name!r}: {exc}") from None
        compiled_steps.append(compiled)
        described.append(type(step).__name__)
        width = compiled.n_out

    head = make_head(estimator)
    if head.n_features != width:
        raise _Unsupported(f"{kind} expects {head.n_features} features but the steps before it give {width}")
    if isinstance(head, _TreeRegressor):
        kind += f"({head.trees.n_trees} trees, {'log' if head.log_link else 'identity'} link)"
    elif isinstance(head, _TreeClassifier):
        kind += f"({head.trees.n_trees} trees, logit link)"
    description = " -> ".join([*described, kind])
    return CompiledModel(inputs, compiled_steps, head, description)


def compile_model(model: Any, predict_fn: str, columns: Sequence[str]) -> tuple[CompiledModel | None, str]:
    """(compiled model, "") when every step is supported, else (None, why not: the step/option).

    ``columns`` are the input column names in signature order (the frame the model would get).
    """
    try:
        return _compile(model, predict_fn, list(columns)), ""
    except _Unsupported as exc:
        return None, str(exc)
    except Exception as exc:  # an attribute we did not expect: keep scikit-learn, say why
        return None, f"could not compile {_label(model)}: {type(exc).__name__}: {exc}"
