"""The deployment repository's pipeline steps, as one command: ``python -m model_service.cli <step>``.

Run from the repository root by the GitLab CI jobs (and by the local deploy adapter, the same way):

- ``lines``    the model lines whose pin file changed in this push (all of them with ``--all``)
- ``package``  build the model package of a pin: the pinned version's artifacts, checked, with checksums
- ``render``   the Kubernetes manifests of one environment for a package and an image
- ``smoke``    pre-production check of a running service: ``/version`` is the package, ``/predict``
               reproduces the offline predictions of the golden set (sending ``MODEL_SERVICE_TOKEN``
               as its bearer token when that variable is set, as the service requires it then)

Every failure is one line on stderr naming what is wrong, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model_service.package import PackageError, Pin, build, golden_mismatches, open_package

PINS_DIR = Path("models")
NO_COMMIT = "0" * 40


class StepFailed(RuntimeError):
    pass


def changed_lines(base: str | None, head: str, pins_dir: Path = PINS_DIR) -> list[str]:
    """Lines whose pin file was added, changed or renamed between ``base`` and ``head`` (every pin without a base).

    A deleted pin deploys nothing and removes nothing: taking a line out of service is a deliberate
    ``kubectl delete`` (or a later rollback DAG), not a side effect of a merge.
    """
    if not base or base == NO_COMMIT:
        return sorted(path.stem for path in pins_dir.glob("*.yaml"))
    result = subprocess.run(
        ["git", "diff", "--name-only", "--diff-filter=AMR", base, head, "--", f"{pins_dir}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StepFailed(f"git diff {base[:12]}..{head[:12]} failed: {result.stderr.strip()}")
    return sorted(Path(name).stem for name in result.stdout.split() if name.endswith(".yaml"))


def smoke(url: str, package_dir: Path, code_revision: str | None, wait_seconds: float) -> str:
    """Compare a running service with the package; return a one-line summary or raise StepFailed."""
    package = open_package(package_dir)
    base = url.rstrip("/")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            _request(f"{base}/ready")
            break
        except StepFailed:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)
    answer = _request(f"{base}/version")
    pin = package.pin
    expected = asdict(pin)
    if code_revision:
        expected["code_revision"] = code_revision
    wrong = [f"{k} {answer.get(k)!r} (expected {v!r})" for k, v in expected.items() if str(answer.get(k)) != v]
    if wrong:
        raise StepFailed(f"{base}/version reports another deployment: " + ", ".join(wrong))
    golden = package.golden_set
    token = os.environ.get("MODEL_SERVICE_TOKEN", "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    served = _request(f"{base}/predict", {"rows": golden["rows"]}, headers).get("predictions")
    if not isinstance(served, list) or len(served) != len(golden["rows"]):
        count = len(served) if isinstance(served, list) else "no"
        raise StepFailed(f"{base}/predict answered {count} predictions for {len(golden['rows'])} golden rows")
    off = golden_mismatches(served, golden["predictions"])
    if off:
        raise StepFailed(f"{base}/predict differs from the offline predictions: " + "; ".join(off[:5]))
    return f"{base} serves {pin.label()}; {len(served)} golden rows match the offline predictions"


def _request(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StepFailed(f"{url}: HTTP {exc.code} {exc.read()[:300]!r}") from None
    except (OSError, ValueError) as exc:
        raise StepFailed(f"{url}: {type(exc).__name__}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_service.cli", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)

    lines = steps.add_parser("lines", help="model lines whose pin changed in this push")
    lines.add_argument("--all", action="store_true", help="every pinned line")
    base = os.environ.get("CI_MERGE_REQUEST_DIFF_BASE_SHA") or os.environ.get("CI_COMMIT_BEFORE_SHA")
    lines.add_argument("--base", default=base, help="compare with this commit (default: the CI push's parent)")
    lines.add_argument("--head", default=os.environ.get("CI_COMMIT_SHA", "HEAD"))

    package = steps.add_parser("package", help="download and check the pinned model version")
    package.add_argument("--pin", type=Path, required=True, help="models/<line>.yaml")
    package.add_argument("--out", type=Path, required=True, help="package directory to (re)create")

    render = steps.add_parser("render", help="Kubernetes manifests of one environment")
    render.add_argument("--package", type=Path, required=True)
    render.add_argument("--env", required=True)
    render.add_argument("--image", required=True)
    render.add_argument("--code-revision", default=os.environ.get("CI_COMMIT_SHA"))
    render.add_argument("--k8s-dir", type=Path, default=Path("k8s"))

    check = steps.add_parser("smoke", help="pre-production check of a running service against the package")
    check.add_argument("--url", required=True)
    check.add_argument("--package", type=Path, required=True)
    check.add_argument("--code-revision", default=None, help="also require this code revision in /version")
    check.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /ready")

    args = parser.parse_args(argv)
    try:
        if args.step == "lines":
            names = changed_lines(None if args.all else args.base, args.head)
            print("\n".join(names))
        elif args.step == "package":
            manifest = build(Pin.from_file(args.pin), args.out)
            print(
                f"packaged {manifest['model_line']}: {manifest['model_name']} v{manifest['model_version']} "
                f"(run {manifest['run_id']}) into {args.out}: {len(manifest['files'])} files, "
                f"golden set from {manifest['golden_set_source']}"
            )
        elif args.step == "render":
            from model_service.manifests import render as render_manifests
            from model_service.manifests import to_yaml

            docs = render_manifests(
                args.env,
                package=open_package(args.package).manifest,
                image=args.image,
                code_revision=args.code_revision,
                k8s_dir=args.k8s_dir,
            )
            sys.stdout.write(to_yaml(docs))
        else:
            print(smoke(args.url, args.package, args.code_revision, args.wait))
    except (PackageError, StepFailed, ValueError) as exc:
        print(f"{args.step}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
