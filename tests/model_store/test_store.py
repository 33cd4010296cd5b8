import json
import os

import pytest
import torch

from model_store.store import (
    Store,
    StoreError,
    atomic_save_tensors,
    atomic_write_json,
    sha256_file,
)

WEIGHTS = {"w": torch.arange(12.0).reshape(4, 3), "b": torch.ones(3)}


@pytest.fixture
def store(tmp_path):
    store = Store.create(tmp_path / "store", profile="tiny", classes=["empty", "deer"])
    store.save_tensors("vae.safetensors", WEIGHTS, {"step": "7"})
    store.save_json("scheduler/scheduler_config.json", {"num_train_timesteps": 1000})
    return store


def test_round_trip(store):
    reopened = Store.open(store.root, required=["vae.safetensors", "scheduler/scheduler_config.json"])
    tensors = reopened.load_tensors("vae.safetensors")
    assert tensors.keys() == WEIGHTS.keys()
    assert all(torch.equal(tensors[k], WEIGHTS[k]) for k in WEIGHTS)
    assert reopened.tensor_metadata("vae.safetensors") == {"step": "7"}
    assert reopened.load_json("scheduler/scheduler_config.json") == {"num_train_timesteps": 1000}


def test_manifest_contents(store):
    store.set_component("vae", {"latent_channels": 4})
    store.update(lora={"rank": 2})
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["profile"] == "tiny" and manifest["classes"] == ["empty", "deer"]
    assert manifest["code_version"] and manifest["created"]
    assert manifest["components"] == {"vae": {"latent_channels": 4}}
    assert manifest["lora"] == {"rank": 2}
    path = store.path("vae.safetensors")
    assert manifest["files"]["vae.safetensors"] == {"sha256": sha256_file(path), "size": path.stat().st_size}
    with pytest.raises(ValueError):
        store.update(files={})


def test_register_file_written_elsewhere(store):
    relpath = "zoo/loc0/step10.safetensors"
    atomic_save_tensors(store.path(relpath), {"a": torch.zeros(2)})  # e.g. by a worker process
    assert not store.has(relpath)
    store.register(relpath)
    assert torch.equal(Store.open(store.root).load_tensors(relpath)["a"], torch.zeros(2))


@pytest.mark.parametrize("relpath", ["vae.safetensors", "scheduler/scheduler_config.json"])
def test_flipped_byte_is_refused(store, relpath):
    path = store.path(relpath)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    load = store.load_tensors if relpath.endswith(".safetensors") else store.load_json
    with pytest.raises(StoreError, match=f"{relpath}: sha256"):
        load(relpath)
    with pytest.raises(StoreError, match=relpath):
        Store.open(store.root)


def test_truncated_file_is_refused(store):
    path = store.path("vae.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(StoreError, match="vae.safetensors: size"):
        store.load_tensors("vae.safetensors")


def test_missing_file_is_refused(store):
    store.path("vae.safetensors").unlink()
    with pytest.raises(StoreError, match="vae.safetensors: file listed in the manifest is missing"):
        Store.open(store.root)


def test_unlisted_and_required_files_are_refused(store):
    atomic_write_json(store.path("stray.json"), {})
    with pytest.raises(StoreError, match="stray.json: file is not listed"):
        store.load_json("stray.json")
    with pytest.raises(StoreError, match="denoiser.safetensors: required file"):
        Store.open(store.root, required=["denoiser.safetensors"])


def test_missing_or_invalid_manifest_is_refused(store, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "nowhere")
    manifest = store.root / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: manifest is not valid JSON"):
        Store.open(store.root)
    manifest.unlink()
    with pytest.raises(StoreError, match="manifest.json: manifest is missing"):
        Store.open(store.root)


def test_create_refuses_existing_store_and_escaping_paths(store):
    with pytest.raises(StoreError, match="already exists"):
        Store.create(store.root)
    for relpath in ["../outside.json", "/etc/passwd"]:
        with pytest.raises(StoreError, match="inside the store"):
            store.save_json(relpath, {})


def test_atomic_write_leaves_no_temp_files(store, monkeypatch):
    names = sorted(p.name for p in store.root.rglob("*"))
    assert names == ["manifest.json", "scheduler", "scheduler_config.json", "vae.safetensors"]

    # A write that fails at the last step keeps the old file and cleans up its temp file.
    before = store.path("vae.safetensors").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save_tensors("vae.safetensors", {"w": torch.ones(1)})
    assert store.path("vae.safetensors").read_bytes() == before
    assert sorted(p.name for p in store.root.rglob("*")) == names
