"""The deployment repository's CI pipeline, Dockerfile and .dockerignore (no GitLab, no Docker engine needed).

The lifecycle waits for GitLab deployments of the merge commit to the environments of the model line's
``deploy.environments``, in order; the pipeline must produce exactly those, build an image that says
what it serves, and never leak the MLflow token. Each rule is a function from a file's text to a list of
problems; the real files must have none, and ``test_each_rule_catches_its_mutation`` edits the real text
in one place per case and checks the rule notices, so these tests can fail when the files drift.
"""

from __future__ import annotations

import io
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from test_docker_compose import flag_value

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = REPO / "include" / "deployment"
GITLAB_CI = DEPLOYMENT / ".gitlab-ci.yml"
DOCKERFILE = DEPLOYMENT / "Dockerfile"
DOCKERIGNORE = DEPLOYMENT / ".dockerignore"
K8S_OVERLAYS = DEPLOYMENT / "k8s" / "overlays"
PRODUCTION_EXAMPLE = REPO / "include" / "examples" / "production" / "demand_forecast.yaml"

STAGES = ["package", "test", "build", "deploy-dev", "deploy-staging", "pre-production", "deploy-production"]
PRE_PRODUCTION_STAGE = "pre-production"
CLI_SUBCOMMANDS = {"package", "lines", "render", "smoke"}  # the contract's `python -m model_service.cli` commands
MERGE_REQUEST_JOBS = {"package", "test"}  # what a merge request pipeline runs; everything else: default branch
TIERS = {"dev": "development", "staging": "staging", "production": "production"}
DEFAULT_BRANCH_RULE = "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"
GITLAB_KEYWORDS = {
    "stages", "variables", "workflow", "default", "include", "image", "services", "cache",
    "before_script", "after_script", "spec",
}  # fmt: skip
# Build arguments the image needs (Dockerfile ARGs without a default, besides the base image).
IMAGE_BUILD_ARGS = {"MODEL_PACKAGE", "MODEL_LINE", "MODEL_NAME", "MODEL_VERSION", "CODE_REVISION", "IMAGE_BUILT_AT"}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE_KEY", re.I)
EXACT_TAG = re.compile(r"^[^:@\s]+:(?P<tag>[^@\s]*\d+\.\d+\.\d+[^@\s]*)(@sha256:[0-9a-f]{64})?$")

APP_UID = 10001  # the Deployment's securityContext runs as this uid
MODEL_DIR = "/opt/model"
SERVICE_PORT = "8080"
EXAMPLE_PACKAGE = "build/demand_forecast"  # what ${MODEL_PACKAGE} is in the build context

Problems = list[str]


# --------------------------------------------------------------------------------------------------
# .gitlab-ci.yml helpers
# --------------------------------------------------------------------------------------------------
def _environments() -> list[str]:
    """The production example's ``deploy.environments``: what the lifecycle waits for, in order."""
    return list(yaml.safe_load(PRODUCTION_EXAMPLE.read_text())["deploy"]["environments"])


def _jobs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: job
        for name, job in doc.items()
        if name not in GITLAB_KEYWORDS and not name.startswith(".") and isinstance(job, dict)
    }


def _stage(job: dict[str, Any]) -> str:
    return job.get("stage", "test")  # GitLab's default stage


def _needs(job: dict[str, Any]) -> list[str]:
    return [need if isinstance(need, str) else need.get("job", "") for need in job.get("needs") or []]


def _flatten(lines: Any) -> Iterator[str]:
    if isinstance(lines, str):
        yield lines
    elif isinstance(lines, list):
        for item in lines:
            yield from _flatten(item)


def _script(job: dict[str, Any]) -> str:
    return "\n".join(line for key in ("before_script", "script", "after_script") for line in _flatten(job.get(key)))


def _all_scripts(doc: dict[str, Any]) -> dict[str, str]:
    scripts = {name: _script(job) for name, job in _jobs(doc).items()}
    scripts["default"] = _script(doc.get("default") or {})
    return scripts


def _default_branch_only(job: dict[str, Any]) -> bool:
    """Every rule that can add the job requires the default branch (and there are rules)."""
    if "only" in job or "except" in job:
        return False
    rules = [rule for rule in job.get("rules") or [] if rule.get("when") != "never"]
    return bool(rules) and all(DEFAULT_BRANCH_RULE in " ".join(str(rule.get("if", "")).split()) for rule in rules)


def _deploy_jobs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Jobs with an environment, in stage order."""
    jobs = [(name, job) for name, job in _jobs(doc).items() if job.get("environment")]
    stages = doc.get("stages") or []
    return sorted(jobs, key=lambda item: stages.index(_stage(item[1])) if _stage(item[1]) in stages else 99)


def _environment_name(job: dict[str, Any]) -> str:
    env = job.get("environment")
    return env if isinstance(env, str) else (env or {}).get("name", "")


def _image_name(image: Any) -> str:
    return image if isinstance(image, str) else (image or {}).get("name", "")


def _overlay_namespace(env: str) -> str | None:
    """The namespace k8s/overlays/<env>.yaml gives the Deployment (None when it names none)."""
    path = K8S_OVERLAYS / f"{env}.yaml"
    if not path.exists():
        return None
    for manifest in yaml.safe_load_all(path.read_text()):
        if manifest and manifest.get("kind") == "Deployment":
            return (manifest.get("metadata") or {}).get("namespace")
    return None


# --------------------------------------------------------------------------------------------------
# .gitlab-ci.yml rules
# --------------------------------------------------------------------------------------------------
def ci_stages(text: str) -> Problems:
    doc = yaml.safe_load(text)
    stages = doc.get("stages") or []
    problems = [] if stages == STAGES else [f"stages are {stages}, expected {STAGES}"]
    for name, job in _jobs(doc).items():
        if _stage(job) not in stages:
            problems.append(f"{name}: stage {_stage(job)!r} is not declared")
    return problems


def ci_needs(text: str) -> Problems:
    """``needs`` name existing, earlier jobs, which exist in every pipeline the needing job is in."""
    doc = yaml.safe_load(text)
    jobs = _jobs(doc)
    stages = doc.get("stages") or []
    problems: Problems = []
    for name, job in jobs.items():
        for need in _needs(job):
            if need not in jobs:
                problems.append(f"{name} needs unknown job {need!r}")
                continue
            if _stage(jobs[need]) in stages and _stage(job) in stages:
                if stages.index(_stage(jobs[need])) > stages.index(_stage(job)):
                    problems.append(f"{name} needs {need}, which runs in a later stage")
            if _default_branch_only(jobs[need]) and not _default_branch_only(job):
                problems.append(f"{name} needs {need}, which only exists in default-branch pipelines")
    return problems


def ci_environments(text: str) -> Problems:
    """The deploy jobs are `deploy:<env>` for exactly the lifecycle's environments, in stage order."""
    doc = yaml.safe_load(text)
    wanted = _environments()
    deploys = _deploy_jobs(doc)
    found = [_environment_name(job) for _, job in deploys]
    problems = [] if found == wanted else [f"deploy jobs' environments in stage order are {found}, expected {wanted}"]
    stages = [_stage(job) for _, job in deploys]
    if len(set(stages)) != len(stages):
        problems.append(f"two deploy jobs share a stage: {stages} (their order would not be fixed)")
    for name, job in deploys:
        env = _environment_name(job)
        if name != f"deploy:{env}":
            problems.append(f"job {name} deploys to {env}; the contract names it deploy:{env}")
        tier = (job["environment"] or {}).get("deployment_tier") if isinstance(job["environment"], dict) else None
        if tier != TIERS.get(env):
            problems.append(f"{name}: deployment_tier {tier!r}, expected {TIERS.get(env)!r}")
    rendered = str((doc.get("variables") or {}).get("DEPLOY_ENVIRONMENTS", "")).split()
    if rendered != wanted:
        problems.append(f"manifests are rendered for DEPLOY_ENVIRONMENTS={rendered}, expected {wanted}")
    return problems


def ci_deploy_jobs(text: str) -> Problems:
    """Each deploy job applies its environment's manifests and waits for every line's rollout, alone."""
    doc = yaml.safe_load(text)
    problems: Problems = []
    for name, job in _deploy_jobs(doc):
        env = _environment_name(job)
        script = _script(job)
        if job.get("resource_group") != env:
            problems.append(f"{name}: resource_group {job.get('resource_group')!r}, expected {env!r}")
        if job.get("interruptible") is not False:
            problems.append(f"{name}: not interruptible: false (a cancelled rollout leaves {env} half-deployed)")
        if not re.search(r"kubectl apply\b.*-f \"?build/k8s/\$CI_ENVIRONMENT_NAME/", script):
            problems.append(f"{name}: does not kubectl apply -f build/k8s/$CI_ENVIRONMENT_NAME/")
        if not re.search(r"kubectl rollout status \"?deployment/\$\(echo \"\$line\" \| tr _ -\)", script):
            problems.append(f"{name}: does not wait for `kubectl rollout status deployment/<line with - for _>`")
        if not re.search(r"--timeout=\d+[smh]", script):
            problems.append(f"{name}: rollout status has no --timeout")
        variables = job.get("variables") or {}
        if not variables.get("KUBE_CONTEXT") or 'use-context "$KUBE_CONTEXT"' not in script:
            problems.append(f"{name}: does not select its cluster with KUBE_CONTEXT")
        namespace, overlay = variables.get("KUBE_NAMESPACE"), _overlay_namespace(env)
        if overlay and namespace != overlay:
            problems.append(f"{name}: KUBE_NAMESPACE {namespace!r}, but k8s/overlays/{env}.yaml uses {overlay!r}")
    return problems


def ci_production_gate(text: str) -> Problems:
    """Production is the production tier and comes only after a smoke test of staging."""
    doc = yaml.safe_load(text)
    jobs = _jobs(doc)
    stages = doc.get("stages") or []
    production = jobs.get("deploy:production", {})
    env = production.get("environment") or {}
    if not isinstance(env, dict) or env.get("deployment_tier") != "production":
        return ["deploy:production is not deployment_tier production"]
    gates = [need for need in _needs(production) if _stage(jobs.get(need, {})) == PRE_PRODUCTION_STAGE]
    if not gates:
        return [f"deploy:production does not need a {PRE_PRODUCTION_STAGE} job"]
    problems: Problems = []
    for gate in gates:
        if "deploy:staging" not in _needs(jobs[gate]):
            problems.append(f"{gate} does not need deploy:staging (it would not test what staging runs)")
        if "python -m model_service.cli smoke" not in _script(jobs[gate]):
            problems.append(f"{gate} does not run `python -m model_service.cli smoke`")
        staging = (jobs.get("deploy:staging", {}).get("variables") or {}).get("KUBE_NAMESPACE")
        if (jobs[gate].get("variables") or {}).get("KUBE_NAMESPACE") != staging:
            problems.append(f"{gate} looks for the service outside staging's namespace {staging!r}")
    order = [
        stages.index(s) if s in stages else -1 for s in ("deploy-staging", PRE_PRODUCTION_STAGE, "deploy-production")
    ]
    if order != sorted(order) or -1 in order:
        problems.append(f"stages deploy-staging < {PRE_PRODUCTION_STAGE} < deploy-production do not hold: {stages}")
    return problems


def ci_default_branch(text: str) -> Problems:
    """Merge request pipelines package and test; building and deploying happen only on the default branch."""
    doc = yaml.safe_load(text)
    problems: Problems = []
    workflow = [str(rule.get("if", "")) for rule in (doc.get("workflow") or {}).get("rules") or []]
    if not any("merge_request_event" in rule for rule in workflow):
        problems.append("workflow does not run merge request pipelines")
    in_merge_requests = {name for name, job in _jobs(doc).items() if not _default_branch_only(job)}
    if in_merge_requests != MERGE_REQUEST_JOBS:
        found, wanted = sorted(in_merge_requests), sorted(MERGE_REQUEST_JOBS)
        problems.append(f"jobs outside default-branch pipelines are {found}, expected {wanted}")
    return problems


def ci_functional_tests(text: str) -> Problems:
    """Each packaged model is tested with its own requirements before any image is built from it."""
    jobs = _jobs(yaml.safe_load(text))
    script = _script(jobs.get("test", {}))
    problems: Problems = []
    if "package" not in _needs(jobs.get("test", {})):
        problems.append("test does not need package (it would have no model to test)")
    if not re.search(r"MODEL_DIR=\"?build/\$line\"? python -m pytest tests/", script):
        problems.append('test does not run `MODEL_DIR="build/$line" python -m pytest tests/` per line')
    if '-r "build/$line/model/requirements.txt"' not in script:
        problems.append("test does not install the model's own requirements.txt")
    if "test" not in _needs(jobs.get("build", {})):
        problems.append("build does not need test: an untested package could be built and deployed")
    return problems


def ci_cli(text: str) -> Problems:
    """Scripts call only the contract's CLI subcommands, and the pipeline uses all of them."""
    used = {
        (name, match)
        for name, script in _all_scripts(yaml.safe_load(text)).items()
        for match in re.findall(r"python -m model_service\.cli\s+(\S+)", script)
    }
    problems = [f"{name}: unknown CLI subcommand {sub!r}" for name, sub in sorted(used) if sub not in CLI_SUBCOMMANDS]
    missing = CLI_SUBCOMMANDS - {sub for _, sub in used}
    if missing:
        problems.append(f"the pipeline never runs {sorted(missing)}")
    return problems


def ci_secrets(text: str) -> Problems:
    """The MLflow token stays in the environment: no script expands it or dumps the environment."""
    doc = yaml.safe_load(text)
    problems: Problems = []
    for name, script in _all_scripts(doc).items():
        if re.search(r"\$\{?MLFLOW_TRACKING_TOKEN\b", script):
            problems.append(f"{name}: expands $MLFLOW_TRACKING_TOKEN (the CLI reads it from the environment)")
        if re.search(r"\bset -[a-wyz]*x|set -o xtrace", script):
            problems.append(f"{name}: turns on shell tracing, which prints expanded secrets")
        if re.search(r"(^|[;&|]\s*)(env|printenv|export -p)\s*($|[;&|>])", script, re.M):
            problems.append(f"{name}: dumps the whole environment")
        for arg in re.findall(r"--build-arg\s+\"?(\w+)", script):
            if SECRET_NAME.search(arg):
                problems.append(f"{name}: passes {arg} as a build argument (it stays in the image metadata)")
    variables = {
        **(doc.get("variables") or {}),
        **{k: v for j in _jobs(doc).values() for k, v in (j.get("variables") or {}).items()},
    }
    if str(variables.get("CI_DEBUG_TRACE", "")).lower() == "true":
        problems.append("CI_DEBUG_TRACE is on: the job log would show every variable")
    if re.search(r"MLFLOW_TRACKING_TOKEN\s*:", text):
        problems.append("MLFLOW_TRACKING_TOKEN is set in the file; it belongs in masked CI/CD variables")
    return problems


def ci_image_reference(text: str) -> Problems:
    """One image reference per line, tagged with the model version and the commit, used by every step."""
    doc = yaml.safe_load(text)
    scripts = _all_scripts(doc)
    everything = "\n".join(scripts.values())
    refs = re.findall(r"^\s*IMAGE=\"?([^\"\s]+)", everything, re.M)
    if len(refs) != 1:
        return [f"expected one IMAGE=... assignment, found {refs}"]
    match = re.fullmatch(r"\$CI_REGISTRY_IMAGE/\$line:(?P<tag>.+)", refs[0])
    if not match:
        return [f"image {refs[0]!r} is not $CI_REGISTRY_IMAGE/$line:<tag>"]
    problems: Problems = []
    tag = match["tag"]
    if not re.search(r"\$\{?MODEL_VERSION\b", tag):
        problems.append(f"image tag {tag!r} does not include the model version")
    if not re.search(r"\$\{?CI_COMMIT_(SHORT_)?SHA\b", tag):
        problems.append(f"image tag {tag!r} does not include the commit")
    build = scripts.get("build", "")
    for step in ('--tag "$IMAGE"', 'docker push "$IMAGE"'):
        if step not in build:
            problems.append(f"build job does not run {step}")
    if not re.search(r"model_service\.cli render\b[^\n]*(\\\n[^\n]*)*--image \"\$IMAGE\"", everything):
        problems.append('manifests are not rendered with --image "$IMAGE"')
    return problems


def ci_build_args(text: str) -> Problems:
    """The build passes every argument the Dockerfile needs, and only arguments it declares."""
    build = _script(_jobs(yaml.safe_load(text)).get("build", {}))
    passed = set(re.findall(r"--build-arg\s+\"?(\w+)=", build))
    declared = {name for stage in _stages(DOCKERFILE.read_text()) for name in _declared(stage, "ARG")}
    problems = [
        f"build passes --build-arg {name}, which the Dockerfile does not declare" for name in sorted(passed - declared)
    ]
    problems += [f"build does not pass --build-arg {name}" for name in sorted(IMAGE_BUILD_ARGS - passed)]
    if not re.search(r"IMAGE_BUILT_AT=\"?\$\(date -u \+%Y-%m-%dT%H:%M:%SZ\)", build):
        problems.append("IMAGE_BUILT_AT is not the UTC build time")
    if not re.search(r"CODE_REVISION=\"?\$CI_COMMIT_SHA\b", build):
        problems.append("CODE_REVISION is not $CI_COMMIT_SHA")
    return problems


def ci_pinned_images(text: str) -> Problems:
    """Job and service images are pinned to an exact version, never a moving tag."""
    doc = yaml.safe_load(text)
    blocks = {**{name: job for name, job in doc.items() if isinstance(job, dict)}, "<top level>": doc}
    problems: Problems = []
    for name, block in blocks.items():
        images = [_image_name(block.get("image"))] if block.get("image") else []
        images += [_image_name(service) for service in block.get("services") or []]
        problems += [
            f"{name}: image {image!r} is not pinned to x.y.z" for image in images if not EXACT_TAG.match(image)
        ]
    return problems


CI_RULES: dict[str, Callable[[str], Problems]] = {
    "stages": ci_stages,
    "needs": ci_needs,
    "environments": ci_environments,
    "deploy_jobs": ci_deploy_jobs,
    "production_gate": ci_production_gate,
    "default_branch": ci_default_branch,
    "functional_tests": ci_functional_tests,
    "cli": ci_cli,
    "secrets": ci_secrets,
    "image_reference": ci_image_reference,
    "build_args": ci_build_args,
    "pinned_images": ci_pinned_images,
}


# --------------------------------------------------------------------------------------------------
# Dockerfile helpers and rules
# --------------------------------------------------------------------------------------------------
Instruction = dict[str, Any]


def _stages(text: str) -> list[list[Instruction]]:
    """The instructions of each build stage, FROM first (global ARGs before the first FROM dropped)."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[list[Instruction]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages and instruction["instruction"] != "COMMENT":
            stages[-1].append(instruction)
    return stages


def _base_images(text: str) -> list[str]:
    return DockerfileParser(fileobj=io.BytesIO(text.encode())).parent_images


def _all(stage: list[Instruction], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def _last(stage: list[Instruction], name: str) -> str | None:
    values = _all(stage, name)
    return values[-1] if values else None


def _declared(stage: list[Instruction], name: str) -> dict[str, str]:
    """Names set by ARG or ENV in a stage -> their raw values (``KEY=value`` and legacy ``KEY value``)."""
    found: dict[str, str] = {}
    for value in _all(stage, name):
        parts = shlex.split(value)
        if name == "ENV" and parts and "=" not in parts[0]:
            found[parts[0]] = " ".join(parts[1:])
            continue
        for part in parts:
            key, _, val = part.partition("=")
            found[key] = val
    return found


def _labels(stage: list[Instruction]) -> dict[str, str]:
    return {k: v for value in _all(stage, "LABEL") for k, _, v in (p.partition("=") for p in shlex.split(value))}


def _copies(stage: list[Instruction]) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of each COPY/ADD."""
    result = []
    for i in stage:
        if i["instruction"] in ("COPY", "ADD"):
            parts = shlex.split(i["value"])
            flags = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            result.append((flags, paths[:-1], paths[-1] if paths else ""))
    return result


def docker_stages(text: str) -> Problems:
    """A builder and a runtime stage on one base pinned to an exact Python patch release."""
    stages = _stages(text)
    problems = [] if len(stages) >= 2 else [f"{len(stages)} FROM stage(s): build tools would ship in the image"]
    bases = _base_images(text)
    for base in bases:
        match = re.fullmatch(r"python:(?P<version>\d+\.\d+\.\d+)[-\w.]*(@sha256:[0-9a-f]{64})?", base)
        if not match:
            problems.append(f"base image {base!r} is not python:<x.y.z>[-variant]: pin the patch release")
        elif not match["version"].startswith("3.11."):
            problems.append(f"base image {base!r} is not Python 3.11 (the project's and the models' Python)")
    if len(set(bases)) > 1:
        problems.append(f"stages use different bases {bases}: the venv only runs on the Python it was built with")
    if stages and not any(
        "--from=builder" in flags and dest.rstrip("/") == "/opt/venv" for flags, _, dest in _copies(stages[-1])
    ):
        problems.append("the runtime stage does not COPY --from=builder the venv /opt/venv")
    return problems


def docker_non_root(text: str) -> Problems:
    stages = _stages(text)
    user = _last(stages[-1], "USER") if stages else None
    if not user:
        return ["the runtime stage has no USER: the service would run as root"]
    uid = user.split(":")[0]
    if uid in ("0", "root"):
        return [f"USER {user} is root"]
    if uid != str(APP_UID):
        return [f"USER {user}: expected the numeric uid {APP_UID} (runAsNonRoot can only verify a number)"]
    return []


def docker_serving(text: str) -> Problems:
    """Port 8080, a /ready health check without curl, uvicorn in exec form with a graceful shutdown."""
    stages = _stages(text)
    final = stages[-1] if stages else []
    problems: Problems = []
    if SERVICE_PORT not in " ".join(_all(final, "EXPOSE")).split():
        problems.append(f"EXPOSE {SERVICE_PORT} missing")
    health = _last(final, "HEALTHCHECK") or ""
    if not re.search(rf"http://(127\.0\.0\.1|localhost):{SERVICE_PORT}/ready\b", health):
        problems.append(f"HEALTHCHECK does not probe /ready on port {SERVICE_PORT}: {health!r}")
    if re.search(r"\b(curl|wget)\b", health):
        problems.append("HEALTHCHECK uses curl/wget, which the slim image lacks")
    if _all(final, "ENTRYPOINT"):
        problems.append("ENTRYPOINT set: CMD alone must start uvicorn")
    try:
        cmd = json.loads(_last(final, "CMD") or "")
    except json.JSONDecodeError:
        return [*problems, "CMD is not exec form (JSON): a shell would receive SIGTERM, not uvicorn"]
    if not isinstance(cmd, list) or cmd[:2] != ["uvicorn", "model_service.app:app"]:
        problems.append(f"CMD {cmd} does not run `uvicorn model_service.app:app`")
        return problems
    if flag_value(cmd, "--host") != "0.0.0.0" or flag_value(cmd, "--port") != SERVICE_PORT:
        problems.append(f"CMD does not listen on 0.0.0.0:{SERVICE_PORT}: {cmd}")
    if not (flag_value(cmd, "--timeout-graceful-shutdown") or "").isdigit():
        problems.append(f"CMD has no --timeout-graceful-shutdown <seconds>: {cmd}")
    return problems


def docker_model_package(text: str) -> Problems:
    """The package goes to /opt/model, root-owned; the env names it and the pin; requirements installed."""
    stages = _stages(text)
    if len(stages) < 2:
        return ["no separate builder stage"]
    builder, final = stages[0], stages[-1]
    problems: Problems = []
    copies = [c for c in _copies(final) if c[2].rstrip("/") == MODEL_DIR]
    if not any(any("${MODEL_PACKAGE}" in src for src in sources) for _, sources, _ in copies):
        problems.append(f"the model package ${{MODEL_PACKAGE}} is not copied to {MODEL_DIR}")
    flags = [flag for flags, _, _ in copies for flag in flags]
    if any(flag.startswith("--chown") or (flag.startswith("--chmod") and "w" in flag) for flag in flags):
        problems.append(f"{MODEL_DIR} is copied with --chown or a writable --chmod: the service could change it")
    if "--chmod=a=rX" not in flags:
        # a runner's umask 0000 (GitLab's Docker executor) leaves checked-out files world-writable
        problems.append(f"{MODEL_DIR} is not copied --chmod=a=rX: files keep the build context's write bits")
    env = _declared(final, "ENV")
    if env.get("MODEL_DIR") != MODEL_DIR:
        problems.append(f"ENV MODEL_DIR={env.get('MODEL_DIR')!r}, expected {MODEL_DIR}")
    args = _declared(final, "ARG")
    for name in sorted(IMAGE_BUILD_ARGS - {"MODEL_PACKAGE"}):
        if name not in args or env.get(name) != f"${{{name}}}":
            problems.append(f"the runtime stage does not turn ARG {name} into ENV {name}=${{{name}}}")
    installs = " ".join(_all(builder, "RUN"))
    if "--no-cache-dir" not in installs or not re.search(r"pip install\b.*-r .*-r ", installs):
        problems.append("the builder does not pip install --no-cache-dir both requirement files")
    sources = {src for _, sources, _ in _copies(builder) for src in sources}
    for wanted in ("requirements.txt", "${MODEL_PACKAGE}/model/requirements.txt"):
        if wanted not in sources:
            problems.append(f"the builder does not copy {wanted} to install it")
    return problems


def docker_runtime_env(text: str) -> Problems:
    stages = _stages(text)
    env = _declared(stages[-1], "ENV") if stages else {}
    wanted = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return [f"ENV {k}={env.get(k)!r}, expected {v!r}" for k, v in wanted.items() if env.get(k) != v]


def docker_labels(text: str) -> Problems:
    """OCI labels say which commit, when and from where; plus the model line and version."""
    stages = _stages(text)
    labels = _labels(stages[-1]) if stages else {}
    wanted = {
        "org.opencontainers.image.revision": "${CODE_REVISION}",
        "org.opencontainers.image.created": "${IMAGE_BUILT_AT}",
        "org.opencontainers.image.source": "${SOURCE_URL}",
    }
    problems = [f"LABEL {k}={labels.get(k)!r}, expected {v!r}" for k, v in wanted.items() if labels.get(k) != v]
    for what in ("MODEL_LINE", "MODEL_VERSION"):
        if not any(f"${{{what}}}" == value for value in labels.values()):
            problems.append(f"no label carries ${{{what}}}")
    return problems


def docker_no_secrets(text: str) -> Problems:
    """No ARG or ENV looks like a secret: both stay readable in the image's history."""
    everything = DockerfileParser(fileobj=io.BytesIO(text.encode())).structure  # global ARGs included
    return [
        f"{kind} {name} looks like a secret"
        for kind in ("ARG", "ENV")
        for name in _declared(everything, kind)
        if SECRET_NAME.search(name)
    ]


DOCKER_RULES: dict[str, Callable[[str], Problems]] = {
    "stages": docker_stages,
    "non_root": docker_non_root,
    "serving": docker_serving,
    "model_package": docker_model_package,
    "runtime_env": docker_runtime_env,
    "labels": docker_labels,
    "no_secrets": docker_no_secrets,
}


# --------------------------------------------------------------------------------------------------
# .dockerignore helpers and rules
# --------------------------------------------------------------------------------------------------
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay within one path element, `**` spans any number."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(text: str, path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _ignore_regex(line.lstrip("!").strip().strip("/"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            result = not negate
    return result


def dockerignore_excludes(text: str) -> Problems:
    """No git history, tests, CI config or local secrets reach the build context."""
    paths = [".git", ".git/config", "tests", "tests/test_service.py", ".gitlab-ci.yml", ".env", ".cache/pip/x"]
    return [f"{path} is sent to the build context" for path in paths if not ignored(text, path)]


def dockerignore_keeps(text: str) -> Problems:
    """What the image is made of stays in the context, as do the files the Dockerfile COPYs."""
    paths = [
        "requirements.txt",
        "model_service/__init__.py",
        "model_service/app.py",
        f"{EXAMPLE_PACKAGE}/package.json",
        f"{EXAMPLE_PACKAGE}/golden_set.json",
        f"{EXAMPLE_PACKAGE}/model/MLmodel",
        f"{EXAMPLE_PACKAGE}/model/requirements.txt",
    ]
    for stage in _stages(DOCKERFILE.read_text()):
        for flags, sources, _ in _copies(stage):
            if not any(flag.startswith("--from") for flag in flags):
                paths += [src.replace("${MODEL_PACKAGE}", EXAMPLE_PACKAGE).rstrip("/") for src in sources]
    return [f"{path} is left out of the build context" for path in dict.fromkeys(paths) if ignored(text, path)]


DOCKERIGNORE_RULES: dict[str, Callable[[str], Problems]] = {
    "excludes": dockerignore_excludes,
    "keeps": dockerignore_keeps,
}

FILES: dict[str, tuple[Path, dict[str, Callable[[str], Problems]]]] = {
    "gitlab-ci": (GITLAB_CI, CI_RULES),
    "dockerfile": (DOCKERFILE, DOCKER_RULES),
    "dockerignore": (DOCKERIGNORE, DOCKERIGNORE_RULES),
}


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("file", "rule"), [(file, rule) for file, (_, rules) in FILES.items() for rule in rules], ids=lambda v: v
)
def test_file_follows_rule(file: str, rule: str) -> None:
    path, rules = FILES[file]
    assert rules[rule](path.read_text()) == []


def test_deploy_jobs_follow_the_lifecycle_environments() -> None:
    """Spelled out: deploy:dev -> deploy:staging -> smoke -> deploy:production, as the lifecycle waits for them."""
    doc = yaml.safe_load(GITLAB_CI.read_text())
    assert [name for name, _ in _deploy_jobs(doc)] == [f"deploy:{env}" for env in _environments()]
    assert _environments() == ["dev", "staging", "production"]


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    """The matcher the .dockerignore rules rely on: last match wins, parents count, `*` stays in one element."""
    text = "*\n!keep/\nkeep/**/*.pyc\nsub/*.txt\n"
    assert ignored(text, ".git/config")
    assert not ignored(text, "keep/a/b.py")
    assert ignored(text, "keep/a/b.pyc")
    assert ignored(text, "keep/b.pyc")
    assert not ignored("sub/*.txt\n", "sub/deeper/a.txt")


# (file, rule, old text in the real file, replacement): each must make that rule complain.
_DEV_ENV = "  environment:\n    name: dev\n    deployment_tier: development\n"
_SMOKE_NEEDS = '  needs: [package, "deploy:staging"]\n'
MUTATIONS = [
    ("gitlab-ci", "stages", "  - deploy-staging\n  - pre-production\n", "  - pre-production\n  - deploy-staging\n"),
    ("gitlab-ci", "stages", "  stage: deploy-production\n", "  stage: deploy-prod\n"),
    ("gitlab-ci", "needs", 'needs: [package, "smoke:staging"]', 'needs: [package, "smoke-staging"]'),
    ("gitlab-ci", "needs", "  needs: [package, test]\n", '  needs: [package, test, "deploy:dev"]\n'),
    ("gitlab-ci", "environments", "    name: staging\n", "    name: stage\n"),
    ("gitlab-ci", "environments", _DEV_ENV, "  environment:\n    name: dev\n    deployment_tier: testing\n"),
    ("gitlab-ci", "environments", "  stage: deploy-dev\n", "  stage: deploy-staging\n"),
    ("gitlab-ci", "environments", 'DEPLOY_ENVIRONMENTS: "dev staging production"', 'DEPLOY_ENVIRONMENTS: "dev"'),
    ("gitlab-ci", "deploy_jobs", "  resource_group: staging\n", "  resource_group: deploy\n"),
    (
        "gitlab-ci",
        "deploy_jobs",
        "  interruptible: false\n  rules: *on-default-branch\n  # Each",
        "  rules: *on-default-branch\n  # Each",
    ),
    ("gitlab-ci", "deploy_jobs", '-f "build/k8s/$CI_ENVIRONMENT_NAME/"', '-f "build/k8s/"'),
    ("gitlab-ci", "deploy_jobs", "--timeout=10m\n", "\n"),
    ("gitlab-ci", "deploy_jobs", "KUBE_NAMESPACE: models-production", "KUBE_NAMESPACE: models"),
    ("gitlab-ci", "production_gate", "    deployment_tier: production\n", "    deployment_tier: staging\n"),
    ("gitlab-ci", "production_gate", 'needs: [package, "smoke:staging"]', 'needs: [package, "deploy:staging"]'),
    ("gitlab-ci", "production_gate", _SMOKE_NEEDS, '  needs: [package, "deploy:dev"]\n'),
    ("gitlab-ci", "production_gate", "cli smoke --url", "cli render --url"),
    (
        "gitlab-ci",
        "production_gate",
        "KUBE_NAMESPACE: models-staging\n  script:",
        "KUBE_NAMESPACE: models-dev\n  script:",
    ),
    (
        "gitlab-ci",
        "default_branch",
        "  needs: [package, test]\n  rules: *on-default-branch\n",
        "  needs: [package, test]\n",
    ),
    ("gitlab-ci", "default_branch", '    - if: $CI_PIPELINE_SOURCE == "merge_request_event"\n', ""),
    (
        "gitlab-ci",
        "default_branch",
        "  stage: test\n  needs: [package]\n",
        "  stage: test\n  needs: [package]\n  rules: *on-default-branch\n",
    ),
    ("gitlab-ci", "functional_tests", 'MODEL_DIR="build/$line" python -m pytest', "python -m pytest"),
    ("gitlab-ci", "functional_tests", ' -r "build/$line/model/requirements.txt"', ""),
    ("gitlab-ci", "functional_tests", "  needs: [package, test]\n", "  needs: [package]\n"),
    ("gitlab-ci", "cli", "python -m model_service.cli smoke", "python -m model_service.cli smoke-test"),
    ("gitlab-ci", "cli", "python -m model_service.cli lines --all", "python -m model_service.cli list --all"),
    (
        "gitlab-ci",
        "secrets",
        "    - mkdir -p build/images\n",
        '    - echo "$MLFLOW_TRACKING_TOKEN"\n    - mkdir -p build/images\n',
    ),
    ("gitlab-ci", "secrets", "    - mkdir -p build/images\n", "    - set -x\n    - mkdir -p build/images\n"),
    ("gitlab-ci", "secrets", "    - mkdir -p build/images\n", "    - env\n    - mkdir -p build/images\n"),
    ("gitlab-ci", "secrets", '--build-arg SOURCE_URL="$CI_PROJECT_URL"', '--build-arg MLFLOW_TRACKING_TOKEN="$T"'),
    ("gitlab-ci", "image_reference", ":v$MODEL_VERSION-$CI_COMMIT_SHORT_SHA", ":v$MODEL_VERSION"),
    ("gitlab-ci", "image_reference", ":v$MODEL_VERSION-$CI_COMMIT_SHORT_SHA", ":$CI_COMMIT_SHORT_SHA"),
    ("gitlab-ci", "image_reference", 'docker push "$IMAGE"', 'docker push "$CI_REGISTRY_IMAGE"'),
    ("gitlab-ci", "image_reference", '--image "$IMAGE"', '--image "$CI_REGISTRY_IMAGE/$line:latest"'),
    ("gitlab-ci", "build_args", '          --build-arg MODEL_VERSION="$MODEL_VERSION" \\\n', ""),
    ("gitlab-ci", "build_args", "--build-arg SOURCE_URL=", "--build-arg SOURCE_ADDRESS="),
    ("gitlab-ci", "build_args", 'IMAGE_BUILT_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"', 'IMAGE_BUILT_AT="$(date)"'),
    ("gitlab-ci", "pinned_images", "  image: docker:27.5.1\n", "  image: docker:27\n"),
    ("gitlab-ci", "pinned_images", "name: docker:27.5.1-dind", "name: docker:dind"),
    ("gitlab-ci", "pinned_images", "image: python:3.11.14-bookworm", "image: python:3.11"),
    ("gitlab-ci", "pinned_images", "name: alpine/k8s:1.33.4", "name: alpine/k8s:latest"),
    ("dockerfile", "stages", "FROM ${PYTHON_IMAGE} AS runtime\n", "FROM python:3.12.9-slim AS runtime\n"),
    ("dockerfile", "stages", "ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python:3.11-slim"),
    ("dockerfile", "stages", "ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python:latest"),
    ("dockerfile", "stages", "COPY --from=builder /opt/venv /opt/venv", "RUN python -m venv /opt/venv"),
    ("dockerfile", "non_root", "USER 10001:10001\n", ""),
    ("dockerfile", "non_root", "USER 10001:10001\n", "USER root\n"),
    ("dockerfile", "non_root", "USER 10001:10001\n", "USER app\n"),
    ("dockerfile", "serving", "EXPOSE 8080\n", "EXPOSE 8000\n"),
    ("dockerfile", "serving", "http://127.0.0.1:8080/ready", "http://127.0.0.1:8080/health"),
    ("dockerfile", "serving", '"--timeout-graceful-shutdown", "20", ', ""),
    (
        "dockerfile",
        "serving",
        'CMD ["uvicorn", "model_service.app:app", "--host"',
        'CMD ["uvicorn", "app:app", "--host"',
    ),
    (
        "dockerfile",
        "serving",
        'CMD ["uvicorn", "model_service.app:app", "--host", "0.0.0.0", "--port", "8080", \\\n'
        '     "--timeout-graceful-shutdown", "20", "--no-access-log"]',
        "CMD uvicorn model_service.app:app --host 0.0.0.0 --port 8080 --timeout-graceful-shutdown 20",
    ),
    (
        "dockerfile",
        "model_package",
        "COPY --chmod=a=rX ${MODEL_PACKAGE}/ /opt/model/",
        "COPY --chmod=a=rX ${MODEL_PACKAGE}/ /app/model/",
    ),
    ("dockerfile", "model_package", "COPY --chmod=a=rX ${MODEL_PACKAGE}/", "COPY --chmod=a=rwX ${MODEL_PACKAGE}/"),
    ("dockerfile", "model_package", "COPY --chmod=a=rX ${MODEL_PACKAGE}/", "COPY ${MODEL_PACKAGE}/"),
    (
        "dockerfile",
        "model_package",
        "COPY --chmod=a=rX ${MODEL_PACKAGE}/ /opt/model/",
        "COPY --chmod=a=rX --chown=10001 ${MODEL_PACKAGE}/ /opt/model/",
    ),
    ("dockerfile", "model_package", "    MODEL_DIR=/opt/model\n", "    MODEL_DIR=/srv/model\n"),
    ("dockerfile", "model_package", "    MODEL_VERSION=${MODEL_VERSION} \\\n", ""),
    ("dockerfile", "model_package", " -r /tmp/requirements/model.txt", ""),
    ("dockerfile", "runtime_env", "    OMP_NUM_THREADS=1 \\\n", ""),
    ("dockerfile", "runtime_env", "    PYTHONUNBUFFERED=1 \\\n", ""),
    (
        "dockerfile",
        "labels",
        'org.opencontainers.image.revision="${CODE_REVISION}"',
        'org.opencontainers.image.ref="x"',
    ),
    ("dockerfile", "labels", 'mlops-lifecycle.model-version="${MODEL_VERSION}"', 'mlops-lifecycle.v="3"'),
    ("dockerfile", "no_secrets", "ARG IMAGE_BUILT_AT\n", "ARG IMAGE_BUILT_AT\nARG MLFLOW_TRACKING_TOKEN\n"),
    ("dockerfile", "no_secrets", "ARG PYTHON_IMAGE=", "ARG PIP_INDEX_PASSWORD\nARG PYTHON_IMAGE="),
    ("dockerignore", "excludes", "\n*\n", "\n"),
    ("dockerignore", "excludes", "!requirements.txt\n", "!requirements.txt\n!tests/\n"),
    ("dockerignore", "keeps", "!model_service/\n", ""),
    ("dockerignore", "keeps", "!build/\n", "!build/*.txt\n"),
    ("dockerignore", "keeps", "build/k8s\n", "build/k8s\nbuild/**/requirements.txt\n"),
]


@pytest.mark.parametrize(
    ("file", "rule", "old", "new"), MUTATIONS, ids=[f"{m[0]}-{m[1]}-{i}" for i, m in enumerate(MUTATIONS)]
)
def test_each_rule_catches_its_mutation(file: str, rule: str, old: str, new: str) -> None:
    path, rules = FILES[file]
    text = path.read_text()
    assert text.count(old) == 1, f"mutation target not found exactly once in {path.name} (did it change?): {old!r}"
    mutated = text.replace(old, new)
    assert rules[rule](mutated), f"{file} rule {rule!r} did not notice: {old!r} -> {new!r}"


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def test_service_requirements_are_the_versions_the_tests_ran_with() -> None:
    """The image installs include/deployment/requirements.txt; this repository's tests ran the service on
    the root lock. A pin that drifts from the lock would ship a combination nobody tested."""
    service = _pins((DEPLOYMENT / "requirements.txt").read_text())
    lock = _pins((REPO / "requirements.txt").read_text())
    assert {"fastapi", "uvicorn", "prometheus-client", "pyyaml"} <= service.keys()
    assert {name: version for name, version in service.items() if lock.get(name) != version} == {}
