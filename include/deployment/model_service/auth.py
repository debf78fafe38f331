"""Optional bearer-token authentication of ``POST /predict`` (``MODEL_SERVICE_TOKEN``).

Only ``/predict`` takes it: the probes (``/health``, ``/ready``), the lifecycle's verify step
(``/version``) and the Prometheus scrape (``/metrics``) reveal no input and score nothing. The token
is checked before the body is read, so an unauthenticated client cannot make the service parse
anything, and it is compared as a SHA-256 digest with ``hmac.compare_digest``: the time taken says
nothing about the token, not even its length. Nothing here logs it.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException

REALM = "model-service"


class BearerAuth:
    """Requires ``Authorization: Bearer <token>``; a missing or wrong one is a 401 with ``WWW-Authenticate``."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def __repr__(self) -> str:
        return "BearerAuth(<token>)"

    def check(self, authorization: str | None) -> None:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise HTTPException(
                401,
                "/predict requires an 'Authorization: Bearer <token>' header",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        given = hashlib.sha256(credentials.strip().encode()).digest()
        if not hmac.compare_digest(given, self._digest):
            raise HTTPException(
                401,
                "the bearer token is not valid",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            )
