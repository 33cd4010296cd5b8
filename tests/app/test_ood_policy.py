"""Out-of-distribution policies and few-shot adapters over HTTP, on a copy of the smoke store whose calibrated
threshold is tiny: a training-half frame (distance ~0) is in distribution, a held-out frame is not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model_store.lora import load_adapter_bytes
from model_store.ood import load_fallback
from model_store.store import Store


@pytest.fixture(scope="module")
def strict_store(smoke_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("strict") / "store"
    shutil.copytree(smoke_store, root)
    store = Store(root)
    store.set_component("condition", {**store.manifest["components"]["condition"], "ood_threshold": 1e-3})
    return root


@pytest.fixture(scope="module")
def strict(strict_store):
    with TestClient(create_app(Settings(store=strict_store, default_steps=5, _env_file=None))) as client:
        yield client


@pytest.fixture(scope="module")
def location_frames(smoke_world):
    """(seen location, its training-half background, a held-out background, two of its labelled frames)."""
    location = json.loads((smoke_world / "tasks.json").read_text())["seen"][0]
    paths = sorted((smoke_world / "backgrounds" / location).glob("*.png"))
    frames = sorted((smoke_world / "images" / location).glob("*.png"))[:2]
    return location, paths[0].read_bytes(), paths[1].read_bytes(), [p.read_bytes() for p in frames]


def post(client, background: bytes, files=(), **fields):
    return client.post("/adapters", files=[("background", ("bg.png", background)), *files], data=fields)


def test_in_distribution_always_generates(strict, location_frames):
    _, train_frame, _, _ = location_frames
    for policy in ("generate", "fallback", "reject"):
        response = post(strict, train_frame, policy=policy)
        assert response.status_code == 200 and response.headers["X-In-Distribution"] == "true"
        assert response.headers["X-Policy-Applied"] == "generate"


def test_generate_policy_generates_out_of_distribution(strict, location_frames):
    response = post(strict, location_frames[2], policy="generate")
    assert response.status_code == 200 and response.headers["X-In-Distribution"] == "false"
    assert response.headers["X-Policy-Applied"] == "generate"


def test_fallback_serves_the_nearest_location_mean_adapter(strict, strict_store, location_frames):
    response = post(strict, location_frames[2])  # the default policy is fallback
    assert response.status_code == 200 and response.headers["X-Policy-Applied"] == "fallback-nearest"
    state, metadata = load_adapter_bytes(response.content)
    assert metadata["policy_applied"] == "fallback-nearest"
    runtime = strict.app.state.runtime
    expected = load_fallback(Store(strict_store))[runtime.generator.locations.index(metadata["nearest_location"])]
    assert torch.equal(torch.cat([state[k].flatten() for k in runtime.generator.shapes]), expected)


def test_fallback_without_stored_adapters_serves_the_base_model(strict_store, location_frames):
    with TestClient(create_app(Settings(store=strict_store, default_steps=5, _env_file=None))) as client:
        client.app.state.runtime.generator.location_means = None  # as a store fitted before they were stored
        response = post(client, location_frames[2], policy="fallback")
    assert response.status_code == 200 and response.headers["X-Policy-Applied"] == "fallback-base"
    state, metadata = load_adapter_bytes(response.content)
    assert metadata["policy_applied"] == "fallback-base" and all(not t.any() for t in state.values())


def test_reject_answers_422_with_the_distance(strict, location_frames, frames):
    response = post(strict, location_frames[2], policy="reject")
    assert response.status_code == 422
    body = response.json()
    assert "out of distribution" in body["error"] and body["distance"] > 1e-3
    classify = strict.post(
        "/classify",
        files=[("images", ("f.png", frames[0])), ("background", ("bg.png", location_frames[2]))],
        data={"policy": "reject"},
    )
    assert classify.status_code == 422 and "distance" in classify.json()


def test_reject_by_setting(strict_store, location_frames):
    settings = Settings(store=strict_store, default_steps=5, ood_policy="reject", _env_file=None)
    with TestClient(create_app(settings)) as client:
        assert post(client, location_frames[2]).status_code == 422
        assert client.get("/info").json()["ood_policy"] == "reject"


def test_fewshot_adapter(strict, location_frames):
    location, _, held_out, shots = location_frames
    classes = strict.get("/info").json()["classes"]
    files = [("shots", (f"s{i}.png", shot)) for i, shot in enumerate(shots)]
    response = post(strict, held_out, files, labels=[classes[1], classes[2]], policy="fallback")
    assert response.status_code == 200, response.text
    assert response.headers["X-Policy-Applied"] == "fewshot"
    _, metadata = load_adapter_bytes(response.content)
    assert metadata["fewshot_source"].split(":")[0] in {"generated", "nearest", "base"}
    assert int(metadata["fewshot_candidates"]) >= 2


@pytest.mark.parametrize(
    "labels, message",
    [(["empty"], "2 shot files but 1 labels"), (["empty", "unicorn"], "unknown labels ['unicorn']")],
)
def test_bad_shots_are_refused(strict, location_frames, labels, message):
    files = [("shots", (f"s{i}.png", shot)) for i, shot in enumerate(location_frames[3])]
    response = post(strict, location_frames[2], files, labels=labels)
    assert response.status_code == 422 and message in response.json()["error"]
