"""The local deployment repository (real git): reviews, merges, appends; a conflict or an interrupted
writer never leaves it blocked, for this line or any other line sharing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops_lifecycle.changelog import render_pin
from mlops_lifecycle.deployment_repository import changelog_path, pin_path, review_branch
from mlops_lifecycle.deployment_repository.local_git import MAIN, LocalGitRepository
from mlops_lifecycle.exceptions import LifecycleDecision, MergeConflict


def propose(repo: LocalGitRepository, line: str, version: str) -> str:
    """Open the review of ``line`` v``version``; its branch."""
    branch = review_branch(line, version)
    repo.open_review(
        branch,
        replace={pin_path(line): render_pin(line, f"{line}_model", version, f"run{version}")},
        append={changelog_path(line): f"## {line} v{version}: proposed for production\n\n"},
        message=f"{line}: propose v{version}",
    )
    return branch


def is_clean_on_main(repo: LocalGitRepository) -> bool:
    return (
        repo.git("rev-parse", "--abbrev-ref", "HEAD") == MAIN
        and not repo.git("status", "--porcelain")
        and not (repo.path / ".git" / "MERGE_HEAD").exists()
    )


@pytest.fixture
def repo(tmp_path: Path) -> LocalGitRepository:
    return LocalGitRepository(tmp_path / "deploy-repo")


def test_review_merge_and_append_are_idempotent(repo: LocalGitRepository) -> None:
    branch = propose(repo, "line_a", "1")
    tip = repo.git("rev-parse", branch)
    propose(repo, "line_a", "1")
    assert repo.git("rev-parse", branch) == tip, "a retry finds the branch's commit instead of committing again"
    merge = repo.merge(branch, "Merge v1")
    assert repo.merge(branch, "Merge v1") == merge and repo.is_merged(branch)
    head = repo.append_on_main(changelog_path("line_a"), "## line_a v1: promoted\n\n", "promoted")
    assert repo.append_on_main(changelog_path("line_a"), "## line_a v1: promoted\n\n", "promoted") == head
    assert repo.read(MAIN, changelog_path("line_a")).count("## line_a v1: promoted") == 1
    assert 'model_version: "1"' in repo.read(MAIN, pin_path("line_a"))
    assert is_clean_on_main(repo)


def test_two_reviews_of_one_line_from_the_same_main_conflict_and_the_merge_is_aborted(
    repo: LocalGitRepository,
) -> None:
    first, second = propose(repo, "line_a", "1"), propose(repo, "line_a", "2")  # both branch from one main
    merged = repo.merge(first, "Merge v1")

    with pytest.raises(MergeConflict) as raised:
        repo.merge(second, "Merge v2")

    assert isinstance(raised.value, LifecycleDecision), "a conflict is not retried: retrying cannot resolve it"
    assert pin_path("line_a") in str(raised.value) and second in str(raised.value)
    assert is_clean_on_main(repo) and repo.git("rev-parse", MAIN) == merged, "main unchanged, nothing half-merged"
    assert not repo.is_merged(second)
    # every other line sharing the repository goes on as before
    other = propose(repo, "line_b", "1")
    repo.merge(other, "Merge line_b v1")
    repo.append_on_main(changelog_path("line_b"), "## line_b v1: promoted\n\n", "line_b promoted")
    assert 'model_version: "1"' in repo.read(MAIN, pin_path("line_b")) and is_clean_on_main(repo)


def test_a_writer_that_died_mid_merge_does_not_block_the_next_one(repo: LocalGitRepository) -> None:
    first, second = propose(repo, "line_a", "1"), propose(repo, "line_a", "2")
    repo.merge(first, "Merge v1")
    # a worker killed in the middle of a conflicting merge leaves conflict markers and MERGE_HEAD behind
    repo.git("merge", "--no-ff", "-m", "half", second, check=False)
    assert (repo.path / ".git" / "MERGE_HEAD").exists()

    branch = propose(repo, "line_b", "1")  # the next writer, on any line

    assert repo.merge(branch, "Merge line_b v1") and is_clean_on_main(repo)
    assert "<<<<<<<" not in (repo.path / pin_path("line_a")).read_text()
