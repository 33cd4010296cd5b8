"""A corpus of bad requests: every one gets a 4xx with `{"error": ...}`, and the server keeps serving."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model_store.generator import Generator
from model_store.lora import adapter_bytes
from model_store.store import Store
from tests.app.conftest import image_bytes
from tests.app.test_images import png_header_only

PNG = image_bytes()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.txt", "hi")
    return buffer.getvalue()


def torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    return buffer.getvalue()


# (name, field, file bytes, expected status) for a file in /classify's `images`
BAD_IMAGES = [
    ("empty", b"", 422),
    ("text", b"hello, world", 415),
    ("html", b"<!doctype html><html><body>hi</body></html>", 415),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415),
    ("zip-as-png", zip_bytes(), 415),
    ("torch-pickle-as-png", torch_pickle(), 415),
    ("python-pickle-as-png", pickle.dumps({"a": 1}), 415),
    ("tiff", image_bytes(fmt="TIFF"), 415),
    ("bmp", image_bytes(fmt="BMP"), 415),
    ("truncated-png", PNG[: len(PNG) // 2], 422),
    ("truncated-jpeg", image_bytes(size=(64, 64), fmt="JPEG")[:300], 422),
    ("png-bad-header-crc", PNG[:29] + bytes([PNG[29] ^ 0xFF]) + PNG[30:], 422),
    ("png-signature-only", PNG[:8], 422),
    ("bomb-20000x20000", png_header_only(20000, 20000), 413),
]


@pytest.fixture(scope="module")
def shapes(smoke_store):
    return Generator.from_store(Store(smoke_store)).shapes


def bad_adapters(shapes: dict) -> list[tuple[str, bytes, int]]:
    good = {key: torch.zeros(shape) for key, shape in shapes.items()}
    first = next(iter(shapes))

    def changed(**replace) -> bytes:
        return adapter_bytes({**good, **replace}, {})

    missing = dict(good)
    del missing[first]
    header_too_long = (10**9).to_bytes(8, "little") + b"{}"
    return [
        ("not-safetensors", b"\x00" * 100, 422),
        ("pickle", torch_pickle(), 422),
        ("header-length-lies", header_too_long, 422),
        ("missing-key", adapter_bytes(missing, {}), 422),
        ("extra-key", changed(surprise=torch.zeros(2)), 422),
        ("wrong-shape", changed(**{first: torch.zeros(3, 3)}), 422),
        ("int-dtype", changed(**{first: torch.zeros(shapes[first], dtype=torch.int32)}), 422),
        ("nan", changed(**{first: torch.full(shapes[first], float("nan"))}), 422),
        ("inf", changed(**{first: torch.full(shapes[first], float("inf"))}), 422),
        ("too-large", changed(padding=torch.from_numpy(np.zeros(500_000, dtype=np.float32))), 413),
    ]


def assert_refused(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str) and response.json()["error"]


@pytest.mark.parametrize(("data", "status"), [case[1:] for case in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_bad_image(client, data, status):
    assert_refused(client.post("/classify", files=[("images", ("x.png", PNG)), ("images", ("bad", data))]), status)
    assert_refused(client.post("/adapters", files={"background": ("bad", data)}), status)


def test_bad_adapter_uploads(client, shapes):
    for name, data, status in bad_adapters(shapes):
        response = client.post("/classify", files=[("images", ("x.png", PNG)), ("adapter", (name, data))])
        assert_refused(response, status)
        assert name in response.json()["error"]


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"seed": "abc"}, 422),
        ({"seed": "-1"}, 422),
        ({"seed": str(2**40)}, 422),
        ({"steps": "0"}, 422),
        ({"steps": "100000"}, 422),
        ({"steps": "2.5"}, 422),
        ({"format": "pickle"}, 422),
    ],
)
def test_bad_generation_fields(client, fields, status):
    assert_refused(client.post("/adapters", files={"background": ("bg.png", PNG)}, data=fields), status)


def test_bad_requests(client):
    image = ("images", ("x.png", PNG))
    cases = [
        (client.post("/adapters"), 422),  # no background
        (client.post("/adapters", json={"background": "x"}), 422),  # not multipart
        (client.post("/classify", data={"adapter_id": "0" * 32}, files=[image]), 404),  # unknown id
        (client.post("/classify", files=[image, ("background", ("b.png", PNG))], data={"adapter_id": "1"}), 422),
        (client.post("/classify", files=[image] * 70), 400),  # too many files
        (client.post("/adapters", files=[("background", ("b.png", PNG))] * 17), 400),  # too many background frames
        (client.post("/adapters", files=[("background", ("b.png", PNG)), ("background", ("c", b"hello, world"))]), 415),
        (client.post("/classify", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"}), 400),
        (client.get("/adapters"), 405),
        (client.get("/no/such/path"), 404),
    ]
    for response, status in cases:
        assert_refused(response, status)


def test_body_limit_counts_streamed_bytes(make_app):
    with TestClient(make_app(max_upload_bytes=100_000)) as client:
        big = [("images", ("big.png", b"\0" * 200_000))]
        assert_refused(client.post("/classify", files=big), 413)  # declared in Content-Length

        def chunks():  # no Content-Length at all: chunked transfer
            yield b"--x\r\nContent-Disposition: form-data; name=images; filename=a.png\r\n\r\n"
            for _ in range(30):
                yield b"\0" * 10_000

        headers = {"content-type": "multipart/form-data; boundary=x"}
        assert_refused(client.post("/classify", content=chunks(), headers=headers), 413)
        assert client.post("/classify", files=[("images", ("x.png", PNG))]).status_code == 200


def test_still_serving_after_the_corpus(client):
    assert client.get("/healthz").status_code == 200
    assert client.post("/classify", files=[("images", ("x.png", PNG))]).status_code == 200
    assert 'status="5' not in client.get("/metrics").text  # no 5xx was ever answered
