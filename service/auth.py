"""Bearer-key check shared by every protected route.

nv-ingest and the `openai` client send `Authorization: Bearer <key>`; LitServe's own key check
reads `X-API-Key`, which they never send, so we do our own.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import APIError
from service.routes import OPEN_PATHS  # probes and scrapers send no key (Kubernetes, Prometheus)


class BearerAuth:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    def check(self, request: Request) -> None:
        if not self._keys or request.url.path in OPEN_PATHS or request.method == "OPTIONS":
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            problem = "malformed Authorization header" if header.strip() else "missing API key"
            raise APIError(401, f"{problem}: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        presented = token.strip().encode()
        # Compare against every key, without stopping early, in constant time.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
