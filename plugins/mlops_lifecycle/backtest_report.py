"""The backtest report: one HTML page, a PNG plot per gate metric, and the same table as CSV and JSON.

Plain functions over ``backtest.summary_rows``; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Mapping
from typing import Any

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"


VERDICTS = {True: "would promote", False: "would reject", None: "horizon not in the data yet"}


def plot_file(metric: str) -> str:
    return f"{metric}.png"


def _value(values: Mapping[str, Any], metric: str) -> float | None:
    value = values.get(metric)
    return None if value is None else float(value)


def render_plot(rows: list[dict[str, Any]], metric: str, title: str) -> bytes:
    """``metric`` on each window's horizon: challenger, champion (and baseline), would-have-promoted marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ends = [r["window_end"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    try:
        series = [("challenger", "challenger", "tab:blue"), ("champion", "champion_metrics", "tab:gray")]
        if any(r["baseline"] for r in rows):
            series.append(("baseline", "baseline", "tab:orange"))
        for label, key, color in series:
            values = [_value(r[key], metric) for r in rows]
            ax.plot(ends, [math.nan if v is None else v for v in values], marker="o", label=label, color=color)
        promoted = [r for r in rows if r["would_promote"] and _value(r["challenger"], metric) is not None]
        if promoted:
            ax.scatter(
                [r["window_end"] for r in promoted],
                [float(r["challenger"][metric]) for r in promoted],
                s=140,
                facecolors="none",
                edgecolors="tab:green",
                linewidths=2,
                label="would have promoted",
                zorder=3,
            )
        ax.set_title(title)
        ax.set_ylabel(metric)
        ax.set_xlabel("window end (horizon start)")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


def render_csv(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["window_end", "horizon_end", "horizon", "would_promote", "champion"]
    header += [f"{who}.{m}" for m in metrics for who in ("challenger", "champion", "baseline")]
    writer.writerow([*header, "challenger_run", "champion_model"])
    for r in rows:
        values = [_value(r[key], m) for m in metrics for key in ("challenger", "champion_metrics", "baseline")]
        writer.writerow(
            [
                r["window_end"],
                r["horizon_end"],
                r["horizon"],
                r["would_promote"],
                r["champion"] or "",
                *("" if v is None else f"{v:.6g}" for v in values),
                r["challenger_run"],
                r["champion_model"] or "",
            ]
        )
    return out.getvalue()


def render_json(header: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    return json.dumps({**header, "windows": rows}, indent=2, sort_keys=True)


def render_table(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """A plain-text table for logs and the command line."""
    lines = [
        f"{'window end':<12} {'horizon':<9} {'verdict':<10} " + " ".join(f"{m + ' (chall/champ)':>26}" for m in metrics)
    ]
    for r in rows:
        verdict = {True: "PROMOTE", False: "reject", None: "-"}[r["would_promote"]]
        cells = []
        for m in metrics:
            a, b = _value(r["challenger"], m), _value(r["champion_metrics"], m)
            cells.append(f"{'-' if a is None else f'{a:.4g}':>12} / {'-' if b is None else f'{b:.4g}':<11}")
        lines.append(f"{r['window_end']:<12} {r['horizon']:<9} {verdict:<10} " + " ".join(cells))
    return "\n".join(lines)


def render_html(header: Mapping[str, Any], rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """The page: what was backtested, a plot per metric, and the table with each rule's reason."""
    e = html.escape
    evaluated = [r for r in rows if r["would_promote"] is not None]
    promoted = sum(1 for r in evaluated if r["would_promote"])
    head = (
        f"<h1>Backtest of {e(str(header['model_line']))}: variant {e(str(header['variant']))}</h1>"
        f"<p>Backtest <code>{e(str(header['backtest_id']))}</code>, champion: {e(str(header['champion_mode']))}, "
        f"horizon {e(str(header['horizon_days']))} day(s), "
        f"code revision <code>{e(str(header['code_revision']))}</code>. "
        f"{len(rows)} window(s), {len(evaluated)} with their horizon in the data; the gate would have promoted "
        f"{promoted}.</p>"
    )
    plots = "".join(f'<img src="{e(plot_file(m))}" alt="{e(m)} per window">' for m in metrics)
    cols = "".join(f"<th>{e(m)} challenger</th><th>{e(m)} champion</th>" for m in metrics)
    body = []
    for r in rows:
        verdict = VERDICTS[r["would_promote"]]
        cells = "".join(
            f"<td>{_fmt(_value(r['challenger'], m))}</td><td>{_fmt(_value(r['champion_metrics'], m))}</td>"
            for m in metrics
        )
        reasons = "<br>".join(e(x) for x in r["reasons"])
        body.append(
            f"<tr><td>{e(r['window_end'])}</td><td>{e(verdict)}</td><td>{e(r['champion'] or 'none')}</td>"
            f"{cells}<td>{reasons}</td></tr>"
        )
    table = (
        f"<table><tr><th>window end</th><th>verdict</th><th>champion</th>{cols}<th>gate</th></tr>"
        + "".join(body)
        + "</table>"
    )
    style = (
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{head}{plots}{table}</body></html>"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
