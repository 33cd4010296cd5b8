"""Request body size limit, counted on the bytes that actually arrive.

Why not FastAPI's `max_body_size`: when the declared Content-Length is too large, Starlette swaps whatever
response the app sends for a plain-text 413, and our clients expect `{"error": ...}` on every refusal.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than the limit of {self.max_bytes} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, message)(scope, receive, send)  # refuse before reading anything

        received = 0

        async def counting_receive() -> Message:
            # Content-Length may be absent (chunked) or a lie: count what arrives.
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, message)  # FastAPI lets HTTPException through body parsing
            return msg

        await self.app(scope, counting_receive, send)
