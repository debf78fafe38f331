"""Housekeeping against the session's real MLflow server and a local home: bounded, and the audit is untouched.

A line with seven registered versions: v1 is production, v2 carries an audit record, v3..v7 are plain
candidates; ``keep_candidates: 2``. Old snapshots and model packages lie on disk for some of them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.config import load_model_line
from mlops_lifecycle.operators.housekeeping import HousekeepingOperator

OLD = time.time() - 200 * 86400  # older than snapshot_days (90)


@pytest.fixture
def line(stack, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """(config, operator, registry hook, home): the shipped line under a model name of its own."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLOPS_LOCAL_HOME", str(home))
    data = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())
    name = f"housekeeping_{uuid.uuid4().hex[:8]}"
    data["registry"].update(model_name=name, experiment=f"/tests/{name}")
    data["retention"] = {"keep_candidates": 2, "snapshot_days": 90}
    (tmp_path / "demand_forecast.yaml").write_text(yaml.safe_dump(data))
    config = load_model_line(tmp_path / "demand_forecast.yaml")
    op = HousekeepingOperator(task_id="housekeeping", config=config)
    return config, op, op.registry, home


def snapshot(home: Path, name: str, mtime: float) -> Path:
    path = home / "warehouse" / "snapshots" / f"demand_forecast__{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1")
    os.utime(path, (mtime, mtime))
    return path


def register(reg, config, snapshot_path: Path | None) -> str:  # noqa: ANN001
    client, name = reg.client, config.registry.model_name
    experiment = client.get_experiment_by_name(config.registry.experiment) or client.get_experiment(
        client.create_experiment(config.registry.experiment)
    )
    tags = {"lifecycle.snapshot": str(snapshot_path)} if snapshot_path else {}
    run = client.create_run(experiment.experiment_id, tags=tags)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)


def test_keeps_aliased_audited_and_newest_versions_and_what_they_name(line):
    config, op, reg, home = line
    name = config.registry.model_name
    snaps = {v: snapshot(home, f"w{v}", OLD) for v in ("1", "2", "3", "4")}
    young = snapshot(home, "young", time.time())
    for v in range(1, 8):
        assert register(reg, config, snaps.get(str(v))) == str(v)
    reg.client.set_registered_model_alias(name, "production", "1")
    reg.client.set_model_version_tag(name, "2", "audit.event.0001", json.dumps({"event": "staged"}))
    packages = home / "packages"
    for v in ("1", "3"):
        (packages / f"demand_forecast-v{v}-abcdef123456").mkdir(parents=True)
        (packages / f"demand_forecast-v{v}-abcdef123456.pin.yaml").write_text("pin")
    (packages / "demand_forecast_eu-v3-abcdef123456").mkdir()  # another line's: not ours to touch
    services = home / "services"
    services.mkdir()
    for log in ("demand_forecast-v1.log", "demand_forecast-v3.log", "demand_forecast.front.log"):
        (services / log).write_text("log")

    summary = op.execute({"ti": SimpleNamespace(dag_id="demand_forecast__lifecycle", run_id="manual__x")})

    left = sorted((str(v.version) for v in reg.client.search_model_versions(f"name='{name}'")), key=int)
    assert left == ["1", "2", "6", "7"] and summary["versions_deleted"] == ["3", "4", "5"]
    assert reg.aliases(name) == {"production": "1"}, "aliases untouched"
    assert snaps["1"].exists() and snaps["2"].exists(), "a kept version's snapshot is kept however old"
    assert not snaps["3"].exists() and not snaps["4"].exists()
    assert young.exists(), "a young snapshot is kept even when nothing names it"
    assert sorted(p.name for p in packages.iterdir()) == [
        "demand_forecast-v1-abcdef123456",
        "demand_forecast-v1-abcdef123456.pin.yaml",
        "demand_forecast_eu-v3-abcdef123456",
    ]
    assert sorted(p.name for p in services.iterdir()) == ["demand_forecast-v1.log", "demand_forecast.front.log"]
    # the runs of deleted versions stay: their metrics and model files are still in the experiment
    experiment = reg.client.get_experiment_by_name(config.registry.experiment)
    assert len(reg.client.search_runs([experiment.experiment_id])) == 7


def test_a_second_pass_deletes_nothing_more(line):
    config, op, reg, home = line
    for _ in range(4):
        register(reg, config, None)
    context = {"ti": SimpleNamespace(dag_id="demand_forecast__lifecycle", run_id="manual__x")}
    first = op.execute(context)
    again = op.execute(context)
    assert first["versions_deleted"] == ["1", "2"] and again["versions_deleted"] == []
