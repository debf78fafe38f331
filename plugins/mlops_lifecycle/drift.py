"""Drift statistics: a reference profile computed once, then each check of current data against it. Plain functions.

Numeric columns: population stability index (PSI) over the reference's deciles and the two-sample
Kolmogorov-Smirnov test; categorical columns: PSI over the categories and a chi-squared test of the two
samples' category counts. Beside them data quality: the null rate against the reference's, values outside the
reference's range, categories the reference never saw, and values that are not of the column's kind.

A test's p-value is judged family-wise over the columns of one check (Bonferroni): with a million current
rows every column would otherwise show some "significant" wobble. Too few current rows give statistics and
no verdict. numpy, pandas and scipy are imported inside the functions (parse time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from numpy.typing import ArrayLike

NUMERIC, CATEGORICAL = "numeric", "categorical"
KINDS = (NUMERIC, CATEGORICAL)
DECILES = 10
MAX_UNSEEN_EXAMPLES = 5
MAX_PLOT_CATEGORIES = 20  # categories drawn beside "(other)"
OTHER = "(other)"
_EXAMPLE_CHARS = 40  # a value quoted in a breach reason is cut to this many characters


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.2  # population stability index at or above: drifted
    p_value: float = 0.01  # family-wise over the columns of one check: each test uses p_value / n_columns
    null_rate_increase: float = 0.05  # current null rate minus the reference's, above: breach
    out_of_range_rate: float = 0.05  # share of numeric values outside the reference [min, max], above: breach
    unseen_rate: float = 0.05  # share of categorical values never seen in the reference, above: breach
    min_rows: int = 1000  # fewer current rows: statistics reported, no verdict (PSI's noise floor is ~bins/rows)


@dataclass(frozen=True)
class ColumnReference:
    """One column of the reference, precomputed once and reused for every check."""

    name: str
    kind: str  # "numeric" | "categorical"
    rows: int
    null_rate: float
    sorted_values: np.ndarray | None  # numeric: the non-null reference values, sorted (float64)
    bin_edges: np.ndarray | None  # numeric: -inf, the deciles (duplicates merged), +inf
    bin_shares: np.ndarray | None  # numeric: reference share per bin
    categories: dict[str, float] | None  # categorical: reference share per category (values as str)
    minimum: float | None
    maximum: float | None


@dataclass(frozen=True)
class ColumnDrift:
    name: str
    kind: str
    rows: int  # current rows
    psi: float | None
    test: str  # "ks" | "chi2"
    statistic: float | None  # KS D, or chi-squared
    p_value: float | None
    null_rate: float
    reference_null_rate: float
    out_of_range_rate: float | None  # numeric only
    unseen_rate: float | None  # categorical only
    unseen_examples: tuple[str, ...]  # up to 5 unseen categories, most frequent first
    schema_violations: int  # values not of the column's kind; a missing column counts every row
    bins: dict[str, list[Any]]  # for the plot, see _numeric_bins and _categorical_bins
    breaches: tuple[str, ...]  # human-readable reasons

    @property
    def drifted(self) -> bool:
        return bool(self.breaches)


@dataclass(frozen=True)
class DriftResult:
    rows: int
    judged: bool  # rows >= min_rows; when False no column has breaches
    columns: dict[str, ColumnDrift]  # the features, in reference order
    prediction: ColumnDrift | None
    thresholds: DriftThresholds

    @property
    def breaches(self) -> list[tuple[str, str]]:
        """(column, reason) for every breach of the features and the prediction."""
        checked = [*self.columns.values(), *([self.prediction] if self.prediction else [])]
        return [(c.name, reason) for c in checked for reason in c.breaches]


# --- statistics -------------------------------------------------------------------------------------------


def psi(reference_shares: ArrayLike, current_shares: ArrayLike, epsilon: float = 1e-4) -> float:
    """Population stability index: sum((c - r) * ln(c / r)), shares floored at ``epsilon`` (empty bins)."""
    import numpy as np

    r = np.maximum(np.asarray(reference_shares, dtype=np.float64), epsilon)
    c = np.maximum(np.asarray(current_shares, dtype=np.float64), epsilon)
    if r.shape != c.shape:
        raise ValueError(f"psi: {r.shape[0]} reference bins vs {c.shape[0]} current bins")
    return float(np.sum((c - r) * np.log(c / r)))


def ks_2samp(reference_sorted: ArrayLike, current: ArrayLike) -> tuple[float, float]:
    """Two-sided two-sample KS test: (D, p), as ``scipy.stats.ks_2samp(..., method="asymp")``; NaNs dropped."""
    import numpy as np

    ref = np.asarray(reference_sorted, dtype=np.float64)
    ref = ref[~np.isnan(ref)]
    if ref.size > 1 and bool(np.any(ref[1:] < ref[:-1])):
        raise ValueError("ks_2samp: reference_sorted is not sorted")
    cur = np.sort(np.asarray(current, dtype=np.float64))  # NaNs sort last
    cur = cur[: cur.size - int(np.count_nonzero(np.isnan(cur)))]
    if ref.size == 0 or cur.size == 0:
        raise ValueError("ks_2samp: both samples need at least one value")
    return _ks(ref, cur)


def _ks(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[float, float]:
    """KS on two sorted NaN-free samples, evaluated only at the distinct reference values.

    Between two consecutive reference values the reference CDF is flat and the current CDF rises, so
    F_ref - F_cur is largest at the interval's left end (a reference value) and F_cur - F_ref just before
    its right end: #(current < next reference value). These are the values scipy evaluates at every point of
    both samples, computed the same way (count / size), so D is the same number. Locating the reference values
    in the sorted current sample costs two binary searches per distinct reference value.
    """
    import numpy as np
    from scipy.stats import kstwo

    m, n = ref_sorted.size, cur_sorted.size
    distinct = np.empty(m, dtype=bool)
    distinct[:-1] = ref_sorted[1:] != ref_sorted[:-1]
    distinct[-1] = True
    values = ref_sorted[distinct]  # the distinct reference values, each at its last occurrence
    ref_cdf = (np.flatnonzero(distinct) + 1) / m  # F_ref at each distinct value
    cur_le = np.searchsorted(cur_sorted, values, side="right") / n  # F_cur at each distinct value
    cur_lt = np.searchsorted(cur_sorted, values, side="left") / n  # F_cur just below it
    below = float(np.max(ref_cdf - cur_le))  # F_ref - F_cur, at the reference values
    above = max(float(cur_lt[0]), float(np.max(cur_lt[1:] - ref_cdf[:-1], initial=0.0)))
    d = max(below, above, 0.0)
    # scipy's asymptotic two-sided p: the Kolmogorov distribution of D for n = round(m*n / (m + n))
    big, small = sorted([float(m), float(n)], reverse=True)
    en = big * small / (big + small)
    p = float(np.clip(kstwo.sf(d, np.round(en)), 0.0, 1.0))
    return d, p


def chi2_two_sample(reference_counts: ArrayLike, current_counts: ArrayLike) -> tuple[float, float]:
    """Chi-squared test of homogeneity of two count vectors over the same categories: (statistic, p).

    As ``scipy.stats.chi2_contingency([ref, cur], correction=False)[:2]``; categories empty in both are left
    out (scipy refuses their zero expected counts), one remaining category gives (0, 1).
    """
    import numpy as np
    from scipy.stats import chi2

    ref = np.asarray(reference_counts, dtype=np.float64)
    cur = np.asarray(current_counts, dtype=np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"chi2_two_sample: {ref.shape[0]} reference categories vs {cur.shape[0]} current")
    seen = (ref + cur) > 0
    ref, cur = ref[seen], cur[seen]
    ref_total, cur_total = float(ref.sum()), float(cur.sum())
    if ref_total <= 0 or cur_total <= 0:
        raise ValueError("chi2_two_sample: both samples need at least one count")
    if ref.size < 2:
        return 0.0, 1.0
    total = ref_total + cur_total
    both = ref + cur
    statistic = 0.0
    for observed, row_total in ((ref, ref_total), (cur, cur_total)):
        expected = row_total * both / total
        statistic += float(np.sum((observed - expected) ** 2 / expected))
    return statistic, float(chi2.sf(statistic, ref.size - 1))


# --- reading columns --------------------------------------------------------------------------------------


def _example(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 3] + "..."


def _numeric_column(series: pd.Series) -> tuple[np.ndarray, int, int, list[str]]:
    """(float64 values with NaN where null or not numeric, nulls, schema violations, a few violating values)."""
    import numpy as np
    import pandas as pd

    if pd.api.types.is_numeric_dtype(series.dtype):  # bool included: False/True as 0/1
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, int(np.count_nonzero(np.isnan(values))), 0, []
    missing = series.isna().to_numpy(dtype=bool)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(values) & ~missing
    violations = int(np.count_nonzero(bad))
    examples = [_example(v) for v in series[bad].unique()[:3]] if violations else []
    return values, int(np.count_nonzero(missing)), violations, examples


def _label(value: object) -> str:
    """A category as str; an integral float reads as the integer (an int column with nulls is read as float)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _label(value.item())
    return str(value)


def _category_counts(series: pd.Series) -> tuple[dict[str, int], int]:
    """(count per category label, most frequent first; nulls)."""
    counts = series.value_counts(dropna=True, sort=True)
    labels: dict[str, int] = {}
    for value, count in zip(counts.index.tolist(), counts.tolist(), strict=True):
        if count:
            label = _label(value)
            labels[label] = labels.get(label, 0) + int(count)
    nulls = len(series) - sum(labels.values())
    return dict(sorted(labels.items(), key=lambda kv: -kv[1])), nulls


def _bin_counts(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Values per bin [edge_i, edge_i+1) of ``edges`` (outer edges infinite), by binary search in sorted values."""
    import numpy as np

    inner = np.searchsorted(sorted_values, edges[1:-1], side="left")
    return np.diff(np.concatenate(([0], inner, [sorted_values.size])))


# --- the reference ----------------------------------------------------------------------------------------


def reference_from_frame(frame: pd.DataFrame, kinds: Mapping[str, str]) -> dict[str, ColumnReference]:
    """The reference profile of ``frame``'s columns named in ``kinds`` (column -> "numeric" | "categorical").

    Include the prediction column (numeric) to check prediction drift. A reference is trusted data: a missing
    column, an unknown kind or a non-numeric value in a numeric column is refused (ValueError).
    """
    import numpy as np

    missing = [c for c in kinds if c not in frame.columns]
    if missing:
        raise ValueError(f"reference: column(s) {missing} not in the reference data")
    reference: dict[str, ColumnReference] = {}
    rows = len(frame)
    for name, kind in kinds.items():
        series = frame[name]
        if kind == NUMERIC:
            values, nulls, violations, examples = _numeric_column(series)
            if violations:
                raise ValueError(f"reference: {violations} non-numeric value(s) in numeric column {name!r}: {examples}")
            ordered = np.sort(values)
            ordered = ordered[: ordered.size - nulls]  # NaNs sort last
            if ordered.size:
                deciles = ordered[(ordered.size * np.arange(1, DECILES)) // DECILES]
                edges = np.concatenate(([-np.inf], np.unique(deciles), [np.inf]))
            else:
                edges = np.array([-np.inf, np.inf])
            shares = _bin_counts(ordered, edges) / max(ordered.size, 1)
            reference[name] = ColumnReference(
                name=name,
                kind=kind,
                rows=rows,
                null_rate=nulls / rows if rows else 0.0,
                sorted_values=ordered,
                bin_edges=edges,
                bin_shares=shares,
                categories=None,
                minimum=float(ordered[0]) if ordered.size else None,
                maximum=float(ordered[-1]) if ordered.size else None,
            )
        elif kind == CATEGORICAL:
            counts, nulls = _category_counts(series)
            present = rows - nulls
            reference[name] = ColumnReference(
                name=name,
                kind=kind,
                rows=rows,
                null_rate=nulls / rows if rows else 0.0,
                sorted_values=None,
                bin_edges=None,
                bin_shares=None,
                categories={label: count / present for label, count in counts.items()},
                minimum=None,
                maximum=None,
            )
        else:
            raise ValueError(f"reference: column {name!r} has kind {kind!r}, not one of {KINDS}")
    return reference


# --- a check ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    """What a column's breaches are judged against in one check."""

    thresholds: DriftThresholds
    tests: int  # Bonferroni: the columns tested in this check
    judged: bool

    @property
    def alpha(self) -> float:
        return self.thresholds.p_value / self.tests


def _g(value: float) -> str:
    return f"{value:.3g}"


def _common_breaches(
    ref: ColumnReference, test: str, psi_value: float | None, p: float | None, null_rate: float, verdict: _Verdict
) -> list[str]:
    t = verdict.thresholds
    reasons = []
    if psi_value is not None and psi_value >= t.psi:
        reasons.append(f"psi {_g(psi_value)} >= {_g(t.psi)}")
    if p is not None and p < verdict.alpha:
        reasons.append(f"{test} p={p:.2g} < {verdict.alpha:.2g} ({_g(t.p_value)} over {verdict.tests} columns)")
    increase = null_rate - ref.null_rate
    if increase > t.null_rate_increase:
        reasons.append(
            f"null rate {_g(null_rate)} vs {_g(ref.null_rate)} in the reference "
            f"(+{_g(increase)} > {_g(t.null_rate_increase)})"
        )
    return reasons


def _numeric_drift(ref: ColumnReference, series: pd.Series, verdict: _Verdict) -> ColumnDrift:
    import numpy as np

    assert ref.sorted_values is not None and ref.bin_edges is not None and ref.bin_shares is not None
    rows = len(series)
    values, nulls, violations, examples = _numeric_column(series)
    ordered = np.sort(values)  # NaN (null, not numeric) last
    ordered = ordered[: ordered.size - nulls - violations]
    null_rate = nulls / rows if rows else 0.0
    psi_value: float | None = None
    statistic: float | None = None
    p: float | None = None
    out_of_range: float | None = None
    current_shares = np.zeros_like(ref.bin_shares)
    if ordered.size:
        current_shares = _bin_counts(ordered, ref.bin_edges) / ordered.size
        if ref.sorted_values.size:
            psi_value = psi(ref.bin_shares, current_shares)
            statistic, p = _ks(ref.sorted_values, ordered)
            assert ref.minimum is not None and ref.maximum is not None
            low = int(np.searchsorted(ordered, ref.minimum, side="left"))
            high = int(np.searchsorted(ordered, ref.maximum, side="right"))
            out_of_range = (ordered.size - (high - low)) / ordered.size
    reasons = _common_breaches(ref, "ks", psi_value, p, null_rate, verdict)
    t = verdict.thresholds
    if out_of_range is not None and out_of_range > t.out_of_range_rate:
        reasons.append(
            f"out of range {_g(out_of_range)} > {_g(t.out_of_range_rate)} "
            f"(outside the reference [{ref.minimum:.6g}, {ref.maximum:.6g}])"
        )
    if violations:
        # no example values: reasons go to alerts, tags and asset events; the values stay in the report
        reasons.append(f"{violations} value(s) not numeric")
    return ColumnDrift(
        name=ref.name,
        kind=ref.kind,
        rows=rows,
        psi=psi_value,
        test="ks",
        statistic=statistic,
        p_value=p,
        null_rate=null_rate,
        reference_null_rate=ref.null_rate,
        out_of_range_rate=out_of_range,
        unseen_rate=None,
        unseen_examples=(),
        schema_violations=violations,
        bins={
            "edges": ref.bin_edges[1:-1].tolist(),
            "reference": ref.bin_shares.tolist(),
            "current": current_shares.tolist(),
        },
        breaches=tuple(reasons) if verdict.judged else (),
    )


def _categorical_bins(labels: Sequence[str], reference: np.ndarray, current: np.ndarray) -> dict[str, list[Any]]:
    """The plot's bars: the categories largest on either side, the rest summed as "(other)"."""
    import numpy as np

    order = np.argsort(-np.maximum(reference, current), kind="stable")
    top, rest = order[:MAX_PLOT_CATEGORIES], order[MAX_PLOT_CATEGORIES:]
    bins: dict[str, list[Any]] = {
        "labels": [labels[i] for i in top],
        "reference": reference[top].tolist(),
        "current": current[top].tolist(),
    }
    if rest.size:
        bins["labels"].append(OTHER)
        bins["reference"].append(float(reference[rest].sum()))
        bins["current"].append(float(current[rest].sum()))
    return bins


def _categorical_drift(ref: ColumnReference, series: pd.Series, verdict: _Verdict) -> ColumnDrift:
    import numpy as np

    assert ref.categories is not None
    rows = len(series)
    counts, nulls = _category_counts(series)
    present = rows - nulls
    null_rate = nulls / rows if rows else 0.0
    unseen = [label for label in counts if label not in ref.categories]  # most frequent first
    labels = [*ref.categories, *unseen]
    ref_present = round(ref.rows * (1.0 - ref.null_rate))
    ref_shares = np.array([*ref.categories.values(), *([0.0] * len(unseen))])
    cur_counts = np.array([counts.get(label, 0) for label in labels], dtype=np.float64)
    cur_shares = cur_counts / present if present else np.zeros_like(cur_counts)
    psi_value: float | None = None
    statistic: float | None = None
    p: float | None = None
    unseen_rate: float | None = None
    if present:
        unseen_rate = sum(counts[label] for label in unseen) / present
        if ref_present:
            psi_value = psi(ref_shares, cur_shares)
            statistic, p = chi2_two_sample(np.round(ref_shares * ref_present), cur_counts)
    reasons = _common_breaches(ref, "chi2", psi_value, p, null_rate, verdict)
    t = verdict.thresholds
    if unseen_rate is not None and unseen_rate > t.unseen_rate:
        reasons.append(f"unseen categories {_g(unseen_rate)} > {_g(t.unseen_rate)} ({len(unseen)} distinct)")
    return ColumnDrift(
        name=ref.name,
        kind=ref.kind,
        rows=rows,
        psi=psi_value,
        test="chi2",
        statistic=statistic,
        p_value=p,
        null_rate=null_rate,
        reference_null_rate=ref.null_rate,
        out_of_range_rate=None,
        unseen_rate=unseen_rate,
        unseen_examples=tuple(unseen[:MAX_UNSEEN_EXAMPLES]),
        schema_violations=0,
        bins=_categorical_bins(labels, ref_shares, cur_shares),
        breaches=tuple(reasons) if verdict.judged else (),
    )


def _missing_drift(ref: ColumnReference, rows: int, verdict: _Verdict) -> ColumnDrift:
    """A column the current data lacks: every row a schema violation, no statistics."""
    numeric = ref.kind == NUMERIC
    return ColumnDrift(
        name=ref.name,
        kind=ref.kind,
        rows=rows,
        psi=None,
        test="ks" if numeric else "chi2",
        statistic=None,
        p_value=None,
        null_rate=1.0 if rows else 0.0,
        reference_null_rate=ref.null_rate,
        out_of_range_rate=None,
        unseen_rate=None,
        unseen_examples=(),
        schema_violations=rows,
        bins={"edges" if numeric else "labels": [], "reference": [], "current": []},
        breaches=("column missing from the current data",) if verdict.judged else (),
    )


def _column_drift(ref: ColumnReference, current: pd.DataFrame, verdict: _Verdict) -> ColumnDrift:
    if ref.name not in current.columns:
        return _missing_drift(ref, len(current), verdict)
    if ref.kind == NUMERIC:
        return _numeric_drift(ref, current[ref.name], verdict)
    return _categorical_drift(ref, current[ref.name], verdict)


def check_drift(
    reference: Mapping[str, ColumnReference],
    current: pd.DataFrame,
    thresholds: DriftThresholds = DriftThresholds(),
    prediction_column: str | None = "prediction",
) -> DriftResult:
    """Every reference column of ``current`` against the reference; the prediction column as prediction drift.

    Columns of ``current`` the reference does not name are not looked at.
    """
    rows = len(current)
    features = [ref for name, ref in reference.items() if name != prediction_column]
    predicted = reference.get(prediction_column) if prediction_column is not None else None
    verdict = _Verdict(
        thresholds=thresholds,
        tests=max(len(features) + (predicted is not None), 1),
        judged=rows >= thresholds.min_rows,
    )
    return DriftResult(
        rows=rows,
        judged=verdict.judged,
        columns={ref.name: _column_drift(ref, current, verdict) for ref in features},
        prediction=_column_drift(predicted, current, verdict) if predicted is not None else None,
        thresholds=thresholds,
    )
