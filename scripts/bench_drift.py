"""`make bench` drift figures: `check_drift` against evidently's data drift preset, and detection quality.

Prints tables; nothing here is a pass/fail test. The speed part writes generated data once to a temporary
folder as parquet; each side reads it in its own fresh process and measures only its computation (wall time,
and peak RSS growth over the process's RSS after imports and data load). evidently runs from its own
virtualenv (.local/bench/evidently-venv, created on first use), never the product's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from bench import table  # noqa: E402

REFERENCE_ROWS = 50_000
CURRENT_ROWS = 1_000_000
# evidently 0.7.23 (the newest on Python 3.11) imports a pandas internal that pandas 3 removed, hence pandas 2;
# numpy, scipy and pyarrow as the product's lock pins them, so both sides run the same numeric libraries
EVIDENTLY = "evidently==0.7.23"
EVIDENTLY_PANDAS = "pandas==2.3.3"
EVIDENTLY_VENV = REPO / ".local" / "bench" / "evidently-venv"

# 9 numeric features (continuous, heavy-tailed, integer counts with many ties) and 3 categorical ones
NUMERIC = (
    "normal",
    "normal_wide",
    "lognormal",
    "lognormal_narrow",
    "counts_small",
    "counts_large",
    "uniform",
    "exponential",
    "bimodal",
)
CATEGORICAL = {"cat_5": 5, "cat_20": 20, "cat_50": 50}
KINDS = {**dict.fromkeys(NUMERIC, "numeric"), **dict.fromkeys(CATEGORICAL, "categorical")}
# the speed bench's current data: a few features shifted (numeric: mean shift in reference standard
# deviations; categorical: share of rows moved to its rarest category), the others as in the reference
SPEED_SHIFT = {"normal": 0.05, "lognormal": 0.1, "counts_small": 0.1, "bimodal": 0.2, "cat_20": 0.02}

QUALITY_INTERVALS = 50
QUALITY_SIZES = (10_000, 1_000)
QUALITY_SHIFTS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
QUALITY_FEATURE = "normal"

# shared by both workers: RSS from /proc, and resetting the peak (VmHWM) once the data is loaded and one
# warm-up run on WARM rows has paid the lazy imports and first calls
MEASURE = r"""
import gc, json, sys, time

WARM = 1000


def kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    return kib("VmRSS")
"""

OURS = (
    MEASURE
    + r"""
sys.path.insert(0, sys.argv[1])
import pandas as pd
from mlops_lifecycle import drift

folder, kinds = sys.argv[2], json.loads(sys.argv[3])
reference_frame = pd.read_parquet(folder + "/reference.parquet")
current = pd.read_parquet(folder + "/current.parquet")
drift.check_drift(drift.reference_from_frame(reference_frame.head(WARM), kinds), current.head(WARM))
base = reset_peak()
t0 = time.perf_counter()
reference = drift.reference_from_frame(reference_frame, kinds)
t1 = time.perf_counter()
reference_peak = kib("VmHWM") - base
held = reset_peak() - base  # what the reference keeps (sorted values per numeric column)
t2 = time.perf_counter()
result = drift.check_drift(reference, current)
t3 = time.perf_counter()
check_peak = kib("VmHWM") - base - held
columns = {
    name: {"psi": c.psi, "test": c.test, "statistic": c.statistic, "p_value": c.p_value, "breaches": list(c.breaches)}
    for name, c in result.columns.items()
}
print(json.dumps({
    "reference_s": t1 - t0, "check_s": t3 - t2, "reference_kib": reference_peak, "check_kib": check_peak,
    "total_kib": max(reference_peak, held + check_peak), "columns": columns, "pandas": pd.__version__,
}))
"""
)

EVIDENTLY_RUN = (
    MEASURE
    + r"""
import pandas as pd
import evidently
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift
from evidently.presets import DataDriftPreset

folder, kinds, with_psi = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "psi"
reference_frame = pd.read_parquet(folder + "/reference.parquet")
current = pd.read_parquet(folder + "/current.parquet")


def report(reference, current):
    definition = DataDefinition(
        numerical_columns=[c for c, k in kinds.items() if k == "numeric"],
        categorical_columns=[c for c, k in kinds.items() if k == "categorical"],
    )
    metrics = [DataDriftPreset(num_method="ks", cat_method="chisquare")]
    if with_psi:
        metrics += [ValueDrift(column=c, method="psi") for c in kinds]
    return Report(metrics).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )


report(reference_frame.head(WARM), current.head(WARM))
base = reset_peak()
t0 = time.perf_counter()
snapshot = report(reference_frame, current)
t1 = time.perf_counter()
peak = kib("VmHWM") - base
values = {}
for metric in snapshot.dict()["metrics"]:
    config = metric["config"]
    if config.get("type", "").endswith(":ValueDrift"):
        values.setdefault(config["column"], {})[config["method"]] = metric["value"]
print(json.dumps(
    {"seconds": t1 - t0, "kib": peak, "values": values, "version": evidently.__version__, "pandas": pd.__version__}
))
"""
)


# --- data -------------------------------------------------------------------------------------------------


def generate(rng, rows: int, shift: Mapping[str, float] | None = None):
    """``rows`` rows of the 12 features; ``shift`` as SPEED_SHIFT describes it."""
    import numpy as np
    import pandas as pd

    shift = shift or {}

    def s(name: str) -> float:
        return shift.get(name, 0.0)

    lognormal_sd = math.sqrt((math.e - 1) * math.e)  # lognormal(0, 1)
    narrow_sd = math.sqrt((math.exp(0.16) - 1) * math.exp(6 + 0.16))  # lognormal(3, 0.4)
    bimodal_sd = math.sqrt(0.4 * (0.25 + 4) + 0.6 * (1 + 4) - 0.4**2)  # 40% N(-2, 0.5), 60% N(2, 1)
    large_mean = 45 + s("counts_large") * math.sqrt(450)  # negative binomial, mean 45, variance 450
    columns = {
        "normal": rng.normal(0, 1, rows) + s("normal"),
        "normal_wide": rng.normal(100, 15, rows) + 15 * s("normal_wide"),
        "lognormal": rng.lognormal(0, 1, rows) + lognormal_sd * s("lognormal"),
        "lognormal_narrow": rng.lognormal(3, 0.4, rows) + narrow_sd * s("lognormal_narrow"),
        "counts_small": rng.poisson(1.5 + s("counts_small") * math.sqrt(1.5), rows),
        "counts_large": rng.negative_binomial(5, 5 / (5 + large_mean), rows),
        "uniform": rng.uniform(0, 1, rows) + s("uniform") / math.sqrt(12),
        "exponential": rng.exponential(2, rows) + 2 * s("exponential"),
        "bimodal": np.where(rng.random(rows) < 0.4, rng.normal(-2, 0.5, rows), rng.normal(2, 1, rows))
        + bimodal_sd * s("bimodal"),
    }
    for name, count in CATEGORICAL.items():
        shares = 1 / np.arange(1, count + 1) ** 0.8  # Zipf-like: the rarest of 50 still ~0.6% of rows
        shares = (1 - s(name)) * shares / shares.sum()
        shares[-1] += s(name)
        labels = np.array([f"{name}_{k:02d}" for k in range(count)], dtype=object)
        columns[name] = pd.Series(labels[rng.choice(count, rows, p=shares)], dtype="str")
    return pd.DataFrame(columns)


# --- evidently's own virtualenv -----------------------------------------------------------------------------


def evidently_pins() -> list[str]:
    lock = (REPO / "requirements.txt").read_text()
    same = [re.search(rf"^{name}==\S+", lock, re.MULTILINE) for name in ("numpy", "scipy", "pyarrow")]
    return [EVIDENTLY, EVIDENTLY_PANDAS, *(m.group(0) for m in same if m)]


def evidently_python() -> tuple[Path, str]:
    """The evidently venv's python (created, or re-created when the pins changed) and what was done."""
    python = EVIDENTLY_VENV / "bin" / "python"
    stamp = EVIDENTLY_VENV / ".installed"
    pins = evidently_pins()
    if python.exists() and stamp.exists() and stamp.read_text().split() == pins:
        return python, "reused"
    started = time.monotonic()
    shutil.rmtree(EVIDENTLY_VENV, ignore_errors=True)
    EVIDENTLY_VENV.parent.mkdir(parents=True, exist_ok=True)
    base = shutil.which("python3.11") or sys.executable
    log = EVIDENTLY_VENV.parent / "evidently-venv-install.log"
    with open(log, "w") as out:
        for argv in (
            [base, "-m", "venv", str(EVIDENTLY_VENV)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *pins],
        ):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{shlex.join(argv)} failed; see {log}")
    stamp.write_text("\n".join(pins) + "\n")
    return python, f"installed in {time.monotonic() - started:.0f} s"


# --- speed and memory against evidently ----------------------------------------------------------------------


def run_json(argv: list[str]) -> dict:
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{argv[0]} -c ... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def bench_speed(repeats: int) -> None:
    import numpy as np

    python, how = evidently_python()
    rng = np.random.default_rng(20261201)
    reference, current = generate(rng, REFERENCE_ROWS), generate(rng, CURRENT_ROWS, SPEED_SHIFT)
    kinds = json.dumps(KINDS)
    ours, preset, with_psi = [], [], []
    with tempfile.TemporaryDirectory(prefix="mlops-bench-drift-") as tmp:
        reference.to_parquet(Path(tmp) / "reference.parquet")
        current.to_parquet(Path(tmp) / "current.parquet")
        for _ in range(repeats):  # interleaved, so that other load on the machine falls on every side alike
            ours.append(run_json([sys.executable, "-c", OURS, str(REPO / "plugins"), tmp, kinds]))
            preset.append(run_json([str(python), "-c", EVIDENTLY_RUN, tmp, kinds, "preset"]))
            with_psi.append(run_json([str(python), "-c", EVIDENTLY_RUN, tmp, kinds, "psi"]))
    version = with_psi[0]["version"]

    def med(samples: list[dict], key: str) -> float:
        return statistics.median(s[key] for s in samples)

    def spread(samples: list[dict], key: str) -> str:
        values = [s[key] for s in samples]
        return f"{min(values):.2f}-{max(values):.2f}"

    both = [{"s": s["reference_s"] + s["check_s"], "kib": s["total_kib"]} for s in ours]
    ours_s = med(both, "s")
    rows = [
        [
            "ours",
            f"reference_from_frame ({REFERENCE_ROWS:,} rows; once per model version)",
            f"{med(ours, 'reference_s'):.2f}",
            spread(ours, "reference_s"),
            mib(med(ours, "reference_kib")),
            "",
        ],
        [
            "ours",
            f"check_drift ({CURRENT_ROWS:,} rows against that reference)",
            f"{med(ours, 'check_s'):.2f}",
            spread(ours, "check_s"),
            mib(med(ours, "check_kib")),
            "",
        ],
        [
            "ours",
            "both: PSI + KS / chi2 from the raw frames",
            f"{ours_s:.2f}",
            spread(both, "s"),
            mib(med(both, "kib")),
            "",
        ],
        [
            f"evidently {version}",
            'DataDriftPreset(num_method="ks", cat_method="chisquare")',
            f"{med(preset, 'seconds'):.2f}",
            spread(preset, "seconds"),
            mib(med(preset, "kib")),
            f"{med(preset, 'seconds') / ours_s:.1f}x",
        ],
        [
            f"evidently {version}",
            '+ ValueDrift(method="psi") per column: the same statistics as ours',
            f"{med(with_psi, 'seconds'):.2f}",
            spread(with_psi, "seconds"),
            mib(med(with_psi, "kib")),
            f"{med(with_psi, 'seconds') / ours_s:.1f}x",
        ],
    ]
    ratio = med(with_psi, "seconds") / ours_s
    table(
        f"Drift check of {CURRENT_ROWS:,} current rows against {REFERENCE_ROWS:,} reference rows, 12 columns "
        f"(9 numeric, 3 categorical), each side in a fresh process, median of {repeats} "
        f"(target: ours at least 10x faster: {'yes' if ratio >= 10 else 'NO'}, {ratio:.0f}x)",
        ["side", "computation", "wall s", "min-max s", "peak RSS growth MiB", "time vs ours"],
        rows,
    )
    notes = (
        "Each side reads the same parquet files with its own pandas (ours "
        f"{ours[0]['pandas']}, evidently's {with_psi[0]['pandas']}) and is timed after its imports, the data load and "
        "one warm-up run on 1,000 rows (lazy imports, first calls). Peak RSS growth: VmHWM reset then, minus VmRSS "
        "then. Ours: reference_from_frame's own peak, and check_drift's peak beyond the reference it holds; 'both' "
        f"is the larger of the two totals. evidently venv: {EVIDENTLY_VENV.relative_to(REPO)} "
        f"({', '.join(evidently_pins())}; {how})."
    )
    print(textwrap.fill(notes, width=115))
    compare_statistics(ours[0]["columns"], with_psi[0]["values"], reference, current)


def evidently_bins(reference, current):
    """Shares per bin as evidently's PSI bins them: numeric columns with over 20 distinct reference values in
    Sturges equal-width bins over both samples' range, other columns per distinct value."""
    import numpy as np

    if reference.dtype.kind in "if" and reference.nunique() > 20:
        edges = np.histogram_bin_edges(np.concatenate([reference.to_numpy(), current.to_numpy()]), bins="sturges")
        return np.histogram(reference, edges)[0] / len(reference), np.histogram(current, edges)[0] / len(current)
    keys = sorted(set(reference.unique()) | set(current.unique()))
    ref_counts, cur_counts = reference.value_counts(), current.value_counts()
    ref = np.array([ref_counts.get(k, 0) for k in keys]) / len(reference)
    cur = np.array([cur_counts.get(k, 0) for k in keys]) / len(current)
    return ref, cur


def evidently_fill(shares):
    """evidently's PSI floor: only empty bins, at min(non-empty share) / 1e6 where that is <= 1e-4, else 1e-4."""
    import numpy as np

    smallest = shares[shares > 0].min()
    return np.where(shares == 0, smallest / 10**6 if smallest <= 1e-4 else 1e-4, shares)


EVIDENTLY_DEFAULTS = {"ks": 0.05, "chisquare": 0.05, "psi": 0.1}  # its stattests' default thresholds


def compare_statistics(ours: dict, theirs: dict, reference, current) -> None:
    from scipy.stats import chi2, kstwo

    from mlops_lifecycle import drift

    en = round(len(reference) * len(current) / (len(reference) + len(current)))
    diffs: dict[str, list[float]] = {k: [] for k in ("ks_p", "ks_d", "psi_cat", "psi_fill", "psi_floor", "psi_own")}
    chi2_ratio, rows = [], []
    for name, kind in KINDS.items():
        mine, other = ours[name], theirs[name]
        method = "ks" if kind == "numeric" else "chisquare"
        test_p = other[method]
        their_stat = math.nan
        if kind == "numeric":
            diffs["ks_p"].append(abs(mine["p_value"] - test_p))
            if test_p > 1e-12:  # evidently reports only p: its D by inverting scipy's asymptotic p (n = m*n/(m+n))
                their_stat = float(kstwo.isf(test_p, en))
                diffs["ks_d"].append(abs(mine["statistic"] - their_stat))
        elif test_p > 1e-300:  # its chi-squared statistic from its p, with (categories - 1) degrees of freedom
            their_stat = float(chi2.isf(test_p, reference[name].nunique() - 1))
            chi2_ratio.append(their_stat / mine["statistic"])
        ref_shares, cur_shares = evidently_bins(reference[name], current[name])
        ours_on_theirs = drift.psi(ref_shares, cur_shares)
        if kind == "numeric":
            filled = drift.psi(evidently_fill(ref_shares), evidently_fill(cur_shares), epsilon=0)
            diffs["psi_fill"].append(abs(filled - other["psi"]))
            diffs["psi_floor"].append(abs(ours_on_theirs - other["psi"]))
            diffs["psi_own"].append(abs(mine["psi"] - other["psi"]))
        else:
            diffs["psi_cat"].append(abs(mine["psi"] - other["psi"]))
        flags = [m for m, v in ((method, test_p < EVIDENTLY_DEFAULTS[method]), ("psi", other["psi"] >= 0.1)) if v]
        rows.append(
            [
                name,
                f"{SPEED_SHIFT.get(name, 0):g}",
                mine["test"],
                f"{mine['statistic']:.4g}",
                "-" if math.isnan(their_stat) else f"{their_stat:.4g}",
                f"{mine['p_value']:.3g}",
                f"{test_p:.3g}",
                f"{mine['psi']:.5f}",
                f"{other['psi']:.5f}",
                f"{ours_on_theirs:.5f}",
                ", ".join(reason.split(" ")[0] for reason in mine["breaches"]),
                ", ".join(flags),
            ]
        )
    table(
        "The same data, our statistics and evidently's per column (evidently: its ks, chisquare and psi stattests)",
        [
            "column",
            "shift",
            "test",
            "our stat",
            "evidently stat (from its p)",
            "our p",
            "evidently p",
            "our PSI (ref deciles)",
            "evidently PSI (its bins)",
            "our psi() on its bins",
            "we alarm",
            "evidently flags (p < 0.05, PSI >= 0.1)",
        ],
        rows,
    )

    def worst(key: str, tolerance: float | None, fmt: str = ".1e") -> list[str]:
        values = diffs[key]
        if not values:
            return [0, "-", "-", "-"]
        within = "-" if tolerance is None else ("yes" if max(values) <= tolerance else "NO")
        return [len(values), format(max(values), fmt), "none" if tolerance is None else f"{tolerance:g}", within]

    table(
        "What agrees and by how much",
        ["compared", "columns", "max |difference|", "tolerance", "within"],
        [
            ["KS p-value: ours vs evidently's (both scipy's asymptotic two-sided p)", *worst("ks_p", 1e-9)],
            ["KS D: ours vs evidently's recovered from its p (where p > 1e-12)", *worst("ks_d", 1e-6)],
            ["PSI categorical: ours vs evidently's (the same bins: the categories)", *worst("psi_cat", 1e-9)],
            ["PSI numeric: our psi() on evidently's bins, with its floor for empty bins", *worst("psi_fill", 1e-9)],
            [
                "PSI numeric: our psi() on evidently's bins, with our 1e-4 floor of every share",
                *worst("psi_floor", None),
            ],
            ["PSI numeric: ours (10 reference deciles) vs evidently's (other bins)", *worst("psi_own", None, ".4f")],
            [
                "chi2: evidently's statistic / ours, unshifted columns (not the same test)",
                len(chi2_ratio),
                f"{min(chi2_ratio):.1f}-{max(chi2_ratio):.1f}x" if chi2_ratio else "-",
                "none",
                "-",
            ],
        ],
    )
    ratio = 1 + len(current) / len(reference)
    unshifted = [c for c in CATEGORICAL if c not in SPEED_SHIFT]
    unshifted_flagged = [c for c in unshifted if theirs[c]["chisquare"] < EVIDENTLY_DEFAULTS["chisquare"]]
    notes = (
        "PSI bins: ours are the reference's deciles (ties merged); evidently's are Sturges equal-width bins over "
        "both samples' range (per distinct value where the reference has at most 20 values), so on a heavy tail "
        "nearly every row falls in its first bins and a shift of the bulk barely moves its PSI. Our psi() floors "
        "every share at 1e-4, evidently only empty bins (lower): on the same bins, tail bins holding under 1e-4 of "
        "the rows make the difference. Chi-squared: evidently's 'chisquare' is a goodness-of-fit test of the current "
        "counts against the reference shares taken as exact; ours (scipy's chi2_contingency, no correction) tests "
        "two samples, so the reference's own sampling noise counts. For the same shares its statistic is ~(1 + "
        f"current/reference rows) = {ratio:.0f}x ours: at {len(current):,} vs {len(reference):,} rows it calls "
        f"{len(unshifted_flagged)} of the {len(unshifted)} unshifted categorical columns drifted at p < 0.05 "
        f"({', '.join(unshifted_flagged) or 'none'})."
    )
    print(textwrap.fill(notes, width=115))


# --- detection quality (ours only) -------------------------------------------------------------------------------


def bench_quality(intervals: int = QUALITY_INTERVALS) -> None:
    import numpy as np
    from scipy.stats import beta

    from mlops_lifecycle import drift

    rng = np.random.default_rng(7)
    reference = drift.reference_from_frame(generate(rng, REFERENCE_ROWS), KINDS)
    thresholds = drift.DriftThresholds()
    false_rows, shift_rows, smallest = [], [], {}
    for size in QUALITY_SIZES:
        alarms, reasons, seconds = 0, Counter(), []
        for _ in range(intervals):
            frame = generate(rng, size)
            started = time.perf_counter()
            result = drift.check_drift(reference, frame, thresholds)
            seconds.append(time.perf_counter() - started)
            alarms += bool(result.breaches)
            reasons.update(f"{column}: {reason.split(' ')[0]}" for column, reason in result.breaches)
        rate = alarms / intervals
        upper = float(beta.ppf(0.975, alarms + 1, intervals - alarms)) if alarms < intervals else 1.0
        false_rows.append(
            [
                f"{size:,}",
                intervals,
                alarms,
                f"{rate:.0%}",
                f"{upper:.0%}",
                "yes" if rate < 0.05 else "NO",
                f"{statistics.median(seconds) * 1000:.1f}",
                ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) or "none",
            ]
        )
        for shift in QUALITY_SHIFTS:
            detected, by = 0, Counter()
            for _ in range(intervals):
                frame = generate(rng, size, {QUALITY_FEATURE: shift})
                column = drift.check_drift(reference, frame, thresholds).columns[QUALITY_FEATURE]
                detected += bool(column.breaches)
                by.update({reason.split(" ")[0] for reason in column.breaches})
            rate = detected / intervals
            if rate >= 0.95:
                smallest.setdefault(size, shift)
            shift_rows.append([f"{size:,}", f"{shift:g}", f"{rate:.0%}", by["ks"], by["psi"]])
    print(
        f"\nDetection quality: reference {REFERENCE_ROWS:,} rows, 12 columns as above, DriftThresholds() defaults (psi "
        f"{thresholds.psi}, p {thresholds.p_value} family-wise over 12 columns, min_rows {thresholds.min_rows})."
    )
    table(
        f"False alarms over {intervals} clean intervals (an interval alarms when any column breaches; target < 5%)",
        [
            "interval rows",
            "intervals",
            "alarmed",
            "rate",
            "rate's 95% upper bound",
            "< 5%",
            "check ms (median)",
            "breaches (column: kind)",
        ],
        false_rows,
    )
    table(
        f"A mean shift of one numeric feature ('{QUALITY_FEATURE}', N(0, 1)) in reference standard deviations: share "
        f"of {intervals} intervals in which that feature breaches",
        ["interval rows", "shift sd", "detected", "by KS p", "by PSI"],
        shift_rows,
    )
    for size in QUALITY_SIZES:
        found = smallest.get(size)
        print(
            f"smallest shift detected in >= 95% of intervals at {size:,} rows: "
            + (f"{found:g} sd" if found is not None else f"none up to {QUALITY_SHIFTS[-1]:g} sd")
        )


def main(repeats: int = 3, parts: tuple[str, ...] = ("speed", "quality")) -> None:
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"\nDrift monitoring figures ({os.cpu_count()} cores), from: {command}")
    if "speed" in parts:
        bench_speed(repeats)
    if "quality" in parts:
        bench_quality()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["speed", "quality"])
    args = parser.parse_args()
    main(args.repeats, (args.part,) if args.part else ("speed", "quality"))
