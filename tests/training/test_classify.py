"""`wildpdiff classify`: a folder of frames -> predictions file, equal to the service's classification path."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_store.backbone import preprocess
from model_store.classify import class_probabilities, top_labels
from model_store.generator import Generator
from model_store.inference import to_rgb
from model_store.lora import load_adapter_bytes
from model_store.store import Store
from training.cli import main
from training.data import read_image

ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def seen_location(smoke_world) -> str:
    return json.loads((smoke_world / "tasks.json").read_text())["seen"][0]


@pytest.fixture(scope="module")
def background(smoke_world, seen_location) -> Path:
    return sorted((smoke_world / "backgrounds" / seen_location).glob("*.png"))[1]


@pytest.fixture(scope="module")
def card(smoke_world, seen_location, tmp_path_factory) -> Path:
    """A memory card: 20 frames in two folders, a truncated frame, a text file named .png, a .txt file (not an
    image by suffix) and a hidden folder of deleted frames (never read)."""
    root = tmp_path_factory.mktemp("card")
    frames = sorted((smoke_world / "images" / seen_location).glob("*.png"))[:20]
    for i, path in enumerate(frames):
        folder = root / ("DCIM" if i % 2 else "DCIM/100CAMRA")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    (root / "DCIM" / "broken.png").write_bytes(frames[0].read_bytes()[:200])
    (root / "readme.png").write_text("not an image, whatever the suffix says")
    (root / "notes.txt").write_text("skipped by suffix")
    (root / ".Trashes").mkdir()
    (root / ".Trashes" / "deleted.png").write_bytes(b"never read")
    return root


@pytest.fixture(scope="module")
def adapter_dir(smoke_store, background, tmp_path_factory) -> Path:
    """What `wildpdiff generate` writes for `background` (2 DDIM steps, method generate)."""
    out = tmp_path_factory.mktemp("adapter")
    args = ["generate", "--store", str(smoke_store), "--background", str(background), "--out", str(out)]
    assert main([*args, "--steps", "2", "--method", "generate"]) == 0
    return out


def expected_top(smoke_store, card: Path, names: list[str], state, k: int) -> list[list[tuple[str, float]]]:
    """The service's path on the same frames: `to_rgb`, `preprocess`, `class_probabilities`, `top_labels`."""
    generator = Generator.from_store(Store(smoke_store))
    pixels = preprocess([to_rgb(read_image(card / name)) for name in names], generator.backbone_config)
    return top_labels(class_probabilities(generator, pixels, state), generator.classes, k)


def run_classify(smoke_store, card: Path, out: Path, *source: str, extra: tuple[str, ...] = ()) -> int:
    args = ["classify", "--store", str(smoke_store), *source, "--images", str(card), "--out", str(out), "--quiet"]
    return main([*args, *extra])


def test_adapter_file_predictions_equal_the_service_path(smoke_store, card, adapter_dir, tmp_path, capsys):
    adapter = adapter_dir / ADAPTER_FILE
    out = tmp_path / "predictions.json"
    source = ("--adapter", str(adapter))
    assert run_classify(smoke_store, card, out, *source, extra=("--top-k", "2", "--batch-size", "7")) == 0
    assert "20 images classified, 2 skipped" in capsys.readouterr().out
    result = json.loads(out.read_text())

    assert set(result) == {"info", "predictions", "failures"}
    info = result["info"]
    assert info["format"] == "wildpdiff-predictions" and info["format_version"] == "1.0"
    assert info["images"] == 20 and info["failures"] == 2 and info["top_k"] == 2
    assert info["store_id"] == Generator.from_store(Store(smoke_store)).store_id
    assert info["adapter"]["source"] == "file"
    assert info["adapter"]["sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert {"created", "classifier", "images_folder"} <= set(info)

    failures = {failure["filepath"]: failure["failure"] for failure in result["failures"]}
    assert set(failures) == {"DCIM/broken.png", "readme.png"}
    assert all("not a readable image" in message for message in failures.values())

    names = [p["filepath"] for p in result["predictions"]]
    assert names == sorted(names) and len(names) == 20 and all(name.startswith("DCIM/") for name in names)
    state, _ = load_adapter_bytes(adapter.read_bytes())
    for entry, top in zip(result["predictions"], expected_top(smoke_store, card, names, state, 2), strict=True):
        assert set(entry) == {"filepath", "prediction", "prediction_score", "classifications"}
        assert (entry["prediction"], entry["prediction_score"]) == top[0]
        assert entry["classifications"] == {"classes": [c for c, _ in top], "scores": [s for _, s in top]}


def test_background_generates_what_generate_writes(smoke_store, card, adapter_dir, background, tmp_path, capsys):
    generated, from_folder = tmp_path / "generated.json", tmp_path / "folder.json"
    source = ("--background", str(background), "--steps", "2", "--method", "generate")
    assert run_classify(smoke_store, card, generated, *source) == 0
    assert "adapter generated by generate" in capsys.readouterr().out
    assert run_classify(smoke_store, card, from_folder, "--adapter", str(adapter_dir)) == 0  # the PEFT folder

    adapter = json.loads(generated.read_text())["info"]["adapter"]
    with safe_open(adapter_dir / ADAPTER_FILE, "pt") as f:
        written = f.metadata()
    assert adapter["source"] == "generated" and adapter["backgrounds"] == [str(background)]
    assert {"format": "pt", **adapter["metadata"]} == written
    assert adapter["sha256"] == hashlib.sha256((adapter_dir / ADAPTER_FILE).read_bytes()).hexdigest()
    predictions = [json.loads(path.read_text())["predictions"] for path in (generated, from_folder)]
    assert predictions[0] == predictions[1]


def test_no_adapter_is_the_base_model(smoke_store, card, tmp_path):
    out = tmp_path / "base.json"
    assert run_classify(smoke_store, card, out) == 0
    result = json.loads(out.read_text())
    assert result["info"]["adapter"] == {"source": "base"}
    names = [p["filepath"] for p in result["predictions"]]
    top = expected_top(smoke_store, card, names, None, 3)
    assert [(p["prediction"], p["prediction_score"]) for p in result["predictions"]] == [t[0] for t in top]


def bad_adapters(folder: Path, adapter_dir: Path) -> dict[str, str]:
    """file name -> what the error line must say."""
    (folder / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    save_file({"weight": torch.zeros(2, 2)}, folder / "foreign.safetensors")
    state, metadata = load_adapter_bytes((adapter_dir / ADAPTER_FILE).read_bytes())
    save_file({k: v.half() for k, v in state.items()}, folder / "half.safetensors", metadata)
    return {
        "garbage.safetensors": "not a valid safetensors adapter",
        "foreign.safetensors": "missing",
        "half.safetensors": "dtype 'F16'",
        "absent.safetensors": "cannot read it",
    }


def test_bad_input_is_one_error_line_and_no_output(smoke_store, card, adapter_dir, tmp_path, capsys):
    out = tmp_path / "predictions.json"
    for name, says in bad_adapters(tmp_path, adapter_dir).items():
        assert run_classify(smoke_store, card, out, "--adapter", str(tmp_path / name)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --adapter {tmp_path / name}") and says in err and err.count("\n") == 1
        assert not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    for folder, says in ((tmp_path / "absent", "no such folder"), (empty, "no image files")):
        assert run_classify(smoke_store, folder, out) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --images") and says in err and err.count("\n") == 1
    assert run_classify(tmp_path / "no-store", card, out) == 2
    assert "store folder does not exist" in capsys.readouterr().err
    assert not out.exists()
