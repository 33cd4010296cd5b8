"""Serving methods over HTTP, and the CLI and the service answering one request alike (`model_store.inference`).

The table tests use a copy of the smoke store with a serving table whose "seen" region ends at 1e-3 and whose
"between" region and OOD threshold end halfway between a held-out background and a flat magenta frame: a
training-half background (distance ~0) is served by generate, the held-out one by anchored, the magenta frame
(out of distribution) by knn_blend."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open

from app.client import WildPDiffClient
from app.images import decode_image
from app.main import create_app
from app.settings import Settings
from model_store.generator import Generator
from model_store.inference import METHODS, SERVING_FILE, to_rgb
from model_store.lora import load_adapter_bytes
from model_store.store import Store
from tests.app.conftest import image_bytes, serve
from training.cli import main
from training.data import read_image

MAGENTA = image_bytes((255, 0, 255), (32, 32))


@pytest.fixture(scope="module")
def paths(smoke_world):
    """(training-half background, held-out background) files of one seen location."""
    location = json.loads((smoke_world / "tasks.json").read_text())["seen"][0]
    return sorted((smoke_world / "backgrounds" / location).glob("*.png"))[:2]


@pytest.fixture(scope="module")
def table(smoke_store, paths) -> dict:
    generator = Generator.from_store(Store(smoke_store))
    images = [Image.open(paths[1]).convert("RGB"), Image.open(io.BytesIO(MAGENTA)).convert("RGB")]
    held_out, magenta = generator.distance(generator.embed(images)).tolist()
    assert 1e-3 < held_out < magenta
    bound = (held_out + magenta) / 2
    return {
        "version": 1,
        "regions": [
            {"region": "seen", "max_distance": 1e-3, "method": "generate"},
            {"region": "between", "max_distance": bound, "method": "anchored"},
            {"region": "ood", "max_distance": None, "method": "knn_blend"},
        ],
        "knn_blend": {"k": 2, "weighting": "inverse_distance"},
        "anchored": {"strength": 0.6, "steps": 10},
        "chosen_on": "a test",
    }


@pytest.fixture(scope="module")
def table_store(smoke_store, table, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving") / "store"
    shutil.copytree(smoke_store, root)
    store = Store(root)
    store.save_json(SERVING_FILE, table)  # registered: the copy still verifies
    threshold = table["regions"][1]["max_distance"]
    store.set_component("condition", {**store.manifest["components"]["condition"], "ood_threshold": threshold})
    return root


@pytest.fixture(scope="module")
def tabled(table_store):
    with TestClient(create_app(Settings(store=table_store, default_steps=5, _env_file=None))) as client:
        yield client


def post(client, background: bytes, **fields):
    return client.post("/adapters", files=[("background", ("bg.png", background))], data=fields)


def tensors_and_metadata(data: bytes) -> tuple[dict, dict]:
    state, metadata = load_adapter_bytes(data)
    return state, {k: v for k, v in metadata.items() if k != "adapter_id"}


def same_adapter(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """(state, metadata) pairs with equal tensors and metadata."""
    return a[0].keys() == b[0].keys() and all(a[0][k].equal(b[0][k]) for k in a[0]) and a[1] == b[1]


def test_old_store_serves_generate(client, backgrounds):
    response = post(client, backgrounds[0], seed="1", steps="3")
    assert response.status_code == 200 and response.headers["X-Method"] == "generate"
    _, metadata = load_adapter_bytes(response.content)
    assert (metadata["method"], metadata["region"]) == ("generate", "all")
    info = client.get("/info").json()
    assert info["serving"]["regions"] == [{"region": "all", "max_distance": None, "method": "generate"}]
    assert info["methods"] == list(METHODS)


def test_each_method_by_field_and_header(tabled, paths):
    background = paths[1].read_bytes()
    bodies = {}
    for method in METHODS:
        response = post(tabled, background, seed="3", method=method)
        assert response.status_code == 200, response.text
        assert response.headers["X-Method"] == method
        assert post(tabled, background, seed="3", method=method).content == response.content  # same bytes
        _, metadata = load_adapter_bytes(response.content)
        assert metadata["method"] == method and metadata["region"] == "between"
        bodies[method] = response.content
    vectors = {
        b"".join(t.numpy().tobytes() for _, t in sorted(load_adapter_bytes(body)[0].items()))
        for body in bodies.values()
    }
    assert len(vectors) == len(METHODS)  # four different adapters


def test_the_table_chooses_by_region(tabled, paths, table):
    expected = {paths[0].read_bytes(): ("seen", "generate"), paths[1].read_bytes(): ("between", "anchored")}
    expected[MAGENTA] = ("ood", "knn_blend")
    for background, (region, method) in expected.items():
        response = post(tabled, background, seed="2")
        assert response.status_code == 200 and response.headers["X-Method"] == method
        assert load_adapter_bytes(response.content)[1]["region"] == region
        explicit = post(tabled, background, seed="2", method=method)
        assert explicit.content != response.content  # the ids differ: none requested vs explicit
        assert same_adapter(tensors_and_metadata(explicit.content), tensors_and_metadata(response.content))
    # beyond the threshold with the default fallback policy: a generated answer falls back, knn_blend stays
    magenta = post(tabled, MAGENTA, method="generate")
    assert (magenta.headers["X-Method"], magenta.headers["X-Policy-Applied"]) == ("nearest", "fallback-nearest")
    assert post(tabled, MAGENTA).headers["X-Policy-Applied"] == "generate"
    assert tabled.get("/info").json()["serving"] == table


def test_unknown_method_is_refused(tabled, paths, frames):
    response = post(tabled, paths[0].read_bytes(), method="magic")
    assert response.status_code == 422
    assert all(name in response.json()["error"] for name in METHODS)
    classify = tabled.post(
        "/classify", files=[("images", ("f.png", frames[0])), ("background", ("bg.png", MAGENTA))], data={"method": "x"}
    )
    assert classify.status_code == 422 and "method" in classify.json()["error"]


def test_classify_says_which_method_generated(tabled, paths, frames):
    files = [("images", ("f.png", frames[0])), ("background", ("bg.png", paths[1].read_bytes()))]
    response = tabled.post("/classify", files=files, data={"method": "nearest"})
    assert response.status_code == 200 and response.headers["X-Method"] == "nearest"
    assert "X-Method" not in tabled.post("/classify", files=files[:1]).headers  # nothing generated


def test_methods_needing_means_without_them(table_store, paths):
    with TestClient(create_app(Settings(store=table_store, default_steps=5, _env_file=None))) as client:
        client.app.state.runtime.generator.location_means = None  # a store fitted before they were stored
        response = post(client, paths[1].read_bytes(), method="knn_blend")
        assert response.status_code == 422 and "mean adapters" in response.json()["error"]
        chosen = post(client, paths[1].read_bytes())  # the table says anchored: generate instead
        assert chosen.status_code == 200 and chosen.headers["X-Method"] == "generate"
        assert client.get("/info").json()["methods"] == ["generate"]


def test_the_client_sends_the_method(make_app, backgrounds):
    with serve(make_app()) as url, WildPDiffClient(url) as client:
        adapter = client.generate_adapter(backgrounds[0], method="nearest")
        assert adapter.method == "nearest" and adapter.policy_applied == "generate"
        assert client.generate_adapter(backgrounds[0], steps=2).method == "generate"
        assert client.classify([backgrounds[1]], background=backgrounds[0], method="knn_blend")["adapter_id"]


# -----------------------------------------------------------------------------
# the CLI and the service


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16"])
def test_cli_and_service_read_a_png_alike(mode, paths, tmp_path):
    path = tmp_path / "frame.png"
    image = Image.open(paths[0])
    if mode == "I;16":  # 16-bit greyscale: a plain convert would clip it to white
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    image.save(path)
    service = decode_image(path.read_bytes(), "frame.png", 10**8)
    cli = to_rgb(read_image(path))
    assert service.mode == cli.mode == "RGB" and service.tobytes() == cli.tobytes()


@pytest.mark.parametrize("method", [None, *METHODS])
def test_cli_and_service_give_the_same_adapter(method, tabled, table_store, paths, tmp_path):
    background = paths[1]
    fields = {"seed": "5", "steps": "4"} | ({"method": method} if method else {})
    response = post(tabled, background.read_bytes(), **fields)
    assert response.status_code == 200
    args = ["generate", "--store", str(table_store), "--background", str(background), "--seed", "5", "--steps", "4"]
    assert main([*args, "--out", str(tmp_path), *(["--method", method] if method else [])]) == 0
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        cli = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    assert same_adapter(cli, tensors_and_metadata(response.content))


def test_cli_and_service_apply_the_same_policy(tabled, table_store, tmp_path, capsys):
    magenta = tmp_path / "magenta.png"
    magenta.write_bytes(MAGENTA)
    args = ["generate", "--store", str(table_store), "--background", str(magenta), "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--policy", "reject"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: background is out of distribution") and err.count("\n") == 1
    assert post(tabled, MAGENTA, policy="reject").status_code == 422

    assert main([*args, "--out", str(tmp_path / "b"), "--method", "generate"]) == 0
    out, err = capsys.readouterr()
    assert "by nearest (ood region, policy fallback-nearest" in out and err.startswith("warning: ")
    with safe_open(tmp_path / "b" / "adapter_model.safetensors", "pt") as f:
        cli = {key: f.get_tensor(key) for key in f.keys()}
    service, _ = load_adapter_bytes(post(tabled, MAGENTA, method="generate", steps="3").content)
    assert all(cli[key].equal(service[key]) for key in cli)
