"""Cross-request batching in front of the one inference thread (`app/runtime.py` says why one).

    batcher = Batcher(max_batch=32, max_wait_s=0.002, admitted=lambda: runtime.pending, metrics=metrics)
    result = await batcher.submit(Job(key=("classify", adapter_id), run=classify_many, payload=uploads), deadline)
    batcher.close()

Jobs with the same `key` that are waiting together run as ONE call, `run([payload, ...]) -> [outcome, ...]`
(an outcome is the result or the exception for that job alone), up to `max_batch` of them; a job with key None
always runs alone. The inference thread takes the oldest job, then every queued job with its key; while fewer
jobs are in hand than requests admitted (some are on their way from the event loop), it waits up to
`max_wait_s` for them. A lone client therefore never waits, and under load batches form from the queue that
builds up while the previous batch runs (continuous batching, as Triton's dynamic batcher and Ray Serve's
`@serve.batch` do with a size and a delay).

A job whose deadline passes while it waits is dropped when its batch forms; its client has had the 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.budget import Deadline, DeadlineExceeded
from app.metrics import Metrics


@dataclass(eq=False)
class Job:
    key: Hashable | None  # jobs of one key run together; None: alone
    run: Callable[[Sequence[Any]], Sequence[Any]]  # payloads -> one outcome (result or exception) per payload
    payload: Any
    kind: str = "other"  # the metrics label
    deadline: Deadline | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float, admitted: Callable[[], int], metrics: Metrics):
        self.max_batch, self.max_wait_s, self.admitted, self.metrics = max_batch, max_wait_s, admitted, metrics
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="wildpdiff-inference", daemon=True)
        self._thread.start()

    async def submit(self, job: Job) -> Any:
        """Queue `job`, wait for its outcome; raises it if it is an exception."""
        with self._ready:
            if self._closed:
                raise RuntimeError("the inference thread is closed")
            self._jobs.append(job)
            self._ready.notify()
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        """Let the running batch finish, cancel the queued jobs, stop the thread."""
        with self._ready:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._ready.notify()
        self._thread.join()

    # --- the inference thread

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            live = []
            for job in batch:
                self.metrics.queue_wait.labels(job.kind).observe(started - job.queued_at)
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away (cancelled while queued)
                if job.deadline is not None and job.deadline.remaining() <= 0:
                    job.future.set_exception(DeadlineExceeded())
                    continue
                live.append(job)
            if not live:
                continue
            self.metrics.batch_size.labels(live[0].kind).observe(len(live))
            try:
                outcomes = live[0].run([job.payload for job in live])
            except BaseException as e:  # noqa: BLE001 - a bug in the batch function fails its jobs, not the thread
                outcomes = [e] * len(live)
            for job, outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            batch = [first]
            if first.key is None:
                return batch
            wait_until = time.monotonic() + self.max_wait_s
            while True:
                for job in [job for job in self._jobs if job.key == first.key][: self.max_batch - len(batch)]:
                    self._jobs.remove(job)
                    batch.append(job)
                remaining = wait_until - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0 or self._closed:
                    return batch
                if len(batch) + len(self._jobs) >= self.admitted():
                    return batch  # nobody else is on the way
                self._ready.wait(remaining)
