"""Print a line's latest backtest report: `python scripts/backtest_report.py LINE [--variant NAME]`.

Reads the report the `backtest_report` task logged to MLflow (`<experiment>-backtests`). The tracking
server is `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the one `make up` serves (127.0.0.1:5000).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from mlops_lifecycle import paths  # noqa: E402
from mlops_lifecycle.backtest_report import REPORT_JSON, render_table  # noqa: E402
from mlops_lifecycle.config import load_model_line  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("line", help="model line (its YAML file's name)")
    parser.add_argument("--variant", help="only backtests of this variant (default: the latest of any)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    args = parser.parse_args()
    config = load_model_line(paths.model_lines_dir() / f"{args.line}.yaml")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(config.backtest_experiment)
    query = "tags.`backtest.report` != ''"
    if args.variant:
        query += f" and tags.`backtest.variant` = '{args.variant}'"
    found = (
        []
        if experiment is None
        else client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
    )
    if not found:
        print(f"no backtest report of {args.line} in {args.tracking_uri} (backfill the lifecycle DAG first)")
        return 1
    report = json.loads(Path(client.download_artifacts(found[0].info.run_id, REPORT_JSON)).read_text())
    print(
        f"Backtest {report['backtest_id']} of {report['model_line']}, variant {report['variant']}, champion "
        f"{report['champion_mode']}, horizon {report['horizon_days']} day(s), code {report['code_revision']}"
    )
    print(render_table(report["windows"], list(config.gate.metrics)))
    print(f"report run {found[0].info.run_id}: report.html, report.csv and one PNG per gate metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())
