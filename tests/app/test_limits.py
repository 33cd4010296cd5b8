"""Bounded work per request (app/budget.py): budgets refused up front naming the limit, a deadline that answers
503 and frees the inference thread."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.settings import Settings
from tests.app.conftest import image_bytes, serve
from tests.app.test_images import png_header_only

SMALL = image_bytes(size=(40, 40))  # 1,600 pixels


def refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert all(word in error for word in words), error
    return error


@pytest.fixture(scope="module")
def limited(make_app):
    app = make_app(max_request_pixels=5000, max_steps=20, max_refine_work=10)
    with TestClient(app) as client:
        yield client


def test_pixel_budget_counts_every_image_of_the_request(limited, frames):
    images = [("images", (f"{i}.png", SMALL)) for i in range(4)]
    assert limited.post("/classify", files=images[:3]).status_code == 200  # 4,800 pixels
    refused(limited.post("/classify", files=images), 413, "6400 pixels", "5000", "max_request_pixels")
    background = [("background", ("bg.png", SMALL))]
    refused(limited.post("/classify", files=images[:3] + background), 413, "max_request_pixels")
    shots = [("shots", (f"s{i}.png", SMALL)) for i in range(3)]
    refused(limited.post("/adapters", files=background + shots, data={"labels": ["empty"] * 3}), 413, "6400")
    unlabelled = [("frames", (f"f{i}.png", SMALL)) for i in range(3)]
    refused(limited.post("/adapters", files=background + unlabelled), 413, "6400")
    # Counted from the header: a 9 MP canvas with no pixel data is refused without decoding anything.
    refused(limited.post("/classify", files=[("images", ("big.png", png_header_only(3000, 3000)))]), 413, "9000000")


def test_an_uploaded_adapter_is_not_counted_as_an_image(limited):
    # Not an image at all: the budget skips it, the adapter check refuses it for what it is.
    files = [("images", ("a.png", SMALL)), ("adapter", ("a.safetensors", b"\0" * 100))]
    refused(limited.post("/classify", files=files), 422, "not a valid safetensors adapter")


def test_steps_and_refinement_budgets(limited, backgrounds, frames):
    background = {"background": ("bg.png", backgrounds[0])}
    assert limited.post("/adapters", files=background, data={"steps": "20"}).status_code == 200
    refused(limited.post("/adapters", files=background, data={"steps": "21"}), 422, "at most 20", "max_steps")
    refused(limited.post("/classify", files={**background, "images": ("x.png", SMALL)}, data={"steps": "21"}), 422)
    shots = [("shots", (f"s{i}.png", frame)) for i, frame in enumerate(frames[:2])]
    form = {"labels": ["empty", "empty"], "steps": "2"}
    files = [("background", ("bg.png", backgrounds[0])), *shots]
    assert limited.post("/adapters", files=files, data={**form, "refine_steps": "5"}).status_code == 200
    refused(
        limited.post("/adapters", files=files, data={**form, "refine_steps": "6"}),
        422,
        "2 shots x 6 refine_steps = 12",
        "max_refine_work",
    )


def test_default_steps_must_fit_max_steps(smoke_store):
    with pytest.raises(ValidationError, match="default_steps"):
        Settings(store=smoke_store, default_steps=50, max_steps=20, _env_file=None)


def test_deadline_answers_503_and_the_inference_thread_drops_the_late_work(make_app, monkeypatch, backgrounds):
    app = make_app(request_timeout_s=2.0)  # room for the requests that must succeed on busy shared cores
    runtime = app.state.runtime
    release, entered, answered = threading.Event(), threading.Event(), threading.Event()
    embed, decodes = runtime.generator.embed, []

    def stuck_embed(images):  # a model call that outlives its request's deadline
        entered.set()
        release.wait(timeout=30)
        return embed(images)

    def slow_decode(data, name, max_pixels):  # the first image decodes until its client has had the 503
        decodes.append(name)
        if len(decodes) == 1:
            answered.wait(timeout=30)
        return decode(data, name, max_pixels)

    from app import runtime as runtime_module

    decode = runtime_module.decode_image
    images = [("images", (f"{i}.png", SMALL)) for i in range(5)]
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        # 1. Images are decoded on the decode thread, checking the deadline before each one.
        monkeypatch.setattr(runtime_module, "decode_image", slow_decode)
        late = http.post("/classify", files=images)
        refused(late, 503, "deadline of 2 s", "request_timeout_s")
        assert int(late.headers["Retry-After"]) >= 1
        answered.set()
        assert http.post("/classify", files=images[:1]).status_code == 200  # runs after the late job has ended
        assert decodes == ["0.png", "0.png"]  # the late request stopped after its first image

        # 2. A request still queued for the inference thread when its deadline passes is never classified.
        runtime.generator.embed = stuck_embed
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(r=http.post("/adapters", files={"background": ("a.png", backgrounds[0])}))
        )
        thread.start()
        assert entered.wait(timeout=30)
        queued = http.post("/classify", files=images[1:2])  # waits in the batcher's queue behind the stuck job
        refused(queued, 503, "deadline")
        assert int(queued.headers["Retry-After"]) >= 1
        thread.join(timeout=30)
        refused(first["r"], 503, "deadline")
        release.set()
        runtime.generator.embed = embed
        assert http.post("/classify", files=images[2:3]).status_code == 200
        assert decodes == ["0.png", "0.png", "a.png", "1.png", "2.png"]  # decoding runs beside the stuck model
        classified = runtime.metrics.registry.get_sample_value("wildpdiff_batch_size_sum", {"kind": "classify"})
        assert classified == 2  # "0.png" and "2.png" alone: "1.png" waited past its deadline and was dropped
