"""The model service's configuration: environment variables read once at start-up, and its fixed limits.

A bad or missing variable is a ``StartupError`` naming it: the process exits instead of serving with
a guess. Only the standard library here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REQUIRED_ENV = ("MODEL_DIR", "MODEL_LINE", "MODEL_NAME", "MODEL_VERSION")
MAX_ROWS = 10_000  # rows in one request
MAX_BODY_BYTES = 32 * 1024 * 1024  # 10,000 wide rows fit; a bigger body is refused before it is held in memory


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
    max_batch_rows: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in REQUIRED_ENV if not env.get(name, "").strip()]
        if missing:
            raise StartupError(f"missing required environment variable(s): {', '.join(missing)}")
        version = env["MODEL_VERSION"].strip()
        if not version.isdigit():
            raise StartupError(f"MODEL_VERSION must be a registered version number like '3', got {version!r}")
        numbers = {}
        for name, default in (("MAX_BATCH_ROWS", 2 * MAX_ROWS), ("PREDICTION_LOG_MAX_MB", 512)):
            text = env.get(name, "").strip() or str(default)
            if not text.isdigit() or int(text) < 1:
                raise StartupError(f"{name} must be a positive integer, got {text!r}")
            numbers[name] = int(text)
        log_dir = env.get("PREDICTION_LOG_DIR", "").strip()
        return cls(
            model_dir=Path(env["MODEL_DIR"].strip()),
            model_line=env["MODEL_LINE"].strip(),
            model_name=env["MODEL_NAME"].strip(),
            model_version=version,
            code_revision=env.get("CODE_REVISION", "").strip() or None,
            image_built_at=env.get("IMAGE_BUILT_AT", "").strip() or None,
            prediction_log_dir=Path(log_dir) if log_dir else None,
            prediction_log_max_mb=numbers["PREDICTION_LOG_MAX_MB"],
            max_batch_rows=numbers["MAX_BATCH_ROWS"],
        )

    @property
    def pin(self) -> dict[str, str]:
        return {"model_line": self.model_line, "model_name": self.model_name, "model_version": self.model_version}
