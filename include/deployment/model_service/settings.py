"""The model service's configuration: environment variables read once at start-up, and its fixed limits.

A bad or missing variable is a ``StartupError`` naming it: the process exits instead of serving with
a guess. Only the standard library here.

Required: ``MODEL_DIR`` (the model package), ``MODEL_LINE``, ``MODEL_NAME``, ``MODEL_VERSION`` (the pin
the image was built for). Optional: ``CODE_REVISION``, ``IMAGE_BUILT_AT`` (reported by ``/version``);
``PREDICTION_LOG_DIR`` (unset: no prediction log), ``PREDICTION_LOG_MAX_MB`` (most disk every
``*.jsonl`` file under it may take together, 512 by default), ``PREDICTION_LOG_MAX_AGE_HOURS`` (files
last written longer ago are deleted; unset: no age limit); ``MAX_BATCH_ROWS`` (rows per model call);
``MODEL_SERVICE_TOKEN``: when set, ``POST /predict`` requires ``Authorization: Bearer <token>`` (at
least 16 characters of ``A-Z a-z 0-9 - . _ ~ + /``, ``=`` padding allowed; in Kubernetes it comes
from the optional Secret ``model-service-token``). The token is never logged nor shown in a repr.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_ENV = ("MODEL_DIR", "MODEL_LINE", "MODEL_NAME", "MODEL_VERSION")
MAX_ROWS = 10_000  # rows in one request
MAX_BODY_BYTES = 32 * 1024 * 1024  # 10,000 wide rows fit; a bigger body is refused before it is held in memory
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 token68: what an Authorization header can carry


class StartupError(RuntimeError):
    """The service cannot serve: bad configuration, a missing or wrong model package, a failing model."""


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    model_line: str
    model_name: str
    model_version: str
    code_revision: str | None
    image_built_at: str | None
    prediction_log_dir: Path | None
    prediction_log_max_mb: int
    prediction_log_max_age_hours: int | None
    max_batch_rows: int
    predict_token: str | None = field(repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in REQUIRED_ENV if not env.get(name, "").strip()]
        if missing:
            raise StartupError(f"missing required environment variable(s): {', '.join(missing)}")
        version = env["MODEL_VERSION"].strip()
        if not version.isdigit():
            raise StartupError(f"MODEL_VERSION must be a registered version number like '3', got {version!r}")
        log_dir = env.get("PREDICTION_LOG_DIR", "").strip()
        return cls(
            model_dir=Path(env["MODEL_DIR"].strip()),
            model_line=env["MODEL_LINE"].strip(),
            model_name=env["MODEL_NAME"].strip(),
            model_version=version,
            code_revision=env.get("CODE_REVISION", "").strip() or None,
            image_built_at=env.get("IMAGE_BUILT_AT", "").strip() or None,
            prediction_log_dir=Path(log_dir) if log_dir else None,
            prediction_log_max_mb=_positive_int(env, "PREDICTION_LOG_MAX_MB") or 512,
            prediction_log_max_age_hours=_positive_int(env, "PREDICTION_LOG_MAX_AGE_HOURS"),
            max_batch_rows=_positive_int(env, "MAX_BATCH_ROWS") or 2 * MAX_ROWS,
            predict_token=_predict_token(env),
        )

    @property
    def pin(self) -> dict[str, str]:
        return {"model_line": self.model_line, "model_name": self.model_name, "model_version": self.model_version}


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    """The variable as a positive integer, or None when it is unset or empty."""
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise StartupError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def _predict_token(env: Mapping[str, str]) -> str | None:
    """``MODEL_SERVICE_TOKEN`` without surrounding whitespace (a Secret made from a file often ends in a
    line break). Set but empty or weak is refused: it would leave ``/predict`` open, or nearly."""
    if "MODEL_SERVICE_TOKEN" not in env:
        return None
    token = env["MODEL_SERVICE_TOKEN"].strip()
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise StartupError(
            f"MODEL_SERVICE_TOKEN must be at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 - . _ ~ + / "
            f"(then '=' padding), e.g. from `openssl rand -hex 32`; the one given has {len(token)} characters"
        )
    return token
