"""A corpus of bad requests: every one gets a 4xx with `{"error": ...}`, and the server keeps serving."""

from __future__ import annotations

import io
import json
import math
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


def with_header_dtype(data: bytes, key: str, dtype: str, bits: int) -> bytes:
    """Safetensors bytes with tensor `key` re-declared as `dtype` of `bits` per element (data resized to fit),
    for dtypes torch cannot write (F8_E8M0, packed F4) or that do not exist at all."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    out, offset = b"", 0
    for k in tensors:
        begin, end = header[k]["data_offsets"]
        chunk = body[begin:end]
        if k == key:
            header[k]["dtype"] = dtype
            chunk = b"\0" * (math.prod(header[k]["shape"]) * bits // 8)
        header[k]["data_offsets"] = [offset, offset + len(chunk)]
        out, offset = out + chunk, offset + len(chunk)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + out


def bad_adapters(shapes: dict) -> list[tuple]:
    """(name, file bytes, expected status, words the error must hold beside the name)."""
    good = {key: torch.zeros(shape) for key, shape in shapes.items()}
    first = next(iter(shapes))

    def changed(**replace) -> bytes:
        return adapter_bytes({**good, **replace}, {})

    def as_dtype(dtype: torch.dtype, value: float = 0.0) -> bytes:
        return changed(**{first: torch.full(shapes[first], value, dtype=torch.float64).to(dtype)})

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
        # Issue #18: every one of these answered 500 (and dropped the connection) or was silently cast.
        ("float8-e4m3", as_dtype(torch.float8_e4m3fn, 1.0), 422, first, "F8_E4M3"),
        ("float8-e5m2", as_dtype(torch.float8_e5m2, 1.0), 422, first, "F8_E5M2"),
        ("float8-e8m0", with_header_dtype(changed(), first, "F8_E8M0", 8), 422, first, "F8_E8M0"),
        ("packed-float4", with_header_dtype(changed(), first, "F4", 4), 422, first, "F4"),
        ("unknown-dtype", with_header_dtype(changed(), first, "F128", 128), 422, first, "F128"),
        ("float64", as_dtype(torch.float64), 422, first, "F64"),
        ("float64-beyond-float32", as_dtype(torch.float64, 1e300), 422, first, "F64"),
        ("float16", as_dtype(torch.float16), 422, first, "F16"),
        ("bfloat16", as_dtype(torch.bfloat16), 422, first, "BF16"),
        ("float32-3e38", as_dtype(torch.float32, 3e38), 422, first, "magnitude"),
        ("header-not-an-object", (8).to_bytes(8, "little") + b"[1, 2]  ", 422, "JSON object"),
        ("header-not-json", (8).to_bytes(8, "little") + b"{nope   ", 422, "not JSON"),
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
    for name, data, status, *words in bad_adapters(shapes):
        response = client.post("/classify", files=[("images", ("x.png", PNG)), ("adapter", (name, data))])
        assert_refused(response, status)
        assert all(word in response.json()["error"] for word in [name, *words]), response.json()


def test_scores_are_never_sent_non_finite(client, shapes, monkeypatch):
    # Weights within the magnitude limit that still overflow the logits: the last line of defence.
    monkeypatch.setattr("model_store.lora.MAX_ADAPTER_ABS", math.inf)
    huge = adapter_bytes({key: torch.full(shape, 3e38) for key, shape in shapes.items()}, {})
    response = client.post("/classify", files=[("images", ("x.png", PNG)), ("adapter", ("huge", huge))])
    assert_refused(response, 422)
    assert "overflow" in response.json()["error"]


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
        (client.post("/classify", data={"adapter_id": ""}, files=[image]), 422),  # not "no adapter"
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


def test_made_up_http_methods_share_one_metrics_label(client):
    for method in ("FOO", "BREW", "PROPFIND-X"):
        assert_refused(client.request(method, "/info"), 405)
    metrics = client.get("/metrics").text
    assert 'method="other"' in metrics and "FOO" not in metrics and "BREW" not in metrics


def test_still_serving_after_the_corpus(client):
    assert client.get("/healthz").status_code == 200
    assert client.post("/classify", files=[("images", ("x.png", PNG))]).status_code == 200
    assert 'status="5' not in client.get("/metrics").text  # no 5xx was ever answered
