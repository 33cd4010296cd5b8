"""The HTTP API on the smoke store, in process (TestClient)."""

from __future__ import annotations

import io
import json
import zipfile

import peft
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model_store.backbone import build_classifier
from model_store.generator import Generator
from model_store.lora import adapter_bytes, flatten, load_adapter_bytes
from model_store.store import Store
from tests.app.conftest import image_bytes


def post_adapter(client, background: bytes, **fields):
    return client.post("/adapters", files={"background": ("bg.png", background)}, data=fields)


def test_same_request_same_bytes_and_metadata(client, backgrounds, smoke_store):
    first = post_adapter(client, backgrounds[0], seed="7", steps="5")
    again = post_adapter(client, backgrounds[0], seed="7", steps="5")
    other_seed = post_adapter(client, backgrounds[0], seed="8", steps="5")
    assert first.status_code == 200 and first.content == again.content
    assert other_seed.headers["X-Adapter-Id"] != first.headers["X-Adapter-Id"]

    state, metadata = load_adapter_bytes(first.content)
    generator = Generator.from_store(Store(smoke_store))
    assert set(state) == set(generator.shapes)
    assert metadata["adapter_id"] == first.headers["X-Adapter-Id"]
    assert metadata["condition_distance"] == first.headers["X-Condition-Distance"]
    in_distribution = float(metadata["condition_distance"]) <= client.get("/info").json()["ood_threshold"]
    assert first.headers["X-In-Distribution"] == str(in_distribution).lower()
    assert (metadata["seed"], metadata["steps"]) == ("7", "5")
    assert metadata["store_id"] == generator.store_id and metadata["base_model_hash"] == generator.base_model_hash
    assert json.loads(metadata["lora_config"]) == generator.layout.to_dict()

    # The service's adapter is exactly what the Generator itself gives for the same frame, seed and steps.
    [expected] = generator.generate([Image.open(io.BytesIO(backgrounds[0]))], seeds=7, steps=5)
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_peft_zip_loads_with_peft(client, backgrounds, smoke_store, tmp_path):
    response = post_adapter(client, backgrounds[0], seed="1", format="peft")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    generator = Generator.from_store(Store(smoke_store))
    model = peft.PeftModel.from_pretrained(build_classifier(generator.backbone_config), tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor)
    assert post_adapter(client, backgrounds[0], seed="1", format="peft").content == response.content


def test_classify_with_each_kind_of_adapter(client, backgrounds, frames):
    images = [("images", (f"f{i}.png", frame)) for i, frame in enumerate(frames[:3])]
    base = client.post("/classify", files=images)
    assert base.status_code == 200 and base.json()["adapter_id"] is None
    prediction = base.json()["predictions"][0]
    assert prediction["file"] == "f0.png" and prediction["label"] == prediction["top_k"][0]["label"]
    assert len(base.json()["predictions"]) == 3

    generated = post_adapter(client, backgrounds[1])
    adapter_id = generated.headers["X-Adapter-Id"]
    by_id = client.post("/classify", files=images, data={"adapter_id": adapter_id}).json()
    by_background = client.post("/classify", files=[*images, ("background", ("bg.png", backgrounds[1]))]).json()
    upload = client.post("/classify", files=[*images, ("adapter", ("a.safetensors", generated.content))]).json()
    assert by_id["adapter_id"] == by_background["adapter_id"] == adapter_id
    assert by_id["predictions"] == by_background["predictions"] == upload["predictions"]
    assert by_id["predictions"] != base.json()["predictions"]

    # An uploaded adapter gets an id of its own, usable afterwards.
    again = client.post("/classify", files=images, data={"adapter_id": upload["adapter_id"]}).json()
    assert again["predictions"] == upload["predictions"]


def test_zero_adapter_equals_the_backbone(client, smoke_store, frames):
    generator = Generator.from_store(Store(smoke_store))
    zero = {key: torch.zeros(shape) for key, shape in generator.shapes.items()}
    images = [("images", ("f.png", frames[0]))]
    base = client.post("/classify", files=images).json()["predictions"]
    adapted = client.post("/classify", files=[*images, ("adapter", ("z", adapter_bytes(zero, {})))]).json()
    assert [p["label"] for p in adapted["predictions"]] == [p["label"] for p in base]
    assert abs(adapted["predictions"][0]["score"] - base[0]["score"]) < 1e-5


def test_unusual_images_are_accepted(client):
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 270 CW to display"
    files = [
        ("images", ("cmyk.jpg", image_bytes((0, 255, 255, 0), fmt="JPEG", mode="CMYK"))),
        ("images", ("palette.png", image_bytes(3, fmt="PNG", mode="P"))),
        ("images", ("rotated.jpg", image_bytes(size=(40, 20), fmt="JPEG", exif=exif))),
        ("images", ("tiny.gif", image_bytes(size=(1, 1), fmt="GIF"))),
        ("images", ("wrong-type.png", image_bytes(), "text/plain")),  # content is sniffed, not trusted
    ]
    response = client.post("/classify", files=files)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5


def test_info_health_metrics(client, smoke_store):
    info = client.get("/info").json()
    generator = Generator.from_store(Store(smoke_store))
    assert info["classes"] == generator.classes and info["store_id"] == generator.store_id
    assert info["lora"] == generator.layout.to_dict()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    metrics = client.get("/metrics").text
    for name in ("wildpdiff_requests_total", "wildpdiff_request_seconds_bucket", "wildpdiff_generations_total"):
        assert name in metrics
    assert 'route="/info"' in metrics
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/adapters", "/classify", "/info"}
    assert client.get("/docs").status_code == 200


def location_frames(smoke_world, role_index: int, count: int) -> list[bytes]:
    """`count` held-out (odd-position) background frames of a seen location, PNG bytes."""
    location = json.loads((smoke_world / "tasks.json").read_text())["seen"][role_index]
    return [p.read_bytes() for p in sorted((smoke_world / "backgrounds" / location).glob("*.png"))[1::2][:count]]


def test_several_background_frames_are_conditioned_on_their_mean(client, smoke_world, smoke_store):
    frames = location_frames(smoke_world, 1, 3)
    files = [("background", (f"bg{i}.png", frame)) for i, frame in enumerate(frames)]
    several = client.post("/adapters", files=files, data={"seed": "3", "steps": "4"})
    assert several.status_code == 200
    assert client.post("/adapters", files=files, data={"seed": "3", "steps": "4"}).content == several.content
    assert (
        several.headers["X-Adapter-Id"] != post_adapter(client, frames[0], seed="3", steps="4").headers["X-Adapter-Id"]
    )
    state, metadata = load_adapter_bytes(several.content)
    assert metadata["background_frames"] == "3" and metadata["frame_rule"] == "mean"

    generator = Generator.from_store(Store(smoke_store))
    features = generator.embed([Image.open(io.BytesIO(frame)) for frame in frames])
    mean = features.mean(0, keepdim=True)
    closest = float(generator.distance(features).min())  # a request is as in-distribution as its best frame
    assert float(several.headers["X-Condition-Distance"]) == pytest.approx(closest, abs=1e-5)
    [expected] = generator.generate_vectors(mean, [3], steps=4)
    assert torch.equal(flatten(state, generator.shapes), expected)

    by_background = client.post(
        "/classify", files=[("images", ("f.png", frames[0])), *files], data={"seed": "3", "steps": "4"}
    )
    assert by_background.json()["adapter_id"] == several.headers["X-Adapter-Id"]


def test_the_closest_frame_rule_is_a_setting(make_app, smoke_world, smoke_store):
    frames = location_frames(smoke_world, 0, 3)
    generator = Generator.from_store(Store(smoke_store))
    distances = generator.distance(generator.embed([Image.open(io.BytesIO(frame)) for frame in frames]))
    best = int(distances.argmin())
    files = [("background", (f"bg{i}.png", frame)) for i, frame in enumerate(frames)]
    with TestClient(make_app(frame_rule="closest")) as closest_client:
        several = closest_client.post("/adapters", files=files, data={"seed": "5", "steps": "4"})
        alone = closest_client.post(
            "/adapters", files={"background": ("b.png", frames[best])}, data={"seed": "5", "steps": "4"}
        )
    state, metadata = load_adapter_bytes(several.content)
    assert metadata["frame_rule"] == "closest"
    assert float(several.headers["X-Condition-Distance"]) == pytest.approx(float(distances[best]), abs=1e-5)
    expected, _ = load_adapter_bytes(alone.content)
    assert all(torch.allclose(state[key], expected[key], atol=1e-5) for key in expected)  # batch of 3 vs 1: ~1e-7
