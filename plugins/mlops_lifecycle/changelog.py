"""Changelog entries and the version pin file of the deployment repository. Plain functions.

An entry's first line is its identity (model line, version, event): writers skip an entry whose
heading is already in the file, so retries never duplicate it. Text that comes from outside (metric
names, usernames, paths) is escaped so it cannot break the markdown table or start a line with a
``/`` that GitLab would read as a quick action.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlops_lifecycle.gate import GateVerdict

URL_SAFE = ":/?#@!$&'*+,;=%-._~"
_QUICK_ACTION = re.compile(r"^(\s*)/", re.MULTILINE)


def md_text(value: object) -> str:
    """One-line markdown-safe text: no newlines, no table pipes, no leading quick-action slash."""
    text = " ".join(str(value).split())
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return _QUICK_ACTION.sub(r"\1\\/", text)


def md_code(value: object) -> str:
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{text}`"


def _link(label: str, url: str | None) -> str:
    from urllib.parse import quote

    from mlops_lifecycle.urls import without_userinfo

    # whitespace, parentheses and the like are percent-encoded so a URL cannot end the link or the line;
    # credentials in a URL (user:password@) are never written into a changelog or merge request
    return f"[{md_text(label)}]({quote(without_userinfo(url), safe=URL_SAFE)})" if url else md_code(label)


@dataclass(frozen=True)
class Proposal:
    """What a reviewer needs to decide on a candidate model version."""

    model_line: str
    model_name: str
    model_version: str
    run_id: str
    run_url: str | None
    run_key: str
    window_label: str
    holdout_start: str
    snapshot: str
    code_revision: str
    verdict: GateVerdict
    airflow_dag_id: str
    airflow_run_id: str
    airflow_url: str | None = None
    model_version_url: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def entry_heading(model_line: str, version: str, event: str) -> str:
    return f"## {md_text(model_line)} v{md_text(version)}: {event}"


def render_proposal(p: Proposal) -> str:
    """The staging entry: model, version, run, window, metrics against each gate rule."""
    return entry_heading(p.model_line, p.model_version, "proposed for production") + "\n\n" + _proposal_body(p)


def _proposal_body(p: Proposal) -> str:
    prod = f"v{md_text(p.verdict.production_version)}" if p.verdict.production_version else "none (first version)"
    lines = [
        f"- Registered model: {md_code(p.model_name)} {_link('version ' + p.model_version, p.model_version_url)}",
        f"- MLflow run: {_link(p.run_id, p.run_url)}",
        f"- Data window: {md_text(p.window_label)} (holdout from {md_text(p.holdout_start)}), "
        f"snapshot {md_code(p.snapshot)}",
        f"- Run key: {md_code(p.run_key)}",
        f"- Training code revision: {md_code(p.code_revision)}",
        f"- Current production: {prod}",
        f"- Airflow: dag {md_code(p.airflow_dag_id)}, run {_link(p.airflow_run_id, p.airflow_url)}",
        "",
        "| metric | rule | candidate | production | limit | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in p.verdict.results:
        value = "missing" if r.value is None else f"{r.value:.6g}"
        base = "-" if r.rule == "threshold" else ("none" if r.baseline is None else f"{r.baseline:.6g}")
        limit = "n/a" if r.limit is None else f"{r.limit:.6g}"
        verdict = ("pass" if r.passed else "**FAIL**") if r.applicable else "not applicable"
        lines.append(f"| {md_text(r.metric)} | {r.rule} | {value} | {base} | {limit} | {verdict} |")
    lines += ["", f"Gate: {md_text(p.verdict.summary())}", "", ""]
    return "\n".join(lines)


def render_merge_request(p: Proposal, reviewers: list[str], min_approvals: int) -> str:
    """The merge request description: the proposal, then what merging it does and who must approve."""
    who = ", ".join(md_text(r) for r in reviewers) or "the code owners"
    body = _proposal_body(p).strip()  # the MR title already says what the heading says
    return (
        f"{body}\n\n---\n\n"
        f"Merging deploys {md_code(p.model_name)} version {md_text(p.model_version)} through this repository's "
        f"pipeline to each environment in order; the lifecycle then checks that production serves it and moves "
        f"the MLflow production alias.\n\n"
        f"Needs {min_approvals} approval(s) from someone other than the author ({who}). Closing this merge "
        f"request stops the run and leaves the registry as it is.\n"
    )


def render_promotion(
    model_line: str,
    model_version: str,
    previous_version: str | None,
    approvers: list[str],
    approved_at: str,
    review_ref: str,
    merge_commit: str,
    deployments: Mapping[str, str],
    served_by: str,
    promoted_by: str,
    promoted_at: str,
) -> str:
    """The production entry: who approved, what was deployed where, what it replaced."""
    lines = [
        entry_heading(model_line, model_version, "promoted to production"),
        "",
        f"- Promoted at {md_text(promoted_at)} by {md_text(promoted_by)}",
        f"- Approved by {md_text(', '.join(approvers) or 'nobody')} at {md_text(approved_at)}",
        f"- Review {md_code(review_ref)}, merge commit {md_code(merge_commit)}",
        *[f"- Deployed to {md_text(env)}: {md_code(ref)}" for env, ref in deployments.items()],
        f"- Verified: {md_text(served_by)} reported version {md_text(model_version)}",
        f"- Previous production: v{previous_version} (kept as the rollback target)"
        if previous_version
        else "- Previous production: none (first production version)",
        "",
        "",
    ]
    return "\n".join(lines)


def render_pin(model_line: str, model_name: str, model_version: str, run_id: str) -> str:
    """The file that tells the deployment which model version a line serves."""
    return (
        "# Written by the lifecycle DAG; merged only after review.\n"
        f"model_line: {model_line}\n"
        f"model_name: {model_name}\n"
        f'model_version: "{model_version}"\n'
        f"run_id: {run_id}\n"
    )
