"""Optional API keys. With `WILDPDIFF_API_KEYS` (comma-separated) or `WILDPDIFF_API_KEYS_FILE` (one per line)
set, every route but the probes `/healthz` and `/readyz` needs `Authorization: Bearer <key>`; anything else is
a 401 with `WWW-Authenticate: Bearer`. Keys are compared in constant time and never logged or echoed (the
settings hold them as `SecretStr`). Without keys every route is open, as before: bind to localhost then.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response
from app.settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: orchestrators call them without credentials


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    """The configured keys (ValueError for a keys file that cannot be read or holds none)."""
    keys = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
    if settings.api_keys_file is not None:
        try:
            lines = settings.api_keys_file.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"api_keys_file: cannot read {settings.api_keys_file}: {e.strerror}") from None
        found = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"api_keys_file: {settings.api_keys_file} holds no keys (one per line)")
        keys += found
    return tuple(key.strip().encode() for key in keys if key.strip())


class ApiKeyMiddleware:
    """401 for a request without a valid bearer key, before its body is read."""

    def __init__(self, app: ASGIApp, keys: tuple[bytes, ...]):
        self.app, self.keys = app, keys

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # Compare with every key, never stopping early: the time does not tell which key nearly matched.
        matches = [hmac.compare_digest(given, key) for key in self.keys]
        return scheme.lower() == "bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("authorization", "")
        if self._authorized(header):
            return await self.app(scope, receive, send)
        challenge = 'Bearer realm="wildpdiff"' + (', error="invalid_token"' if header else "")
        message = "invalid API key" if header else "missing API key: send the header Authorization: Bearer <key>"
        await error_response(401, message, {"WWW-Authenticate": challenge})(scope, receive, send)
