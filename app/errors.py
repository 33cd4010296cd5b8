"""Every refusal is a 4xx with a JSON body `{"error": "..."}` that says what was wrong.

`ApiError` is what our own code raises; the handlers below also reshape FastAPI's and Starlette's own
refusals (validation errors, unknown routes, body too large), so clients parse one shape only. A bug answers 500
in the same shape (`UnexpectedErrorMiddleware`), and the client's connection stays open.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("app")


class ApiError(Exception):
    def __init__(
        self, status_code: int, message: str, headers: dict[str, str] | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers
        self.extra = extra or {}  # more fields beside "error" (e.g. the distance of a rejected background)


def error_response(
    status_code: int, message: str, headers: dict[str, str] | None = None, extra: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, **(extra or {})}, status_code=status_code, headers=headers)


def _describe(error: dict) -> str:
    """One pydantic error -> 'steps: Input should be less than or equal to 1000'."""
    where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query", "path", "header"))
    return f"{where}: {error['msg']}" if where else error["msg"]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers, exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "; ".join(_describe(e) for e in exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)


class UnexpectedErrorMiddleware:
    """A bug, not bad input: log it in full, answer 500 `{"error": ...}` without internals.

    Not an `exception_handler(Exception)`: Starlette runs that one in its outermost middleware, which re-raises
    after answering, and uvicorn then closes the client's keep-alive connection. Here the error ends."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise  # half an answer is out: only closing the connection can tell the client
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await error_response(500, "internal error; the server logged the details")(scope, receive, send)
