"""The stage contract holds: every backend the schema accepts has an operator filling its stage, and the
type checker (`make lint`) refuses an operator that reads past the contract.
"""

from __future__ import annotations

import typing
import uuid
from pathlib import Path

import pytest

from mlops_lifecycle import config as schema
from mlops_lifecycle import dag_factory
from mlops_lifecycle.deployment_repository import ADAPTERS
from mlops_lifecycle.operators.extract import ExtractOperator
from mlops_lifecycle.operators.train import TrainOperator

REPO = Path(__file__).resolve().parents[2]


def backend_values(union: object, tag: str) -> set[str]:
    """The values of a tagged union's discriminator, as the YAML schema accepts them."""
    members = typing.get_args(typing.get_args(union)[0])
    return {value for member in members for value in typing.get_args(member.model_fields[tag].annotation)}


def test_every_extract_and_train_backend_of_the_schema_has_an_operator_filling_its_stage() -> None:
    assert set(dag_factory.EXTRACT) == backend_values(schema.Extract, "warehouse")
    assert set(dag_factory.TRAIN) == backend_values(schema.Train, "backend")
    assert all(issubclass(op, ExtractOperator) for op in dag_factory.EXTRACT.values())
    assert all(issubclass(op, TrainOperator) for op in dag_factory.TRAIN.values())


def test_every_review_backend_has_a_repository_adapter_and_every_allowed_pair_a_builder() -> None:
    reviews = backend_values(schema.Review, "backend")
    deploys = backend_values(schema.Deploy, "backend")
    assert set(ADAPTERS) == reviews
    assert {r for r, _ in dag_factory.DELIVERY} == reviews
    assert {d for _, d in dag_factory.DELIVERY} == deploys


LEAKS = {
    "a call only the local git adapter has": (
        "from mlops_lifecycle.contract import MergingRepository\n"
        "def f(repo: MergingRepository) -> None:\n"
        "    repo.git('log')\n",
        '"MergingRepository" has no attribute "git"',
    ),
    "merging through a repository the lifecycle does not merge in (GitLab)": (
        "from mlops_lifecycle.contract import DeploymentRepository\n"
        "def f(repo: DeploymentRepository) -> None:\n"
        "    repo.merge('review/x/v1', 'm')\n",
        '"DeploymentRepository" has no attribute "merge"',
    ),
    "a field no stage promises": (
        "from mlops_lifecycle.contract import Candidate\ndef f(c: Candidate) -> str:\n    return c['pipeline_id']\n",
        '"Candidate" has no key "pipeline_id"',
    ),
    "a backend's config field read without narrowing to that backend": (
        "from mlops_lifecycle.config import ModelLineConfig\n"
        "def f(c: ModelLineConfig) -> int:\n"
        "    return c.deploy.port\n",
        '"DeployGitLabCI" of "DeployLocal | DeployGitLabCI" has no attribute "port"',
    ),
}


ACCEPTED = (
    "from mlops_lifecycle.config import DeployLocal, ModelLineConfig\n"
    "from mlops_lifecycle.contract import Candidate, Deployment, MergingRepository\n"
    "def f(repo: MergingRepository, c: Candidate, d: Deployment, cfg: ModelLineConfig) -> str:\n"
    "    assert isinstance(cfg.deploy, DeployLocal)\n"
    "    return repo.merge('b', 'm') + c['run_id'] + str(d.get('pipeline_id')) + str(cfg.deploy.port)\n"
)


@pytest.fixture(scope="module")
def mypy_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """mypy's errors per snippet, with the project's configuration (as `make lint` runs it), in one run."""
    from mypy import api

    folder = tmp_path_factory.mktemp("contract_snippets")
    # Module names new to mypy's incremental cache (.mypy_cache): a snippet module it has seen before, with
    # the same text, is reported from the cache under its old path, which the filter below would drop.
    run = uuid.uuid4().hex[:12]
    files = {name: folder / f"snippet_{run}_{i}.py" for i, name in enumerate([*sorted(LEAKS), "accepted"])}
    for name, path in files.items():
        path.write_text(LEAKS[name][0] if name in LEAKS else ACCEPTED)
    out, err, _ = api.run(["--config-file", str(REPO / "pyproject.toml"), *map(str, files.values())])
    lines = (out + err).splitlines()
    return {name: "\n".join(line for line in lines if line.startswith(str(path))) for name, path in files.items()}


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_the_type_checker_refuses_code_that_reads_past_the_contract(leak: str, mypy_verdicts: dict[str, str]) -> None:
    assert LEAKS[leak][1] in mypy_verdicts[leak]


def test_the_type_checker_accepts_the_same_code_written_against_the_contract(mypy_verdicts: dict[str, str]) -> None:
    assert mypy_verdicts["accepted"] == ""
