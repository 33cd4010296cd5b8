"""End to end over real HTTP (uvicorn in a thread): the client, adapter isolation under concurrency, 429, load,
and a bug's 500 that leaves the connection open."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from urllib.parse import urlsplit

import httpx
import pytest

from app.client import WildPDiffClient, WildPDiffError
from model_store.lora import load_adapter_bytes
from tests.app.conftest import serve


@pytest.fixture(scope="module")
def server(make_app):
    with serve(make_app()) as url:
        yield url


def test_client_round_trip(server, backgrounds, frames, tmp_path):
    with WildPDiffClient(server) as client:
        adapter = client.generate_adapter(backgrounds[0], seed=3, steps=5)
        assert adapter.data[:8] and adapter.condition_distance >= 0
        assert client.generate_adapter(backgrounds[0], seed=3, steps=5).data == adapter.data
        path = tmp_path / "frame.png"
        path.write_bytes(frames[0])
        result = client.classify([path, frames[1]], adapter_id=adapter.id)
        assert result["adapter_id"] == adapter.id
        assert [p["file"] for p in result["predictions"]] == ["frame.png", "image1"]
        assert client.info()["classes"]
        with pytest.raises(WildPDiffError) as info:
            client.classify([frames[0]], adapter_id="f" * 32)
        assert info.value.status_code == 404


def test_client_sends_several_background_frames(server, smoke_world):
    location = json.loads((smoke_world / "tasks.json").read_text())["seen"][0]
    day_and_more = sorted((smoke_world / "backgrounds" / location).glob("*.png"))[1::2][:2]
    with WildPDiffClient(server) as client:
        several = client.generate_adapter(day_and_more, seed=1, steps=5)
        one = client.generate_adapter(day_and_more[0], seed=1, steps=5)
        by_background = client.classify([day_and_more[0]], background=day_and_more, seed=1, steps=5)
    _, metadata = load_adapter_bytes(several.data)
    assert metadata["background_frames"] == "2" and several.id != one.id
    assert by_background["adapter_id"] == several.id


def test_client_policy_and_few_shot(server, backgrounds, frames):
    with WildPDiffClient(server) as client:
        classes = client.info()["classes"]
        assert client.generate_adapter(backgrounds[0], steps=5, policy="generate").policy_applied == "generate"
        labels = [classes[0], classes[1]]
        adapted = client.generate_adapter(backgrounds[0], steps=5, shots=frames[:2], labels=labels, refine_steps=2)
        assert adapted.policy_applied == "fewshot"
        with pytest.raises(WildPDiffError) as info:
            client.generate_adapter(backgrounds[0], steps=5, shots=frames[:2], labels=["no-such-class", classes[0]])
        assert info.value.status_code == 422 and "unknown labels ['no-such-class']" in info.value.message


def test_concurrent_requests_never_mix_adapters(server, backgrounds, frames):
    with WildPDiffClient(server) as client:
        adapters = [client.generate_adapter(background, seed=0, steps=5).id for background in backgrounds]
        # The pretrained backbone (None) is a third "adapter"; each gives its own reference answer.
        choices = [*adapters, None]
        expected = {a: client.classify(frames, adapter_id=a)["predictions"] for a in choices}
    scores = {a: [p["top_k"] for p in expected[a]] for a in choices}
    assert scores[adapters[0]] != scores[adapters[1]] != scores[None]

    async def call(http: httpx.AsyncClient, adapter_id: str | None) -> tuple[str | None, list]:
        files = [("images", (f"image{i}", frame)) for i, frame in enumerate(frames)]
        data = {"adapter_id": adapter_id} if adapter_id else {}
        response = await http.post("/classify", files=files, data=data)
        response.raise_for_status()
        return adapter_id, response.json()["predictions"]

    async def many() -> list:
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            return await asyncio.gather(*(call(http, choices[i % 3]) for i in range(15)))

    for adapter_id, predictions in asyncio.run(many()):
        assert predictions == expected[adapter_id]


def test_full_queue_answers_429_with_retry_after(make_app, backgrounds):
    app = make_app(max_pending=1)
    runtime = app.state.runtime
    release, entered = threading.Event(), threading.Event()
    embed = runtime.generator.embed

    def blocking_embed(images):  # holds the only slot until the test says so
        entered.set()
        release.wait(timeout=30)
        return embed(images)

    runtime.generator.embed = blocking_embed
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(r=http.post("/adapters", files={"background": ("a.png", backgrounds[0])}))
        )
        thread.start()
        assert entered.wait(timeout=30)
        busy = http.post("/adapters", files={"background": ("b.png", backgrounds[1])})
        assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]
        assert http.get("/healthz").status_code == 200  # cheap routes are never queued
        release.set()
        thread.join(timeout=30)
        assert first["r"].status_code == 200
        assert http.post("/adapters", files={"background": ("b.png", backgrounds[1])}).status_code == 200


def test_32_clients_see_only_200_or_429(make_app, backgrounds, frames):
    """32 concurrent clients against the default queue of 16: every answer is a result or a polite refusal."""
    files = [("images", (f"image{i}", frame)) for i, frame in enumerate(frames[:4])]
    background = {"background": ("b.png", backgrounds[0])}

    async def client(http: httpx.AsyncClient, i: int) -> list[httpx.Response]:
        responses = []
        for j in range(3):
            if (i + j) % 2:
                responses.append(await http.post("/classify", files=files))
            else:  # a fresh seed each time: a generation, not a cache hit
                form = {"seed": str(100 * i + j), "steps": "5"}
                responses.append(await http.post("/adapters", files=background, data=form))
        return responses

    async def run(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return [r for rs in await asyncio.gather(*(client(http, i) for i in range(32))) for r in rs]

    with serve(make_app()) as url:
        responses = asyncio.run(run(url))
    assert len(responses) == 96
    unexpected = [r.text for r in responses if r.status_code not in (200, 429)]
    assert not unexpected
    assert any(r.status_code == 200 for r in responses)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)


def test_an_unexpected_error_answers_500_and_keeps_the_connection(make_app):
    app = make_app()

    def broken() -> dict:
        raise RuntimeError("a bug")

    app.state.runtime.info = broken
    with serve(app) as url:
        connection = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
        connection.request("GET", "/info")
        response = connection.getresponse()
        assert response.status == 500 and json.loads(response.read()) == {
            "error": "internal error; the server logged the details"
        }
        sock = connection.sock
        connection.request("GET", "/healthz")  # on the same connection: it was not dropped
        assert connection.getresponse().status == 200 and connection.sock is sock
        connection.close()
