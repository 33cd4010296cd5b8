"""A clean drain on SIGTERM (or Ctrl+C) for `wildpdiff serve`:

1. The signal starts the drain. From then on every request but `/healthz` is answered 503 with
   `Connection: close` and Retry-After, `/readyz` included, so a load balancer stops sending and clients
   reconnect elsewhere; nothing new reaches the model.
2. Requests already inside the app run to their end, for at most `drain_grace_s`.
3. Then uvicorn closes the listener and the connections, the runtime stops its inference thread, and the
   process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response

log = logging.getLogger("app")

ALWAYS_ANSWERED = "/healthz"  # liveness: the process is alive while it drains


class Drain:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.started_at: float | None = None
        self.in_flight = 0  # requests inside the app, counted on the event loop

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def done(self) -> bool:
        """Draining and nothing left to wait for: no request in flight, or the grace period is over."""
        if self.started_at is None:
            return False
        return self.in_flight == 0 or time.monotonic() - self.started_at >= self.grace_s


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: int):
        self.app, self.drain, self.retry_after_s = app, drain, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] != ALWAYS_ANSWERED:
            headers = {"Connection": "close", "Retry-After": str(self.retry_after_s)}
            response = error_response(503, "server is shutting down: retry later or on another instance", headers)
            return await response(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown, and exit status 0 after a signal (uvicorn
    re-raises the signal once shut down, which makes the status 143 for SIGTERM)."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: set flags only, the event loop's tick acts on them.
        if self.drain.draining:
            self.should_exit = self.force_exit = True
        else:
            self.drain.start()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self._announced:
            self._announced = True
            log.info("draining: %d requests in flight, grace %.0f s", self.drain.in_flight, self.drain.grace_s)
        if self.drain.done():
            self.should_exit = True
        return await super().on_tick(counter)
