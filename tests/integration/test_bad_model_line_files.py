"""A bad model-line file beside the shipped lines, through Airflow's DagBag: it names itself, hurts nothing else.

Each case is a folder holding the shipped lines plus one bad file. One child process parses every
folder with a real ``DagBag`` over ``dags/`` (the way the DAG processor does), so the whole set costs
one interpreter start. For each case: the bad file is named in an import error, and both shipped lines'
DAGs are still there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from mlops_lifecycle import paths

SHIPPED = paths.include_dir() / "model_lines"
SHIPPED_LINES = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
TEXT = (SHIPPED / "demand_forecast.yaml").read_text()


def renamed(name: str, text: str = TEXT) -> str:
    """The demand_forecast file as another line (own model name and port unless the case clashes on them)."""
    return text.replace("model_line: demand_forecast", f"model_line: {name}")


def other_line(name: str, text: str) -> str:
    data = yaml.safe_load(renamed(name, text))
    data["registry"].update(model_name=name, experiment=f"/lines/{name}")
    data["deploy"]["port"] = 8699
    return yaml.safe_dump(data)


# case -> (file name, contents: str | bytes | None for a dangling symlink, what its error says)
CASES: dict[str, tuple[str, str | bytes | None, str]] = {
    "impossible_date": (
        "bad_date.yaml",
        other_line("bad_date", TEXT).replace("2026-01-05", "2026-02-30"),
        "start_date",
    ),
    "not_utf8": ("latin1_line.yaml", other_line("latin1_line", TEXT).encode() + b"# caf\xe9\n", "not UTF-8"),
    "dangling_symlink": ("moved_line.yaml", None, "broken symbolic link"),
    "unknown_timezone": (
        "tz_line.yaml",
        other_line("tz_line", TEXT).replace("timezone: UTC", "timezone: Europe/Atlantis"),
        "not an IANA time zone",
    ),
    "tag_too_long": ("long_tag.yaml", other_line("long_tag", TEXT.replace("forecasting,", "x" * 120 + ",")), "tags"),
    "takes_over_a_running_line": ("aaa_line.yaml", renamed("aaa_line"), "already used by model line 'demand_forecast'"),
    "retries_boolean": (
        "bool_line.yaml",
        other_line("bool_line", TEXT.replace("retries: 2", "retries: true")),
        "boolean",
    ),
    "duplicate_keys": (
        "dup_line.yaml",
        renamed("dup_line").replace("retries: 2\n", "retries: 2\nretries: 3\n"),
        "duplicate",
    ),
    "alias_bomb": (
        "bomb_line.yaml",
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n",
        "aliases",
    ),
    "gate_metric_never_logged": (
        "acc_line.yaml",
        other_line(
            "acc_line",
            TEXT.replace("  metrics:\n", "  metrics:\n    accuracy: {direction: maximize, threshold: 0.9}\n", 1),
        ),
        "['accuracy'] not computed by",
    ),
    "entrypoint_outside_include": (
        "escape_line.yaml",
        other_line(
            "escape_line", TEXT.replace("entrypoint: training/demand_forecast.py", "entrypoint: ../scripts/demo.py")
        ),
        "leads outside include/",
    ),
    "not_a_mapping": ("list_line.yml", "- just\n- a list\n", "expected a mapping"),
}

PARSE = r"""
import json, os, sys
from airflow.dag_processing.dagbag import DagBag
out = {}
for case, folder in json.loads(sys.argv[2]).items():
    os.environ["MLOPS_MODEL_LINES_DIR"] = folder
    bag = DagBag(dag_folder=sys.argv[1])
    out[case] = {"dags": sorted(bag.dags), "errors": "\n".join(bag.import_errors.values())}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folders = {}
    for case, (name, contents, _) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        for shipped in SHIPPED.glob("*.yaml"):
            shutil.copy2(shipped, folder / shipped.name)  # copy2: the shipped lines keep their older mtime
        target = folder / name
        if contents is None:
            target.symlink_to(folder / "renamed_or_deleted.yaml")
        elif isinstance(contents, bytes):
            target.write_bytes(contents)
        else:
            target.write_text(contents)
        (folder / ".#demand_forecast.yaml").symlink_to(folder / "editor-lock")  # always there: never an error
        folders[case] = str(folder)
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(paths.REPO_ROOT / "dags"), json.dumps(folders)],
        env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_file_names_itself_and_the_shipped_lines_still_load(parsed, case):
    name, _, expected = CASES[case]
    result = parsed[case]
    shipped = sorted(f"{line}__{kind}" for line in SHIPPED_LINES for kind in ("lifecycle", "monitor"))
    assert result["dags"] == shipped, result["errors"]
    assert name in result["errors"] and expected in result["errors"], result["errors"]
    assert result["errors"].count("Invalid model-line config") == 1, "only the bad file is an error"
    assert "Duplicated" not in result["errors"], result["errors"]
    assert ".#demand_forecast.yaml" not in result["errors"], "an editor's lock file is not a model line"
