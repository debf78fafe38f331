"""Structure of the local stack in docker-compose.yaml (no Docker engine needed).

Each rule is a function from the file's text to a list of problems; the real file must have none, and
``test_each_rule_catches_its_mutation`` edits the real text in one place per rule and checks the rule
notices, so these tests can fail when the file drifts.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
COMMON = "x-airflow-common"

# Airflow components and the command each runs (airflow-init runs a bash script instead).
AIRFLOW_COMPONENTS = {
    "airflow-init": None,
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
PROJECT_MOUNTS = {
    "dags": "/opt/airflow/dags",
    "plugins": "/opt/airflow/plugins",
    "include": "/opt/airflow/include",
}
API_HEALTH = "http://localhost:8080/api/v2/monitor/health"
LOCAL_HOME = "/opt/airflow/local"
# The only secrets this file may hold: interpolations whose defaults are documented local defaults.
DOCUMENTED_LOCAL_DEFAULTS = {"POSTGRES_PASSWORD": "airflow"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|PRIVATE|_KEY$")
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*)|:\?(?P<required>[^}]*))?\}")
# secrets compose refuses to start without (``${VAR:?message}``): no default could be safe
REQUIRED_SECRETS = {"MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"}
URI_PASSWORD = re.compile(r"://[^/:@\s]+:(?P<password>[^@\s]+)@")

Problems = list[str]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _doc(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


def _services(text: str) -> dict[str, dict[str, Any]]:
    return _doc(text).get("services") or {}


def _with_defaults(value: str) -> str:
    """What compose would interpolate with an empty environment: ``${VAR:-d}`` -> ``d``."""
    return INTERPOLATION.sub(lambda m: m.group("default") or "", value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for short and long volume syntax."""
    mounts: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only")))
            continue
        source, target, *mode = _with_defaults(volume).split(":")
        mounts[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return mounts


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif node is not None:
        yield str(node)


def _pin(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", (REPO / "requirements.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------
def components(text: str) -> Problems:
    services = _services(text)
    problems = [f"missing Airflow component {name!r}" for name in AIRFLOW_COMPONENTS if name not in services]
    for name, command in AIRFLOW_COMPONENTS.items():
        if command and name in services and _command(services[name]) != [command]:
            problems.append(f"{name} runs {_command(services[name])}, expected [{command!r}]")
    problems += [
        f"{name}: not needed with the LocalExecutor" for name in ("redis", "airflow-worker") if name in services
    ]
    return problems


def common_anchor(text: str) -> Problems:
    """Every component merges the very same ``x-airflow-common`` node and keeps its settings."""
    root = yaml.compose(text)
    top = {key.value: value for key, value in root.value}
    if COMMON not in top:
        return [f"no {COMMON} anchor"]
    common_node = top[COMMON]
    service_nodes = {key.value: value for key, value in top["services"].value}
    common = _doc(text)[COMMON]
    services = _services(text)
    problems: Problems = []
    for name in AIRFLOW_COMPONENTS:
        if name not in services:
            continue
        merged = [value for key, value in service_nodes[name].value if key.tag == "tag:yaml.org,2002:merge"]
        if not any(node is common_node for node in merged):
            problems.append(f"{name} is not built from <<: *{COMMON}")
        service = services[name]
        if service.get("image") != common.get("image"):
            problems.append(f"{name} uses image {service.get('image')!r}, not the common one")
        missing_env = _env(common).items() - _env(service).items()
        if missing_env:
            problems.append(f"{name} overrides/drops common environment: {sorted(k for k, _ in missing_env)}")
        if not set(common.get("volumes") or []) <= set(service.get("volumes") or []):
            problems.append(f"{name} drops common volumes")
    return problems


def image_pins(text: str) -> Problems:
    doc = _doc(text)
    problems: Problems = []
    image = _with_defaults(doc.get(COMMON, {}).get("image", ""))
    match = re.fullmatch(r"apache/airflow:(?P<version>[\w.]+)-python(?P<python>\d+\.\d+)", image)
    if not match:
        return [f"Airflow image {image!r} is not apache/airflow:<version>-python<x.y>"]
    if match["version"] != _pin("apache-airflow"):
        problems.append(f"Airflow image {match['version']} != apache-airflow=={_pin('apache-airflow')}")
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    if f">={match['python']}" not in requires:
        problems.append(f"image Python {match['python']} does not match requires-python {requires!r}")
    mlflow_image = _with_defaults(_services(text).get("mlflow", {}).get("image", ""))
    if not re.fullmatch(rf"ghcr\.io/mlflow/mlflow:v{re.escape(_pin('mlflow'))}(-full)?", mlflow_image):
        problems.append(f"MLflow image {mlflow_image!r} does not match mlflow=={_pin('mlflow')}")
    return problems


def mounts(text: str) -> Problems:
    services = _services(text)
    declared = set(_doc(text).get("volumes") or {})
    problems: Problems = []
    for name in AIRFLOW_COMPONENTS:
        service = services.get(name, {})
        found = _mounts(service)
        for folder, target in PROJECT_MOUNTS.items():
            source, read_only = found.get(target, ("", False))
            if source.rstrip("/") != f"./{folder}":
                problems.append(f"{name}: ./{folder} is not mounted at {target}")
            elif not read_only:
                problems.append(f"{name}: {target} should be read-only")
        if "/opt/airflow/logs" not in found:
            problems.append(f"{name}: no logs volume at /opt/airflow/logs")
        if _env(service).get("MLOPS_LOCAL_HOME") != LOCAL_HOME or LOCAL_HOME not in found:
            problems.append(f"{name}: MLOPS_LOCAL_HOME={LOCAL_HOME} is not set and mounted")
    for name, service in services.items():
        for target, (source, _) in _mounts(service).items():
            if not source.startswith((".", "/", "~")) and source not in declared:
                problems.append(f"{name}: named volume {source!r} ({target}) is not declared under volumes")
    mlflow_sources = [source for source, _ in _mounts(services.get("mlflow", {})).values()]
    if not any(source in declared for source in mlflow_sources):
        problems.append("mlflow: artifacts are not on a named volume")
    return problems


def dependencies(text: str) -> Problems:
    services = _services(text)
    problems: Problems = []
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions")
            depends = dict.fromkeys(depends, {})
        for target, spec in depends.items():
            if target not in services:
                problems.append(f"{name} depends on unknown service {target!r}")
            elif (spec or {}).get("condition") == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name} waits for {target} to be healthy, but {target} has no healthcheck")
    for name in AIRFLOW_COMPONENTS:
        depends = services.get(name, {}).get("depends_on") or {}
        if not isinstance(depends, dict):
            continue
        if (depends.get("postgres") or {}).get("condition") != "service_healthy":
            problems.append(f"{name} does not wait for postgres: service_healthy")
        if name != "airflow-init":
            condition = (depends.get("airflow-init") or {}).get("condition")
            if condition != "service_completed_successfully":
                problems.append(f"{name} does not wait for airflow-init: service_completed_successfully")
    return problems


def healthchecks(text: str) -> Problems:
    services = _services(text)
    problems: Problems = []
    test = services.get("airflow-apiserver", {}).get("healthcheck", {}).get("test") or []
    if API_HEALTH not in test:
        problems.append(f"airflow-apiserver healthcheck does not probe {API_HEALTH}: {test}")
    for name in ("postgres", "mlflow", *[n for n in AIRFLOW_COMPONENTS if n != "airflow-init"]):
        if "healthcheck" not in services.get(name, {}):
            problems.append(f"{name} has no healthcheck")
    return problems


def airflow_environment(text: str) -> Problems:
    doc = _doc(text)
    services = _services(text)
    env = _env(doc.get(COMMON, {}))
    problems: Problems = []
    expected = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://airflow-apiserver:8080/execution/",
        "MLOPS_LOCAL_HOME": LOCAL_HOME,
    }
    for key, value in expected.items():
        if env.get(key, "").lower() != value.lower():
            problems.append(f"{COMMON} environment {key}={env.get(key)!r}, expected {value!r}")
    conn = _with_defaults(env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""))
    match = re.fullmatch(r"postgresql\+psycopg2://[^@]+@(?P<host>[\w-]+)(:\d+)?/\w+", conn)
    if not match or match["host"] not in services:
        problems.append(f"SQL_ALCHEMY_CONN {conn!r} is not postgresql+psycopg2 on a compose service")
    if "127.0.0.1:8080:8080" not in (services.get("airflow-apiserver", {}).get("ports") or []):
        problems.append("airflow-apiserver does not publish 8080 on the host's loopback (127.0.0.1:8080:8080)")
    try:
        mlflow_conn = json.loads(env.get("AIRFLOW_CONN_MLFLOW_DEFAULT", ""))
    except json.JSONDecodeError:
        problems.append("AIRFLOW_CONN_MLFLOW_DEFAULT is not a JSON connection")
    else:
        mlflow_port = flag_value(_command(services.get("mlflow", {})), "--port")
        wanted = {"conn_type": "http", "host": "mlflow", "port": int(mlflow_port or 0), "schema": "http"}
        wanted |= {
            "login": "${MLFLOW_ADMIN_USER:-admin}",
            "password": "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD}",
        }
        if mlflow_conn != wanted or "mlflow" not in services:
            problems.append(f"AIRFLOW_CONN_MLFLOW_DEFAULT {mlflow_conn} does not reach the mlflow service")
    for name, service in services.items():
        if "_PIP_ADDITIONAL_REQUIREMENTS" in _env(service):
            problems.append(f"{name} sets _PIP_ADDITIONAL_REQUIREMENTS: extend the image instead")
    return problems


def flag_value(command: list[str], flag: str) -> str | None:
    """The value after ``flag`` (or in ``flag=value``) in a command line."""
    for i, part in enumerate(command):
        if part == flag and i + 1 < len(command):
            return command[i + 1]
        if part.startswith(f"{flag}="):
            return part.split("=", 1)[1]
    return None


def mlflow_server(text: str) -> Problems:
    command = _command(_services(text).get("mlflow", {}))
    if command[:2] != ["mlflow", "server"]:
        return [f"mlflow does not run `mlflow server`: {command}"]
    problems: Problems = []
    allowed = (flag_value(command, "--allowed-hosts") or "").split(",")
    for host in ("mlflow", "mlflow:5000", "localhost:5000"):
        if host not in allowed:
            problems.append(f"mlflow --allowed-hosts lacks {host!r} (requests with that Host header get rejected)")
    store = _with_defaults(flag_value(command, "--backend-store-uri") or "")
    if not re.fullmatch(r"postgresql\+psycopg2://[^@]+@postgres(:\d+)?/mlflow", store):
        problems.append(f"mlflow backend store {store!r} is not the mlflow database on postgres")
    if not flag_value(command, "--artifacts-destination"):
        problems.append("mlflow has no --artifacts-destination")
    if flag_value(command, "--host") != "0.0.0.0":
        problems.append("mlflow does not listen on 0.0.0.0")
    service = _services(text).get("mlflow", {})
    if flag_value(command, "--app-name") != "basic-auth":
        problems.append("mlflow runs without --app-name basic-auth: anyone on the network can move aliases")
    env = _env(service)
    if env.get("MLFLOW_AUTH_CONFIG_PATH") not in [v.split(":")[1] for v in service.get("volumes") or [] if ":" in v]:
        problems.append("mlflow's MLFLOW_AUTH_CONFIG_PATH is not a mounted file")
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        match = INTERPOLATION.fullmatch(env.get(key, ""))
        if not match or match["required"] is None:
            problems.append(f"mlflow {key} is not a required ${{VAR:?...}}")
    if service.get("ports") != ["127.0.0.1:5000:5000"]:
        problems.append(f"mlflow publishes {service.get('ports')}, not on the host's loopback only")
    return problems


def secrets(text: str) -> Problems:
    """Secret-looking values must be ``${VAR}`` or ``${VAR:-<documented local default>}``."""
    doc = _doc(text)
    problems: Problems = []

    def judge(where: str, value: str) -> None:
        match = INTERPOLATION.fullmatch(value)
        if not match:
            problems.append(f"{where}: secret literal {value!r}")
        elif match["required"] is not None and match["var"] not in REQUIRED_SECRETS:
            problems.append(f"{where}: ${{{match['var']}:?}} is not a documented required secret")
        elif match["default"] is not None and DOCUMENTED_LOCAL_DEFAULTS.get(match["var"]) != match["default"]:
            problems.append(f"{where}: undocumented default for ${{{match['var']}}}")

    blocks = {COMMON: doc.get(COMMON, {}), **_services(text)}
    for name, block in blocks.items():
        for key, value in _env(block).items():
            if SECRET_KEY.search(key) and not key.endswith(("_FILE", "_PATH", "_CMD")):
                judge(f"{name} {key}", value)
    for value in _strings(doc):
        for match in URI_PASSWORD.finditer(value):
            judge(f"URI {value!r}", match["password"])
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for var, default in DOCUMENTED_LOCAL_DEFAULTS.items():
        if not re.search(rf"{var}\b[\s\S]*?Default: {re.escape(default)}\b", comments):
            problems.append(f"{var} and its local default {default!r} are not documented in the header")
    return problems


RULES: dict[str, Callable[[str], Problems]] = {
    "components": components,
    "common_anchor": common_anchor,
    "image_pins": image_pins,
    "mounts": mounts,
    "dependencies": dependencies,
    "healthchecks": healthchecks,
    "airflow_environment": airflow_environment,
    "mlflow_server": mlflow_server,
    "secrets": secrets,
}


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text() -> str:
    return COMPOSE.read_text()


@pytest.mark.parametrize("rule", RULES)
def test_compose_file_follows_rule(text: str, rule: str) -> None:
    assert RULES[rule](text) == []


# (rule, old text in the real file, replacement): each must make that rule complain.
_ENV_TAIL = "    MLOPS_LOCAL_HOME: /opt/airflow/local\n"
_DEPENDS_ANCHOR = "  depends_on:\n    &airflow-common-depends-on\n"
MUTATIONS = [
    ("components", "  airflow-triggerer:\n", "  airflow-triggerer-renamed:\n"),
    ("components", "command: dag-processor", "command: scheduler"),
    (
        "common_anchor",
        "  airflow-triggerer:\n    <<: *airflow-common\n",
        "  airflow-triggerer:\n    image: ${AIRFLOW_IMAGE_NAME:-apache/airflow:3.3.2-python3.11}\n",
    ),
    ("image_pins", "apache/airflow:3.3.2-python3.11}", "apache/airflow:3.3.1-python3.11}"),
    ("image_pins", "apache/airflow:3.3.2-python3.11}", "apache/airflow:3.3.2-python3.12}"),
    ("image_pins", "mlflow/mlflow:v3.17.2-full}", "mlflow/mlflow:v3.16.0-full}"),
    ("mounts", "./dags:/opt/airflow/dags:ro", "./dags:/opt/airflow/dag"),
    ("mounts", "./include:/opt/airflow/include:ro", "./include:/opt/airflow/include"),
    ("mounts", "MLOPS_LOCAL_HOME: /opt/airflow/local", "MLOPS_LOCAL_HOME: /tmp/local"),
    ("mounts", "  mlflow-artifacts:\n", "\n"),
    (
        "dependencies",
        "        condition: service_completed_successfully\n\n  airflow-scheduler:",
        "        condition: service_started\n\n  airflow-scheduler:",
    ),
    (
        "dependencies",
        "      mlflow:\n        condition: service_healthy",
        "      mlflw:\n        condition: service_healthy",
    ),
    ("dependencies", f"{_DEPENDS_ANCHOR}    postgres:", f"{_DEPENDS_ANCHOR}    postgres-db:"),
    (
        "healthchecks",
        '"http://localhost:8080/api/v2/monitor/health"',
        '"http://localhost:8080/api/v2/version"',
    ),
    ("airflow_environment", "EXECUTOR: LocalExecutor", "EXECUTOR: CeleryExecutor"),
    ("airflow_environment", "LOAD_EXAMPLES: 'false'", "LOAD_EXAMPLES: 'true'"),
    ("airflow_environment", '"host": "mlflow"', '"host": "mlflow-server"'),
    ("airflow_environment", _ENV_TAIL, f"{_ENV_TAIL}    _PIP_ADDITIONAL_REQUIREMENTS: mlflow\n"),
    ("airflow_environment", "airflow-apiserver:8080/execution/", "localhost:8080/execution/"),
    (
        "mlflow_server",
        "      - --allowed-hosts\n      - mlflow,mlflow:5000,",
        "      - --workers\n      - 1,",
    ),
    ("mlflow_server", "@postgres:5432/mlflow", "@postgres:5432/airflow"),
    ("mlflow_server", "      - --app-name\n      - basic-auth\n", ""),
    ("mlflow_server", '      - "127.0.0.1:5000:5000"', '      - "5000:5000"'),
    (
        "mlflow_server",
        "MLFLOW_AUTH_ADMIN_PASSWORD: ${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD}",
        "MLFLOW_AUTH_ADMIN_PASSWORD: ${MLFLOW_ADMIN_PASSWORD:-admin}",
    ),
    ("mlflow_server", "      - ./config/mlflow_basic_auth.ini:/etc/mlflow/basic_auth.ini:ro\n", ""),
    ("airflow_environment", '      - "127.0.0.1:8080:8080"', '      - "8080:8080"'),
    ("airflow_environment", ', "login": "${MLFLOW_ADMIN_USER:-admin}"', ""),
    ("secrets", "    POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-airflow}", "    POSTGRES_PASSWORD: hunter2"),
    (
        "secrets",
        "airflow:${POSTGRES_PASSWORD:-airflow}@postgres:5432/mlflow",
        "airflow:hunter2@postgres:5432/mlflow",
    ),
    ("secrets", _ENV_TAIL, f"{_ENV_TAIL}    AIRFLOW__API_AUTH__JWT_SECRET: s3cr3t\n"),
    ("secrets", "PGPASSWORD: ${POSTGRES_PASSWORD:-airflow}", "PGPASSWORD: ${POSTGRES_PASSWORD:-changeme}"),
]


@pytest.mark.parametrize(("rule", "old", "new"), MUTATIONS, ids=[f"{m[0]}-{i}" for i, m in enumerate(MUTATIONS)])
def test_each_rule_catches_its_mutation(text: str, rule: str, old: str, new: str) -> None:
    assert text.count(old) == 1, f"mutation target not found exactly once (did the file change?): {old!r}"
    mutated = text.replace(old, new)
    assert RULES[rule](mutated), f"rule {rule!r} did not notice: {old!r} -> {new!r}"
