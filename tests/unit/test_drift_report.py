"""The drift report: the page says which column drifted and why, first; data-borne names cannot inject markup
or break the plot; the PNG is an image."""

from __future__ import annotations

import html
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlops_lifecycle.drift import DriftThresholds, check_drift, reference_from_frame
from mlops_lifecycle.drift_report import plotted_columns, render_html, render_png

HOSTILE = "<script>alert(1)</script> $\\frac{1}{0}$ ^{x}"  # markup, and math text matplotlib would parse
KINDS = {"temperature": "numeric", "humidity": "numeric", "region": "categorical", HOSTILE: "numeric"}
CONTEXT = {"model line": "demand_forecast", "version": "7", "interval": "2026-03-01 to 2026-03-02", "rows": "2000"}


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "temperature": rng.normal(15, 8, rows),
            "humidity": rng.uniform(0, 100, rows),
            "region": rng.choice(["north", "south", "east"], rows, p=[0.5, 0.3, 0.2]),
            HOSTILE: rng.normal(0, 1, rows),
            "prediction": rng.normal(50, 10, rows),
        }
    )


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_from_frame(frame(5000, seed=0), {**KINDS, "prediction": "numeric"})


def is_png(data: bytes) -> bool:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes the whole image: a truncated file fails here
    return image.width > 100 and image.height > 100


def test_the_page_names_the_drifted_column_and_its_reason_first(reference):
    current = frame(2000, seed=1)
    current["temperature"] += 10
    result = check_drift(reference, current)
    page = render_html(result, "Drift of demand_forecast v7", CONTEXT)

    assert "DRIFT: 1 of 5 column(s) breached: temperature." in page
    rows = page.split("<tr")
    drifted = [r for r in rows if r.startswith(' class="drifted"')]
    assert len(drifted) == 1 and "<td>temperature</td>" in drifted[0]
    for reason in result.columns["temperature"].breaches:
        assert html.escape(reason) in drifted[0]
    first_column_row = next(r for r in rows if "<td>" in r and "<th>" not in r)
    assert first_column_row == drifted[0]  # drifted rows before the quiet ones
    assert "<th>interval</th><td>2026-03-01 to 2026-03-02</td>" in page
    assert '<img src="drift_report.png"' in page
    assert "prediction <em>(prediction)</em>" in page


def test_data_borne_names_are_escaped_in_the_page_and_plain_text_in_the_plot(reference):
    current = frame(2000, seed=2)
    current[HOSTILE] += 3
    current.loc[current.index[:300], "region"] = "<img src=x onerror=alert(1)>"
    result = check_drift(reference, current)
    assert {c for c, _ in result.breaches} == {HOSTILE, "region"}
    page = render_html(result, "<b>title</b>", {"bad log lines": "<i>3</i>"}, png_name='x.png" onload="alert(1)')

    assert "<script>" not in page and "<img src=x" not in page and "<b>" not in page and "<i>" not in page
    # the unseen value is shown (cut) in the report, escaped, and never in the breach reasons
    assert html.escape(HOSTILE) in page and "&lt;img src=x onerror=aler" in page
    assert 'src="x.png&quot; onload=&quot;alert(1)"' in page
    assert is_png(render_png(result, HOSTILE))  # mathtext would raise on "$\frac{1}{0}$"


def test_the_plot_shows_the_drifted_columns_or_else_the_highest_psi(reference):
    quiet = check_drift(reference, frame(2000, seed=3))
    assert quiet.breaches == []
    shown = plotted_columns(quiet)
    assert len(shown) == 3 and [c.psi for c in shown] == sorted((c.psi for c in shown), reverse=True)
    assert is_png(render_png(quiet, "quiet"))
    assert "No drift: 5 column(s) within every threshold" in render_html(quiet, "quiet", {})

    current = frame(2000, seed=4).drop(columns=["humidity"])
    current["region"] = "north"
    current["prediction"] *= 2
    drifted = check_drift(reference, current)
    assert {c.name for c in plotted_columns(drifted)} == {"humidity", "region", "prediction"}
    assert is_png(render_png(drifted, "a missing column is drawn as a note"))


def test_at_most_twelve_plots():
    names = [f"x{i}" for i in range(15)]
    rng = np.random.default_rng(5)
    reference = reference_from_frame(
        pd.DataFrame({n: rng.normal(0, 1, 1000) for n in names}), dict.fromkeys(names, "numeric")
    )
    current = pd.DataFrame({n: rng.normal(i, 1, 500) for i, n in enumerate(names, 1)})
    result = check_drift(reference, current, DriftThresholds(min_rows=100))
    assert len(result.breaches) >= 15
    assert len(plotted_columns(result)) == 12
    assert is_png(render_png(result, "15 drifted columns"))


def test_statistics_without_a_verdict_say_so(reference):
    current = frame(40, seed=6)
    current["temperature"] += 20
    result = check_drift(reference, current, DriftThresholds(min_rows=100))
    page = render_html(result, "few rows", CONTEXT)
    assert "Not judged: 40 current row(s), fewer than the 100 a verdict needs" in page
    assert 'class="drifted"' not in page
    assert is_png(render_png(result, "few rows"))
