"""Who may call a route: the API-key check, declared on each router that needs it."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from app.exceptions import AuthenticationError

KEY_HINT = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


async def require_api_key(request: Request) -> None:
    """Pass when no keys are configured or the request carries one of them (else 401)."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    offered = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not offered and auth[:7].lower() == "bearer ":
        offered = auth[7:].strip()
    if not offered:
        raise AuthenticationError(KEY_HINT)
    candidate = offered.encode("latin-1")  # the bytes as sent (headers decode as latin-1)
    # compare against every key so the time taken does not say which one nearly matched
    matches = [hmac.compare_digest(candidate, key) for key in keys]
    if not any(matches):
        raise AuthenticationError(KEY_HINT)


API_KEY_REQUIRED = Depends(require_api_key)
