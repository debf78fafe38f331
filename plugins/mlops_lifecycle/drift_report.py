"""The drift report an operator reads in MLflow: one HTML page and one PNG of the columns that drifted.

Plain functions over ``drift.DriftResult``; matplotlib is imported only when the plot is drawn. Column names
and category values come from the data, so the page escapes every one and the plot never reads them as
math text.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mlops_lifecycle.drift import ColumnDrift, DriftResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPORT_HTML = "drift_report.html"
REPORT_PNG = "drift_report.png"
MAX_PLOTS = 12
QUIET_PLOTS = 3  # when nothing drifted: the columns with the highest PSI
_PLOT_COLUMNS = 3
_LABEL_CHARS = 24  # a category drawn on an axis is cut to this many characters


def _checked(result: DriftResult) -> list[ColumnDrift]:
    return [*result.columns.values(), *([result.prediction] if result.prediction else [])]


def _by_psi(columns: list[ColumnDrift]) -> list[ColumnDrift]:
    """Highest PSI first; columns without one (missing, empty) last, in their order."""
    return sorted(columns, key=lambda c: -math.inf if c.psi is None else -c.psi)


def plotted_columns(result: DriftResult) -> list[ColumnDrift]:
    """What the PNG shows: the drifted columns, highest PSI first (at most 12), else the 3 highest PSIs."""
    checked = _checked(result)
    drifted = [c for c in checked if c.drifted]
    if drifted:
        return _by_psi(drifted)[:MAX_PLOTS]
    return _by_psi([c for c in checked if c.psi is not None])[:QUIET_PLOTS]


def _cut(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


def _bin_labels(column: ColumnDrift) -> list[str]:
    """Numeric: the bins' ranges ("< 3.2", "[3.2, 5.1)", ">= 9.8"); categorical: the categories."""
    if "labels" in column.bins:
        return [_cut(str(label)) for label in column.bins["labels"]]
    edges = [f"{e:.3g}" for e in column.bins["edges"]]
    if not edges:
        return ["all"] if column.bins["reference"] else []
    return [f"< {edges[0]}", *(f"[{a}, {b})" for a, b in zip(edges, edges[1:], strict=False)), f">= {edges[-1]}"]


def render_png(result: DriftResult, title: str) -> bytes:
    """Reference vs current shares per bin (numeric) or category, one subplot per plotted column."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = plotted_columns(result)
    drifted = sum(c.drifted for c in _checked(result))
    if not columns:
        subtitle = "no column to plot"
    elif drifted:
        subtitle = f"{len(columns)} of {drifted} drifted column(s)"
    else:
        subtitle = f"nothing drifted: the {len(columns)} column(s) with the highest PSI"
    ncols = max(min(len(columns), _PLOT_COLUMNS), 1)
    nrows = max(math.ceil(len(columns) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 0.6), dpi=100, squeeze=False)
    try:
        for ax in axes.flat[len(columns) :]:
            ax.set_visible(False)
        for ax, column in zip(axes.flat, columns, strict=False):
            _draw_column(ax, column, column is result.prediction)
        fig.suptitle(f"{title}\n{subtitle}", fontsize=11, parse_math=False)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


def _draw_column(ax: Axes, column: ColumnDrift, is_prediction: bool) -> None:
    """One subplot: reference and current bars side by side, the column's PSI and verdict in the title."""
    labels = _bin_labels(column)
    psi = "psi -" if column.psi is None else f"psi {column.psi:.3g}"
    name = _cut(column.name) + (" (prediction)" if is_prediction else "")
    ax.set_title(f"{name}: {psi}{', drifted' if column.drifted else ''}", fontsize=9, parse_math=False)
    if not labels:
        note = "\n".join(column.breaches) or "no values to compare"  # e.g. the column is missing
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8, parse_math=False)
        ax.set_axis_off()
        return
    positions = range(len(labels))
    width = 0.4
    ax.bar([p - width / 2 for p in positions], column.bins["reference"], width, label="reference", color="tab:gray")
    ax.bar([p + width / 2 for p in positions], column.bins["current"], width, label="current", color="tab:red")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7, parse_math=False)
    ax.set_ylabel("share", fontsize=8)
    ax.legend(fontsize=7)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def verdict_line(result: DriftResult) -> str:
    """One sentence: judged or not, and which columns breached."""
    checked = _checked(result)
    if not result.judged:
        return (
            f"Not judged: {result.rows} current row(s), fewer than the {result.thresholds.min_rows} a verdict needs; "
            f"the statistics of {len(checked)} column(s) are shown without one."
        )
    drifted = [c.name for c in checked if c.drifted]
    if drifted:
        return f"DRIFT: {len(drifted)} of {len(checked)} column(s) breached: {', '.join(drifted)}."
    return f"No drift: {len(checked)} column(s) within every threshold, {result.rows} current row(s)."


def _thresholds_line(result: DriftResult) -> str:
    t = result.thresholds
    return (
        f"Thresholds: psi >= {t.psi:g}; p < {t.p_value:g} over the {len(_checked(result))} column(s) checked "
        f"(Bonferroni); null rate increase > {t.null_rate_increase:g}; out of range > {t.out_of_range_rate:g}; "
        f"unseen categories > {t.unseen_rate:g}; a verdict from {t.min_rows} rows."
    )


def _row(column: ColumnDrift, is_prediction: bool) -> str:
    e = html.escape
    name = e(column.name) + (" <em>(prediction)</em>" if is_prediction else "")
    unseen = _fmt(column.unseen_rate)
    if column.unseen_examples:
        unseen += " (" + ", ".join(e(_cut(x)) for x in column.unseen_examples) + ")"
    cells = [
        name,
        e(column.kind),
        _fmt(column.psi),
        e(column.test),
        _fmt(column.statistic, ".4g"),
        _fmt(column.p_value, ".2g"),
        f"{column.null_rate:.3g} vs {column.reference_null_rate:.3g}",
        _fmt(column.out_of_range_rate),
        unseen,
        str(column.schema_violations),
        "<br>".join(e(reason) for reason in column.breaches),
    ]
    css = ' class="drifted"' if column.drifted else ""
    return f"<tr{css}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def render_html(result: DriftResult, title: str, context: Mapping[str, str], png_name: str = REPORT_PNG) -> str:
    """The page: title, what was checked (``context``), the verdict, a row per column (drifted first), the plot."""
    e = html.escape
    context_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in context.items())
    verdict_css = "drift" if result.breaches else "quiet"
    head = (
        f"<h1>{e(title)}</h1><table class='context'>{context_rows}</table>"
        f"<p class='{verdict_css}'><strong>{e(verdict_line(result))}</strong></p>"
        f"<p class='thresholds'>{e(_thresholds_line(result))}</p>"
    )
    checked = [(c, False) for c in result.columns.values()]
    if result.prediction is not None:
        checked.append((result.prediction, True))
    ordered = [x for x in checked if x[0].drifted] + [x for x in checked if not x[0].drifted]
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "column",
            "kind",
            "psi",
            "test",
            "statistic",
            "p",
            "null rate vs reference",
            "out of range",
            "unseen",
            "schema violations",
            "breaches",
        )
    )
    table = f"<table><tr>{header}</tr>" + "".join(_row(c, p) for c, p in ordered) + "</table>"
    image = f'<img src="{e(png_name)}" alt="reference vs current per column">'
    style = (
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}tr.drifted{background:#fde2e1}"
        ".drift{color:#a00}.quiet{color:#060}.thresholds{color:#555;font-size:12px}img{max-width:100%}</style>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>{style}</head>"
        f"<body>{head}{table}{image}</body></html>"
    )
