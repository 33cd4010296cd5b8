"""Unlabelled `frames` on POST /adapters: zero-label choice and adaptation over HTTP."""

from __future__ import annotations

import dataclasses

import safetensors.torch
from fastapi.testclient import TestClient

from app.runtime import Runtime
from model_store.inference import Region, ServingTable
from model_store.store import safetensors_metadata


def post(client, backgrounds, frames, **data):
    files = [("background", ("b.png", backgrounds[0], "image/png"))]
    files += [("frames", (f"f{i}.png", frame, "image/png")) for i, frame in enumerate(frames)]
    return client.post("/adapters", files=files, data=data)


def adapting_app(make_app):
    """An app whose serving table chooses and adapts on frames everywhere (the smoke store has no table)."""
    app = make_app()
    original = Runtime.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        region = Region("all", None, "generate", zerolabel_margin=0.0, zerolabel_steps=3)
        self.serving = dataclasses.replace(self.serving, regions=(region,))

    return app, init


def test_frames_are_used_and_said_so(make_app, backgrounds, frames, monkeypatch):
    app, init = adapting_app(make_app)
    monkeypatch.setattr(Runtime, "__init__", init)
    with TestClient(app) as client:
        first = post(client, backgrounds, frames)
        assert first.status_code == 200, first.text
        assert first.headers["X-Policy-Applied"] == "zerolabel"
        metadata = safetensors_metadata(first.content)
        assert metadata["zerolabel_frames"] == str(len(frames)) and metadata["policy_applied"] == "zerolabel"
        without = post(client, backgrounds, [])
        assert without.headers["X-Policy-Applied"] != "zerolabel"
        assert without.headers["X-Adapter-Id"] != first.headers["X-Adapter-Id"]
    with TestClient(app) as client:  # a fresh cache: computed again, the same bytes
        assert post(client, backgrounds, frames).content == first.content


def test_a_store_without_zero_label_settings_serves_the_default(client, backgrounds, frames):
    with_frames, without = post(client, backgrounds, frames), post(client, backgrounds, [])
    assert with_frames.headers["X-Policy-Applied"] == "zerolabel"
    assert not ServingTable.DEFAULT.regions[0].zerolabel(len(frames), 3.0).active
    tensors = [safetensors.torch.load(r.content) for r in (with_frames, without)]
    assert all((tensors[0][k] == tensors[1][k]).all() for k in tensors[0])


def test_bad_frames_get_a_4xx_naming_them(make_app, backgrounds, frames):
    with TestClient(make_app(max_frames=2)) as client:
        too_many = post(client, backgrounds, frames[:3])
        assert too_many.status_code == 400 and "3 frames" in too_many.json()["error"]
        broken = post(client, backgrounds, [frames[0], b"not an image"])
        assert broken.status_code == 415 and "f1.png" in broken.json()["error"]
        files = [("background", ("b.png", backgrounds[0], "image/png")), ("frames", ("f.png", frames[0], "image/png"))]
        files += [("shots", ("s.png", frames[1], "image/png"))]
        mismatched = client.post("/adapters", files=files, data={"labels": ["empty", "empty"]})
        assert mismatched.status_code == 422 and "labels" in mismatched.json()["error"]
