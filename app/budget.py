"""Bounded work per request: a budget checked before any model work, and a deadline the work itself checks.

Budget. The pixels of every image a request uploads (`images`, `background`, `shots`, `frames`: each file field
but `adapter`) are summed from the files' headers before the request is queued; over `max_request_pixels` is
a 413. Decoding is what large images cost (~1 s per 40 MP PNG on one core, however small the file), so this
bounds it where a count of images cannot. DDIM steps (`max_steps`) and few-shot refinement (`max_refine_work`
= shots x refine_steps) are refused with 422 by the runtime; counts of files have their own limits.

Deadline (`request_timeout_s`, counted from when the runtime takes the request, queue included). When it
passes, the event loop stops waiting and answers 503 with Retry-After; the batcher drops a job past it when its
batch forms and the decode thread checks it before each image, so work whose client has already been answered
is dropped.
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.errors import ApiError
from app.images import image_pixels

NOT_IMAGES = frozenset({"adapter"})  # file fields that hold something else than an image


class DeadlineExceeded(Exception):
    """Raised at a check (decode thread, batcher) after the request's deadline."""


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded


async def check_request_pixels(request: Request) -> None:
    """Route dependency: 413 when the request's images hold more pixels than `max_request_pixels`."""
    limit = request.app.state.runtime.settings.max_request_pixels
    form = await request.form()  # parsed already for the route's own fields: this is the cached form
    files = [value.file for key, value in form.multi_items() if isinstance(value, UploadFile) and key not in NOT_IMAGES]
    total = await run_in_threadpool(lambda: sum(image_pixels(file) for file in files))
    if total > limit:
        raise ApiError(
            413,
            f"the request's {len(files)} images hold {total} pixels, more than the limit of {limit} per request "
            f"(max_request_pixels); send fewer or smaller images (the model sees each at a few hundred pixels at most)",
        )
