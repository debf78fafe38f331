"""The deployment repository's pipeline steps (``python -m model_service.cli``) run for real, as the CI jobs
and the local deploy adapter run them: a subprocess from the repository root (include/deployment).

The registered model and its two packages (v1 with a golden set logged by the training run, v2 without)
come from test_model_service.py's builder (built once per pytest process).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_model_service import (
    CODE_REVISION,
    DEPLOYMENT_DIR,
    GOLDEN_ROWS,
    MODEL_LINE,
    MODEL_NAME,
    Built,
    Running,
    built_packages,
    clean_env,
    cli,
    launch,
    service_env,
    stop,
    wait_ready,
    write_pin,
)

NO_COMMIT = "0" * 40
IMAGE = "registry.example.com/ml/deployments/svc_test_line:v1-01234567"


def _run(*args: str, cwd: Path = DEPLOYMENT_DIR, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=120)


def _one_line(stderr: str) -> str:
    """The single line a failing step writes."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_packages(tmp_path_factory)


# Packaging that must fail: tag -> pin fields ({run_v1}/{run_v2} filled in).
FAILING_PACKAGES: dict[str, dict[str, str]] = {
    "unregistered": {"model_version": "99", "run_id": "{run_v1}"},
    "other_run": {"model_version": "1", "run_id": "{run_v2}"},
    "no_run_id": {"model_version": "1"},
    "no_version_no_name": {"model_name": "", "run_id": "{run_v1}"},
}


@dataclass
class Launched:
    services: dict[str, Running]  # model version -> its package served
    packaging: dict[str, tuple[subprocess.Popen[str], Path, Path]]  # FAILING_PACKAGES tag -> (proc, pin, out)


@pytest.fixture(scope="module")
def launched(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """The v1 and v2 services and the FAILING_PACKAGES steps, started together (their imports overlap)."""
    where = tmp_path_factory.mktemp("cli_runs")
    runs = {"run_v1": built.run_id("1"), "run_v2": built.run_id("2")}
    started = Launched({}, {})
    try:
        for version in ("1", "2"):
            env = service_env(built.packages[version], version)
            started.services[version] = launch(where, env, f"v{version}")
        for tag, fields in FAILING_PACKAGES.items():
            pin_fields = {"model_line": MODEL_LINE, "model_name": MODEL_NAME} | {
                key: value.format(**runs) for key, value in fields.items()
            }
            pin = write_pin(where / tag / "models" / f"{MODEL_LINE}.yaml", **pin_fields)
            out = where / tag / "build" / MODEL_LINE
            proc = subprocess.Popen(
                cli("package", "--pin", str(pin), "--out", str(out)),
                cwd=DEPLOYMENT_DIR,
                env=clean_env(MLFLOW_TRACKING_URI=built.tracking_uri),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            started.packaging[tag] = (proc, pin, out)
        yield started
    finally:
        for running in started.services.values():
            stop(running.proc)
        for proc, _, _ in started.packaging.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def services(launched: Launched) -> dict[str, Running]:
    return {version: wait_ready(running) for version, running in launched.services.items()}


@pytest.fixture(scope="module")
def failed_packaging(launched: Launched) -> dict[str, dict[str, Any]]:
    results = {}
    for tag, (proc, pin, out) in launched.packaging.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[tag] = {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "pin": pin, "out": out}
    return results


# --------------------------------------------------------------------------------------------------
# package
# --------------------------------------------------------------------------------------------------
def _manifest(package: Path) -> dict[str, Any]:
    return json.loads((package / "package.json").read_text())


@pytest.mark.parametrize("version", ["1", "2"])
def test_package_holds_the_pin_and_checksums_of_every_file(built: Built, version: str) -> None:
    package = built.packages[version]
    manifest = _manifest(package)
    assert {key: manifest[key] for key in ("format", "model_line", "model_name", "model_version", "run_id")} == {
        "format": 1,
        "model_line": MODEL_LINE,
        "model_name": MODEL_NAME,
        "model_version": version,
        "run_id": built.run_id(version),
    }
    assert manifest["source"] == f"models:/{MODEL_NAME}/{version}"
    assert datetime.fromisoformat(manifest["packaged_at"]).tzinfo is not None
    on_disk = {str(p.relative_to(package)) for p in package.rglob("*") if p.is_file() and p.name != "package.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model/MLmodel", "model/requirements.txt", "golden_set.json"} <= on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((package / name).read_bytes()).hexdigest() == digest, name
    assert not package.with_name(package.name + ".partial").exists()
    summary = built.package_runs[version].stdout.strip()
    assert summary.startswith(f"packaged {MODEL_LINE}: {MODEL_NAME} v{version} (run {built.run_id(version)})")


def test_package_takes_the_golden_set_the_training_run_logged(built: Built) -> None:
    run_id = built.run_id("1")
    assert _manifest(built.packages["1"])["golden_set_source"] == f"runs:/{run_id}/golden_set.json"
    golden = json.loads((built.packages["1"] / "golden_set.json").read_text())
    logged = built.model["versions"]["1"]["golden"]
    assert len(golden["rows"]) == GOLDEN_ROWS
    assert golden == {"source": f"runs:/{run_id}/golden_set.json"} | logged
    assert f"golden set from runs:/{run_id}/golden_set.json" in built.package_runs["1"].stdout


def test_package_without_a_logged_golden_set_scores_the_input_example(built: Built) -> None:
    assert _manifest(built.packages["2"])["golden_set_source"] == "input example scored by mlflow.pyfunc at packaging"
    golden = json.loads((built.packages["2"] / "golden_set.json").read_text())
    example = built.model["versions"]["2"]["example"]
    assert golden["rows"] == example["rows"]
    assert golden["predictions"] == pytest.approx(example["predictions"], rel=1e-9)


def test_package_of_an_unregistered_version_names_it(failed_packaging: dict[str, dict[str, Any]]) -> None:
    result = failed_packaging["unregistered"]
    assert result["returncode"] == 1, result["stderr"][-3000:]
    line = _one_line(result["stderr"])
    assert line.startswith("package: ") and f"{MODEL_NAME} v99" in line and "not found in the MLflow registry" in line
    assert not result["out"].exists() and not result["out"].with_name(f"{MODEL_LINE}.partial").exists()


def test_package_refuses_a_pin_whose_run_is_not_the_registered_one(
    failed_packaging: dict[str, dict[str, Any]], built: Built
) -> None:
    result = failed_packaging["other_run"]
    assert result["returncode"] == 1, result["stderr"][-3000:]
    line = _one_line(result["stderr"])
    assert f"version 1 comes from run {built.run_id('1')}, not the pinned run" in line, line
    assert built.run_id("2") in line  # the pinned one, in the label
    assert not result["out"].exists()


@pytest.mark.parametrize(
    ("tag", "missing"), [("no_run_id", "run_id"), ("no_version_no_name", "model_name, model_version")]
)
def test_malformed_pin_names_the_file_and_the_fields(
    failed_packaging: dict[str, dict[str, Any]], tag: str, missing: str
) -> None:
    result = failed_packaging[tag]
    assert result["returncode"] == 1, result["stderr"][-3000:]
    assert _one_line(result["stderr"]) == f"package: pin file {result['pin']}: missing {missing}"


def test_package_names_a_pin_file_that_is_not_yaml(tmp_path: Path) -> None:
    pin = tmp_path / "broken.yaml"
    pin.write_text("model_line: [unclosed\n")
    result = _run("package", "--pin", str(pin), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert _one_line(result.stderr) == (
        f"package: pin file {pin} is not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"
    )


# --------------------------------------------------------------------------------------------------
# lines
# --------------------------------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=repo, env=clean_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.fixture(scope="module")
def pins_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A deployment repository with two pins committed, then one of them changed (with an unrelated file)."""
    repo = tmp_path_factory.mktemp("pins_repo")
    _git(repo, "init", "-q", "-b", "main")
    for line in ("alpha_line", "beta_line"):
        write_pin(repo / "models" / f"{line}.yaml", model_line=line, model_name=line, model_version="1", run_id="r1")
    (repo / "README.md").write_text("deployments\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "two pins")
    first = _git(repo, "rev-parse", "HEAD")
    write_pin(repo / "models" / "beta_line.yaml", model_line="beta_line", model_name="beta_line", model_version="2",
              run_id="r2")  # fmt: skip
    (repo / "README.md").write_text("deployments, changed\n")
    _git(repo, "commit", "-q", "-am", "beta_line v2")
    return {"repo": repo, "before": first, "head": _git(repo, "rev-parse", "HEAD")}


def _lines(pins_repo: dict[str, Any], *args: str, **env: str) -> list[str]:
    result = _run("lines", *args, cwd=pins_repo["repo"], PYTHONPATH=str(DEPLOYMENT_DIR), **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_lines_prints_only_the_changed_pin(pins_repo: dict[str, Any]) -> None:
    env = {"CI_COMMIT_BEFORE_SHA": pins_repo["before"], "CI_COMMIT_SHA": pins_repo["head"]}
    assert _lines(pins_repo, **env) == ["beta_line"]


def test_lines_all_prints_every_pin(pins_repo: dict[str, Any]) -> None:
    env = {"CI_COMMIT_BEFORE_SHA": pins_repo["before"], "CI_COMMIT_SHA": pins_repo["head"]}
    assert _lines(pins_repo, "--all", **env) == ["alpha_line", "beta_line"]


def test_lines_with_a_zero_base_prints_every_pin(pins_repo: dict[str, Any]) -> None:
    """GitLab's CI_COMMIT_BEFORE_SHA is all zeros on a branch's first push."""
    assert _lines(pins_repo, CI_COMMIT_BEFORE_SHA=NO_COMMIT, CI_COMMIT_SHA=pins_repo["head"]) == [
        "alpha_line",
        "beta_line",
    ]


def test_lines_with_an_unknown_base_fails_naming_it(pins_repo: dict[str, Any]) -> None:
    result = _run("lines", "--base", "f" * 40, cwd=pins_repo["repo"], PYTHONPATH=str(DEPLOYMENT_DIR))
    assert result.returncode == 1
    assert _one_line(result.stderr).startswith(f"lines: git diff {'f' * 12}..")


# --------------------------------------------------------------------------------------------------
# smoke
# --------------------------------------------------------------------------------------------------
def test_smoke_passes_against_the_service_of_the_package(services: dict[str, Running], built: Built) -> None:
    result = _run(
        "smoke", "--url", services["1"].url, "--package", str(built.packages["1"]),
        "--code-revision", CODE_REVISION, "--wait", "30",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        f"{services['1'].url} serves {MODEL_LINE}: {MODEL_NAME} v1 (run {built.run_id('1')}); "
        f"{GOLDEN_ROWS} golden rows match the offline predictions"
    )


def test_smoke_fails_against_a_service_of_another_version(services: dict[str, Running], built: Built) -> None:
    result = _run("smoke", "--url", services["2"].url, "--package", str(built.packages["1"]), "--wait", "30")
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert "reports another deployment" in line
    assert "model_version '2' (expected '1')" in line, line
    assert f"run_id '{built.run_id('2')}' (expected '{built.run_id('1')}')" in line, line


def test_smoke_fails_on_another_code_revision(services: dict[str, Running], built: Built) -> None:
    other = "f" * 40
    result = _run(
        "smoke", "--url", services["1"].url, "--package", str(built.packages["1"]),
        "--code-revision", other, "--wait", "30",
    )  # fmt: skip
    assert result.returncode == 1
    assert f"code_revision '{CODE_REVISION}' (expected '{other}')" in _one_line(result.stderr)


# --------------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------------
def test_render_prints_the_manifests_of_the_package(built: Built) -> None:
    result = _run(
        "render", "--package", str(built.packages["1"]), "--env", "staging", "--image", IMAGE,
        "--code-revision", CODE_REVISION,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    docs = list(yaml.safe_load_all(result.stdout))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert {"Deployment", "Service"} <= by_kind.keys()
    dns = MODEL_LINE.replace("_", "-")
    assert {doc["metadata"]["name"] for doc in docs} == {dns}
    deployment = by_kind["Deployment"]
    labels = deployment["metadata"]["labels"]
    assert labels["mlops-lifecycle/model-version"] == "1"
    assert labels["mlops-lifecycle/environment"] == "staging"
    assert deployment["metadata"]["annotations"]["mlops-lifecycle/run-id"] == built.run_id("1")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "model-service")
    assert container["image"] == IMAGE
    env = {var["name"]: var.get("value") for var in container["env"]}
    assert (env["MODEL_LINE"], env["MODEL_NAME"], env["MODEL_VERSION"]) == (MODEL_LINE, MODEL_NAME, "1")
    assert env["CODE_REVISION"] == CODE_REVISION


def test_render_of_an_unknown_environment_fails_naming_it(built: Built) -> None:
    result = _run("render", "--package", str(built.packages["1"]), "--env", "qa", "--image", IMAGE)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert "unknown environment 'qa'" in line and re.search(r"dev\.yaml.*production\.yaml.*staging\.yaml", line)


def test_cli_runs_without_arguments_only_to_show_usage() -> None:
    result = subprocess.run(cli(), cwd=DEPLOYMENT_DIR, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: python -m model_service.cli" in result.stderr
