"""The FastAPI application. `create_app` loads and verifies the store before anything is served, so a bad
store stops the server at start with a `StoreError` naming the file, never at the first request.

    uvicorn --factory app.main:create_app       # settings from WILDPDIFF_* environment variables
    wildpdiff serve --store model_store/demo    # the same, with a one-line error for a bad store
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.auth import ApiKeyMiddleware, load_keys
from app.drain import Drain, DrainMiddleware
from app.errors import UnexpectedErrorMiddleware, install_error_handlers
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.openapi import customize_openapi
from app.routes import router
from app.runtime import Runtime
from app.settings import Settings
from model_store.store import code_version


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keys = load_keys(settings)  # a bad keys file stops the server before the store is loaded
    metrics = Metrics()
    runtime = Runtime.load(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runtime.close()  # lets the running inference finish, drops the queued ones

    app = FastAPI(
        title="Wild-P-Diff",
        summary="LoRA adapters for a camera-trap classifier, generated from one background frame.",
        version=code_version(),
        lifespan=lifespan,
        # files: images or shots, backgrounds, an adapter; fields: one label per shot beside the scalar options
        form_limits={
            "max_files": settings.max_images + settings.max_backgrounds + settings.max_frames + 1,
            "max_fields": settings.max_images + 16,
        },
    )
    app.state.runtime = runtime
    app.state.drain = Drain(settings.drain_grace_s)
    # Added last = outermost. Metrics counts every answer, refusals and bugs included; keys are checked
    # before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    app.add_middleware(DrainMiddleware, drain=app.state.drain, retry_after_s=settings.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(UnexpectedErrorMiddleware)
    install_error_handlers(app)
    customize_openapi(app, api_keys=bool(keys))
    app.include_router(router)
    return app
