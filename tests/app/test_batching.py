"""Cross-request batching (app/batching.py): batches form from what queues up, and a request's answer is the
same bytes whichever requests shared its batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.batching import Batcher, Job
from app.budget import Deadline, DeadlineExceeded
from app.metrics import Metrics
from tests.app.conftest import image_bytes, serve

# Requests spread over methods, step counts, seeds and both backgrounds: several draw kinds in one batch.
ADAPTER_REQUESTS = [
    {"seed": 1, "steps": 5, "method": "generate"},
    {"seed": 2, "steps": 5, "method": "generate"},
    {"seed": 1, "steps": 3, "method": "generate"},
    {"seed": 4, "steps": 5, "method": "anchored"},
    {"seed": 5, "steps": 5, "method": "knn_blend"},
    {"seed": 6, "steps": 5},
]


def hold(batcher: Batcher) -> threading.Event:
    """Occupy the inference thread until the returned event is set, so that requests queue up behind it."""
    entered, release = threading.Event(), threading.Event()

    def block(payloads):
        entered.set()
        release.wait(timeout=60)
        return [None] * len(payloads)

    job = Job(None, block, None)
    threading.Thread(target=asyncio.run, args=(batcher.submit(job),), daemon=True).start()
    assert entered.wait(timeout=30)
    return release


def when_queued(runtime, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(runtime.batcher._jobs) < count:
        assert time.monotonic() < deadline, f"only {len(runtime.batcher._jobs)} of {count} requests reached the queue"
        time.sleep(0.01)


def batch_sizes(runtime, kind: str) -> tuple[float, float]:
    """(batches, requests) the inference thread ran for `kind`."""
    registry = runtime.metrics.registry
    labels = {"kind": kind}
    return (
        registry.get_sample_value("wildpdiff_batch_size_count", labels) or 0,
        registry.get_sample_value("wildpdiff_batch_size_sum", labels) or 0,
    )


def concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def adapter_call(http, backgrounds, i, form):
    return lambda: http.post("/adapters", files={"background": ("bg.png", backgrounds[i % 2])}, data=form)


def test_concurrent_adapters_are_the_bytes_each_gets_alone(make_app, backgrounds):
    alone = make_app(max_batch=1)
    with serve(alone) as url, httpx.Client(base_url=url, timeout=60) as http:
        expected = [adapter_call(http, backgrounds, i, form)() for i, form in enumerate(ADAPTER_REQUESTS)]
    assert all(r.status_code == 200 for r in expected), [r.text for r in expected]
    assert batch_sizes(alone.state.runtime, "adapters") == (len(ADAPTER_REQUESTS),) * 2  # one request per call

    batched = make_app(max_batch=32)
    runtime = batched.state.runtime
    with serve(batched) as url, httpx.Client(base_url=url, timeout=60) as http:
        release = hold(runtime.batcher)
        calls = [adapter_call(http, backgrounds, i, form) for i, form in enumerate(ADAPTER_REQUESTS)]
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            when_queued(runtime, len(calls))
            release.set()
            answers = [f.result() for f in futures]
    assert batch_sizes(runtime, "adapters") == (1, len(ADAPTER_REQUESTS))  # all in ONE batch
    for form, got, want in zip(ADAPTER_REQUESTS, answers, expected, strict=True):
        assert got.status_code == 200, got.text
        assert got.content == want.content, form
        assert got.headers["X-Adapter-Id"] == want.headers["X-Adapter-Id"]
        assert got.headers["X-Method"] == want.headers["X-Method"]


def test_one_requests_error_leaves_its_batch_mates_alone(make_app, backgrounds):
    app = make_app()
    runtime = app.state.runtime
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        good = adapter_call(http, backgrounds, 0, {"seed": 9, "steps": 4, "method": "generate"})
        expected = good().content
        runtime.cache = type(runtime.cache)(runtime.cache.size, runtime.metrics)  # forget it: generate again
        magenta = image_bytes(color=(255, 0, 255), size=(32, 32))  # unlike every seen location
        reject = lambda: http.post(  # noqa: E731
            "/adapters", files={"background": ("m.png", magenta)}, data={"policy": "reject", "steps": 4}
        )
        release = hold(runtime.batcher)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(call) for call in (reject, good)]
            when_queued(runtime, 2)
            release.set()
            rejected, ok = [f.result() for f in futures]
    assert rejected.status_code == 422 and "out of distribution" in rejected.json()["error"]
    assert ok.status_code == 200 and ok.content == expected
    assert batch_sizes(runtime, "adapters") == (2, 3)  # the first alone, then both together


def test_classify_batches_never_mix_adapters(make_app, backgrounds, frames):
    """Frames of concurrent requests with the same adapter share the classifier's calls (across block
    boundaries: 5 + 8 + 8 frames); requests with other adapters, or none, never get their scores."""

    def adapter_ids(http):
        return [
            http.post("/adapters", files={"background": ("bg.png", b)}, data={"steps": 4, "method": "generate"})
            .raise_for_status()
            .headers["X-Adapter-Id"]
            for b in backgrounds
        ]

    def requests(http, ids):
        one, other = ids
        specs = [(one, frames[:5]), (other, frames), (one, frames), (None, frames[2:7]), (one, frames[::-1])]
        return [
            lambda adapter_id=adapter_id, chunk=chunk: http.post(
                "/classify",
                files=[("images", (f"{i}.png", f)) for i, f in enumerate(chunk)],
                data={} if adapter_id is None else {"adapter_id": adapter_id},
            )
            for adapter_id, chunk in specs
        ]

    alone = make_app(max_batch=1)
    with serve(alone) as url, httpx.Client(base_url=url, timeout=60) as http:
        expected = [call().json() for call in requests(http, adapter_ids(http))]

    batched = make_app(max_batch=32)
    runtime = batched.state.runtime
    with serve(batched) as url, httpx.Client(base_url=url, timeout=60) as http:
        calls = requests(http, adapter_ids(http))
        release = hold(runtime.batcher)
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            when_queued(runtime, len(calls))
            release.set()
            answers = [f.result() for f in futures]
    assert [a.json() for a in answers] == expected
    batches, requests_run = batch_sizes(runtime, "classify")
    assert requests_run == len(calls) and batches == 3  # adapter one (3 requests), adapter other, no adapter


# -----------------------------------------------------------------------------
# the batcher alone


@pytest.fixture
def batcher():
    admitted = {"n": 0}
    b = Batcher(max_batch=3, max_wait_s=0.0, admitted=lambda: admitted["n"], metrics=Metrics())
    yield b
    b.close()


def run_jobs(batcher: Batcher, jobs: list[Job]) -> list:
    async def main():
        return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)

    release = hold(batcher)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.extend(asyncio.run(main())))
    thread.start()
    while len(batcher._jobs) < len(jobs):
        time.sleep(0.005)
    release.set()
    thread.join(timeout=30)
    return outcome


def test_batches_group_by_key_in_order_up_to_max_batch(batcher):
    calls = []

    def run(payloads):
        calls.append(list(payloads))
        return [p * 10 for p in payloads]

    keys = ["a", "b", "a", None, "a", "a", None, "b"]
    outcome = run_jobs(batcher, [Job(key, run, i) for i, key in enumerate(keys)])
    assert outcome == [i * 10 for i in range(len(keys))]
    # oldest first; then every queued job of its key, at most 3 per call; None alone
    assert calls == [[0, 2, 4], [1, 7], [3], [5], [6]]


def test_a_failing_batch_fails_its_jobs_only_and_the_thread_lives_on(batcher):
    def broken(payloads):
        raise RuntimeError("bug")

    def error_for_odd(payloads):
        return [ValueError(p) if p % 2 else p for p in payloads]

    outcome = run_jobs(batcher, [Job("x", broken, 0), Job("y", error_for_odd, 1), Job("y", error_for_odd, 2)])
    assert isinstance(outcome[0], RuntimeError) and isinstance(outcome[1], ValueError) and outcome[2] == 2
    assert run_jobs(batcher, [Job("x", lambda p: p, 5)]) == [5]


def test_jobs_past_their_deadline_or_cancelled_never_run(batcher):
    ran = []

    def run(payloads):
        ran.extend(payloads)
        return list(payloads)

    expired = Job("k", run, "late", deadline=Deadline(0.0))
    cancelled = Job("k", run, "gone")
    cancelled.future.cancel()
    outcome = run_jobs(batcher, [expired, Job("k", run, "kept"), cancelled])
    assert isinstance(outcome[0], DeadlineExceeded) and outcome[1] == "kept"
    assert ran == ["kept"]


def test_close_cancels_what_is_queued():
    b = Batcher(max_batch=4, max_wait_s=0.0, admitted=lambda: 0, metrics=Metrics())
    release = hold(b)
    job = Job("k", lambda p: p, 1)
    with b._ready:
        b._jobs.append(job)
    closer = threading.Thread(target=b.close)
    closer.start()  # waits for the running (held) batch to finish
    while not b._closed:
        time.sleep(0.005)
    release.set()
    closer.join(timeout=30)
    assert job.future.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(b.submit(Job("k", lambda p: p, 2)))
