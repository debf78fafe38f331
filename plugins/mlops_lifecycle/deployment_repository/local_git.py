"""The deployment repository as a local git repository (``review.backend: local_git``, the embedded adapter).

A review is a branch with the changelog entry and the file pinning the model version; approval
merges it into ``main`` with a merge commit. Every operation is idempotent (a retry finds the branch,
the commit, the merge) and history is only ever appended to. A file lock serialises writers, since
several model lines share one deployment repository.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlops_lifecycle.exceptions import LifecycleError, MergeConflict

log = logging.getLogger(__name__)

MAIN = "main"
BOT_NAME = "Airflow lifecycle"
BOT_EMAIL = "lifecycle@airflow.local"


class LocalGitRepository:
    """Fills :class:`mlops_lifecycle.contract.MergingRepository`: the lifecycle merges approved reviews itself."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def location(self) -> str:
        return str(self.path)

    # plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def _env() -> dict[str, str]:
        return {
            **os.environ,
            "GIT_AUTHOR_NAME": BOT_NAME,
            "GIT_AUTHOR_EMAIL": BOT_EMAIL,
            "GIT_COMMITTER_NAME": BOT_NAME,
            "GIT_COMMITTER_EMAIL": BOT_EMAIL,
            "GIT_TERMINAL_PROMPT": "0",
        }

    def git(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["git", "-C", str(self.path), *args], env=self._env(), capture_output=True, text=True)
        if check and result.returncode != 0:
            raise LifecycleError(
                f"git {' '.join(args)} failed in {self.path}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout.strip()

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._ensure()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _ensure(self) -> None:
        if (self.path / ".git").is_dir():
            self._recover()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", MAIN)
        (self.path / "README.md").write_text(
            "# Deployment repository (local)\n\nStands for the GitLab deployment repository: `models/` pins the "
            "model version each line serves, `changelog/` records every proposal and promotion.\n"
        )
        self.git("add", "README.md")
        self.git("commit", "-q", "-m", "Initialise deployment repository")
        log.info("Initialised local deployment repository %s", self.path)

    def _recover(self) -> None:
        """Leave the repository clean on main if a writer died mid-operation (merge, checkout, commit).

        Runs under the lock, so no other writer is active: anything half-done is abandoned work. Several
        model lines share this repository, so one line's interrupted merge must not block the others.
        """
        if (self.path / ".git" / "MERGE_HEAD").exists():
            log.warning("Deployment repository %s has an unfinished merge: aborting it", self.path)
            self.git("merge", "--abort", check=False)
        if self.git("status", "--porcelain", "--untracked-files=no"):
            log.warning("Deployment repository %s has changes an interrupted writer left: discarding", self.path)
            self.git("reset", "-q", "--hard")
        if self.git("rev-parse", "--abbrev-ref", "HEAD") != MAIN:
            self.git("checkout", "-q", MAIN)

    def branch_exists(self, branch: str) -> bool:
        return bool(self.git("branch", "--list", branch))

    def read(self, ref: str, relpath: str) -> str | None:
        """File content at ``ref`` (None if absent)."""
        out = subprocess.run(["git", "-C", str(self.path), "show", f"{ref}:{relpath}"], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None

    def _commit_files(self, replace: Mapping[str, str], append: Mapping[str, str], message: str) -> str | None:
        """Write ``replace`` files and append ``append`` entries on the checked-out branch, in one commit.

        Returns the commit, or None if nothing changed. Appended entries are identified by their
        first (heading) line, so a retry that renders the same entry again, even with a later
        timestamp in its body, does not append it twice.
        """
        for relpath, content in [*replace.items(), *append.items()]:
            target = self.path / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if relpath in append and target.exists():
                existing = target.read_text()
                if content.splitlines()[0] in existing.splitlines():
                    continue  # already recorded
                content = existing + content
            target.write_text(content)
            self.git("add", relpath)
        if not self.git("status", "--porcelain"):
            return None
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    # review operations --------------------------------------------------------------------------
    def open_review(self, branch: str, replace: Mapping[str, str], append: Mapping[str, str], message: str) -> str:
        """Branch off main, write ``replace`` files and append ``append`` entries, commit. Idempotent."""
        with self.locked():
            if self.is_merged(branch):
                log.info("Branch %s is already merged into %s: nothing to open", branch, MAIN)
                return self.git("rev-parse", branch)
            if self.branch_exists(branch):
                self.git("checkout", "-q", branch)
                log.info("Branch %s exists: reusing it", branch)
            else:
                self.git("checkout", "-q", "-b", branch, MAIN)
                log.info("Created branch %s from %s", branch, MAIN)
            try:
                self._commit_files(replace, append, message)
                return self.git("rev-parse", "HEAD")
            finally:
                self.git("checkout", "-q", MAIN)

    def is_merged(self, branch: str) -> bool:
        if not self.branch_exists(branch):
            return False
        return (
            subprocess.run(["git", "-C", str(self.path), "merge-base", "--is-ancestor", branch, MAIN]).returncode == 0
        )

    def merge(self, branch: str, message: str) -> str:
        """Merge ``branch`` into main with a merge commit; a retry returns the existing merge commit."""
        with self.locked():
            if not self.branch_exists(branch):
                raise LifecycleError(f"Review branch {branch} does not exist in {self.path}")
            if self.is_merged(branch):
                sha = self.merge_commit_of(branch)
                log.info("Branch %s already merged into %s at %s", branch, MAIN, sha)
                return sha
            self.git("checkout", "-q", MAIN)
            merged = subprocess.run(
                ["git", "-C", str(self.path), "merge", "-q", "--no-ff", "-m", message, branch],
                env=self._env(),
                capture_output=True,
                text=True,
            )
            if merged.returncode != 0:
                conflicts = self.git("diff", "--name-only", "--diff-filter=U", check=False).split()
                self.git("merge", "--abort", check=False)
                raise MergeConflict(
                    f"Review branch {branch} cannot be merged into {MAIN} of {self.path}"
                    + (f": it conflicts in {', '.join(conflicts)}" if conflicts else f": {merged.stderr.strip()}")
                    + ". The merge was aborted and main is unchanged; another run of this line changed these "
                    "files since the review was opened. Not retried: re-run the lifecycle to propose against the "
                    "current main."
                )
            sha = self.git("rev-parse", "HEAD")
            log.info("Merged %s into %s: %s", branch, MAIN, sha)
            return sha

    def merge_commit_of(self, branch: str) -> str:
        """The first commit on main whose second parent is the branch tip."""
        tip = self.git("rev-parse", branch)
        for line in self.git("rev-list", "--merges", "--parents", MAIN).splitlines():
            sha, *parents = line.split()
            if tip in parents[1:]:
                return sha
        return tip  # fast-forwarded by someone else: the tip itself is on main

    def append_on_main(self, relpath: str, entry: str, message: str) -> str:
        """Append an entry to a file on main (skipped if the same entry is already there)."""
        with self.locked():
            self.git("checkout", "-q", MAIN)
            sha = self._commit_files({}, {relpath: entry}, message)
            return sha or self.git("rev-parse", "HEAD")

    def log_subjects(self, ref: str = MAIN, limit: int = 20) -> list[str]:
        return self.git("log", "--topo-order", f"-{limit}", "--format=%h %s", ref).splitlines()
